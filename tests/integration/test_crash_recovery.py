"""A crash never loses an accepted update: the aggregator is killed with one update buffered and
not yet merged; after a restart that update is replayed from Kafka and merged, exactly once."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from fednestd.agent.uplink import Uplink
from fednestd.backend.devstack import DevPki, KafkaServer, MosquittoServer
from fednestd.backend.federation import Federation
from fednestd.backend.registry import ModelRegistry
from fednestd.shared import announce, crypto, envelope
from fednestd.shared.config import AggregationConfig, BackendConfig, load_config
from fednestd.shared.envelope import DeltaEnvelope
from fednestd.shared.model import adapter_shapes
from fednestd.shared.topics import MQTT_ANNOUNCE, updates_topic

DEVICES = ("crash-a", "crash-b")


@pytest.fixture
def fed(tmp_path: Path, pki: DevPki, mosquitto: MosquittoServer, kafka: KafkaServer):
    fed = Federation(tmp_path / "fed", pki, mosquitto, kafka, aggregation=AggregationConfig(buffer_size=2))
    fed.write_backend_config()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "unused"}) + "\n")
    for device_id in DEVICES:
        fed.enroll(device_id, data)
    yield fed
    fed.stop()


def _send(fed: Federation, pki: DevPki, mosquitto: MosquittoServer, device: str, backend: BackendConfig) -> str:
    cfg = backend.model
    rng = np.random.default_rng(len(device))
    tensors = {n: (1e-2 * rng.normal(size=s)).astype(np.float32) for n, s in adapter_shapes(cfg).items()}
    env = DeltaEnvelope(device_id=device, base_version=1, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                        num_samples=16, tensors=tensors)
    payload = envelope.encode(env, crypto.load_private_key(fed.agent_configs[device].parent / "signing.key"))
    cert, key = pki.device(device)
    uplink = Uplink(mosquitto.host, mosquitto.port, pki.ca, cert, key, client_id=f"{device}-test")
    uplink.connect()
    try:
        ready = threading.Event()
        backend_key = crypto.load_public_key(crypto.public_key_path(backend.signing_key))

        def on_announce(_topic: str, raw: bytes) -> None:
            try:
                announce.decode(raw, backend_key)
            except announce.AnnouncementError:
                return
            ready.set()

        uplink.subscribe(MQTT_ANNOUNCE, on_announce)
        fed.wait_for(ready.is_set, timeout=120, what="this backend's announcement (bridge up)")
        assert uplink.publish(updates_topic(device), payload).ok
    finally:
        uplink.close()
    return env.update_id


def test_killed_aggregator_replays_its_buffered_update(fed: Federation, pki: DevPki,
                                                       mosquitto: MosquittoServer) -> None:
    backend = load_config(fed.tier1_path, BackendConfig)
    fed.init_model()
    fed.start_bridge()
    first_proc = fed.start_aggregator(max_versions=1, name="aggregator")
    first = _send(fed, pki, mosquitto, "crash-a", backend)
    fed.wait_for(lambda: "buffered update 1/2" in fed.log("aggregator"), timeout=120, what="update 1 buffered")

    first_proc.send_signal(signal.SIGKILL)
    first_proc.wait(timeout=30)
    del fed.procs["aggregator"]  # killed on purpose
    registry = ModelRegistry(backend)
    assert registry.versions() == [1]

    fed.start_aggregator(max_versions=1, name="aggregator-restarted")
    second = _send(fed, pki, mosquitto, "crash-b", backend)
    fed.wait_for(lambda: registry.versions() == [1, 2], timeout=180, what="v2 after the restart")
    merged = [u["update_id"] for u in registry.load(2).lineage["updates"]]
    assert sorted(merged) == sorted([first, second])
    assert fed.procs["aggregator-restarted"].wait(timeout=60) == 0
