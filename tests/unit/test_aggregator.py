"""Aggregator admission and merge against a real MLflow sqlite store, without Kafka."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fednestd.backend.aggregator import Aggregator
from fednestd.backend.devices import DeviceRegistry
from fednestd.shared import crypto, envelope, pki
from fednestd.shared.config import BackendConfig
from fednestd.shared.envelope import DeltaEnvelope, EnvelopeError
from fednestd.shared.model import adapter_shapes


@pytest.fixture
def agg(tmp_path: Path) -> Aggregator:
    ca, ca_key = pki.create_ca(tmp_path / "pki")
    cfg = BackendConfig(state_dir=tmp_path / "backend", ca_cert=ca,
                        mqtt={"ca": ca, "cert": tmp_path / "x.pem", "key": tmp_path / "x.key"},
                        aggregation={"buffer_size": 2, "staleness_limit": 2})
    crypto.generate_signing_key(cfg.signing_key)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "p.rego").write_text("package fednestd.egress\n")
    registry = DeviceRegistry(cfg.device_registry, ca)
    for device in ("dev-a", "dev-b"):
        registry.enroll(device, ca_key, tmp_path / device, crypto.public_key_path(cfg.signing_key),
                        "127.0.0.1", 8883, data, [tmp_path / "p.rego"])
    aggregator = Aggregator(cfg)
    assert aggregator.initialise() == 1
    return aggregator


def _update(agg: Aggregator, device: str, base: int = 1, scale: float = 1e-2) -> bytes:
    rng = np.random.default_rng(abs(hash(device)) % 1000)
    tensors = {n: (scale * rng.normal(size=s)).astype(np.float32) for n, s in adapter_shapes(agg.model_cfg).items()}
    env = DeltaEnvelope(device_id=device, base_version=base, rank=agg.model_cfg.lora_rank,
                        alpha=agg.model_cfg.lora_alpha, num_samples=32, tensors=tensors)
    key = crypto.load_private_key(agg.cfg.state_dir.parent / device / "signing.key")
    return envelope.encode(env, key)


def _reason(agg: Aggregator, payload: bytes) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        agg.admit(payload)
    return info.value


def test_stale_future_duplicate_and_unknown_device_are_refused(agg: Aggregator, tmp_path: Path) -> None:
    agg.version = 4  # as if three merges happened since v1
    err = _reason(agg, _update(agg, "dev-a", base=1))
    assert err.code == "stale" and "base v1 is 3 versions behind v4 (limit 2)" in err.detail
    err = _reason(agg, _update(agg, "dev-a", base=6))
    assert err.code == "future_base"
    agg.version = 1
    payload = _update(agg, "dev-a")
    agg.buffer.append(agg.admit(payload))
    assert _reason(agg, payload).code == "duplicate"
    DeviceRegistry(agg.cfg.device_registry, agg.cfg.ca_cert).revoke("dev-b")
    assert _reason(agg, _update(agg, "dev-b")).code == "revoked_device"


def test_merge_registers_a_version_with_lineage_and_changes_only_experts(agg: Aggregator) -> None:
    before = {k: v.copy() for k, v in agg.parts["experts"].items()}
    core = {k: v.copy() for k, v in agg.parts["core"].items()}
    for device in ("dev-a", "dev-b"):
        agg.buffer.append(agg.admit(_update(agg, device)))
    outcome = agg.merge_buffer()
    assert outcome.version == 2 and agg.registry.versions() == [1, 2]
    stored = agg.registry.load(2)
    assert sorted(u["device_id"] for u in stored.lineage["updates"]) == ["dev-a", "dev-b"]
    assert stored.tags["fednestd.updates"] == "2"
    for name, arr in stored.parts["core"].items():
        np.testing.assert_array_equal(arr, core[name])
    changed = [n for n, arr in stored.parts["experts"].items() if not np.array_equal(arr, before[n])]
    adapted = {n.rsplit(".", 1)[0] for n in adapter_shapes(agg.model_cfg)}
    assert sorted(changed) == sorted(f"{b}.weight" for b in adapted)
    # A restarted aggregator rebuilds its dedup set from the registry: the same update is a duplicate.
    again = Aggregator(agg.cfg)
    assert again.initialise() == 2
    assert set(u["update_id"] for u in stored.lineage["updates"]) <= again.seen
