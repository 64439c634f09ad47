"""Commented starter configs written by `fednestd init-config`; tests load them through the schemas."""

TIER1 = """\
# fednestd tier 1 (backend): bridge, aggregator, registry, compiler.
# Relative paths are relative to this file.

# Where the backend keeps MLflow's sqlite store and artifacts, bundles, the enrolled-device
# registry and its Ed25519 signing key (backend.key / backend.pub).
state_dir: run/backend

# The CA that issued every device and broker certificate (`fednestd pki init`).
ca_cert: run/pki/ca.pem

# Model sizes. Devices receive these inside each signed bundle; change them only for a new model.
model:
  vocab_size: 256        # byte-level
  d_model: 64
  n_layers: 2
  n_heads: 4
  n_experts: 4
  top_k: 2               # routing: top-k by masking
  d_ff: 128
  max_seq_len: 64
  lora_rank: 4           # device adapters on every expert linear
  lora_alpha: 8.0
  seed: 0

kafka:
  bootstrap: 127.0.0.1:9092
  group_id: fednestd-aggregator

# The bridge's MQTT identity (certificate CN fednestd-bridge).
mqtt:
  host: 127.0.0.1
  port: 8883
  ca: run/pki/ca.pem
  cert: run/pki/clients/fednestd-bridge.pem
  key: run/pki/clients/fednestd-bridge.key

# MLflow tracking/registry URI; leave unset for a sqlite store in state_dir.
# mlflow_tracking_uri: http://mlflow.internal:5000
registered_model: fednestd-moe

aggregation:
  buffer_size: 2           # K updates per new version (FedBuff)
  staleness_limit: 3       # refuse updates based on a version older than this many versions
  staleness_exponent: 0.5  # weight = samples * (1 + staleness) ** -exponent
  # clip_norm: 10.0        # optional per-update norm bound of the expert delta
  server_lr: 1.0
"""

TIER2 = """\
# fednestd tier 2 (device agent). `fednestd devices enroll` writes a filled-in copy of this file
# into the device's kit. Relative paths are relative to this file.

device_id: vehicle-0001
data_path: /var/lib/fednestd/data/local.jsonl   # one {"text": ...} object per line
state_dir: state                                # bundles, outbox, audit log, status
signing_key: signing.key                        # Ed25519 key that signs every update
backend_public_key: backend.pub                 # verifies bundles and announcements
policy_paths:
  - /etc/fednestd/policies/egress.rego          # Rego v1, default deny
policy_engine: rego                             # in-process Rego engine
trainer: ort                                    # ONNX Runtime Training

mqtt:
  host: 127.0.0.1        # the broker, reached through the WireGuard tunnel in production
  port: 8883
  ca: ca.pem
  cert: vehicle-0001.pem  # client certificate, CN = device_id
  key: vehicle-0001.key

train:
  steps: 30
  batch_size: 8
  seq_len: 64
  learning_rate: 0.01
  heldout_fraction: 0.1   # lines kept for evaluation, chosen by content hash
  threads: 1
  seed: 0
"""
