"""Bad updates through the real bridge and aggregator: refused with a specific reason on the
dead-letter topic, the consumer keeps running, and the model only ever sees good updates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
from aiokafka import AIOKafkaConsumer
from safetensors.numpy import save

from fednestd.agent.uplink import Uplink
from fednestd.backend.devstack import KafkaServer
from fednestd.backend.federation import Federation
from fednestd.backend.registry import ModelRegistry
from fednestd.shared import crypto, envelope
from fednestd.shared.config import BackendConfig, load_config
from fednestd.shared.envelope import DeltaEnvelope
from fednestd.shared.model import adapter_shapes
from fednestd.shared.topics import KAFKA_DEADLETTER, updates_topic

DEVICES = ("bad-a", "bad-b")


def _tensors(model_cfg, scale: float = 1e-3, rank: int | None = None) -> dict[str, np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in adapter_shapes(model_cfg).items():
        s = list(shape)
        if rank is not None:
            s[1 if name.endswith("lora_A") else 2] = rank
        out[name] = (scale * rng.normal(size=s)).astype(np.float32)
    return out


async def _deadletters(bootstrap: str, done: Callable[[list[dict]], bool], timeout: float = 90) -> list[dict]:
    consumer = AIOKafkaConsumer(KAFKA_DEADLETTER, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    found: list[dict] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(found) and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    found.append(headers | {"value": r.value})
    finally:
        await consumer.stop()
    return found


def test_each_bad_update_is_dead_lettered_with_its_reason(
    make_federation: Callable[..., Federation], device_link: Callable[[Federation, str], Uplink], kafka: KafkaServer
) -> None:
    fed = make_federation(DEVICES)
    backend = load_config(fed.tier1_path, BackendConfig)
    fed.init_model()
    fed.start_backend(max_versions=1)
    kit = fed.agent_configs["bad-a"].parent
    key = crypto.load_private_key(kit / "signing.key")
    model_cfg = backend.model

    def env(**kw: object) -> DeltaEnvelope:
        args: dict = dict(device_id="bad-a", base_version=1, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha,
                          num_samples=10, tensors=_tensors(model_cfg))
        args.update(kw)
        return DeltaEnvelope(**args)

    good = env()
    bad_shape = _tensors(model_cfg)
    bad_shape["blocks.0.moe.experts.w_in.lora_B"] = np.zeros((model_cfg.n_experts, 5, model_cfg.lora_rank),
                                                             np.float32)
    unknown = _tensors(model_cfg)
    unknown["blocks.9.moe.experts.w_in.lora_A"] = unknown.pop("blocks.0.moe.experts.w_in.lora_A")
    unknown["blocks.9.moe.experts.w_in.lora_B"] = unknown.pop("blocks.0.moe.experts.w_in.lora_B")
    signed = envelope.encode(env(), key)
    header_meta = envelope.read_header(signed)["__metadata__"]
    nan_tensors = {k: v.copy() for k, v in envelope.decode(signed).tensors.items()}
    nan_tensors["blocks.0.moe.experts.w_out.lora_A"][0, 0, 0] = np.nan
    forged = envelope.encode(env(), crypto.load_private_key(fed.agent_configs["bad-b"].parent / "signing.key"))

    cases = {
        "malformed": b"\x00\x01 not a safetensors file",
        "device_mismatch": envelope.encode(env(device_id="bad-b"), key),
        "bad_signature": forged,
        "non_finite": save(nan_tensors, metadata=header_meta),
        "bad_shape": envelope.encode(env(tensors=bad_shape), key),
        "unknown_tensor": envelope.encode(env(tensors=unknown), key),
        "future_base": envelope.encode(env(base_version=5), key),
    }
    uplink = device_link(fed, "bad-a")
    for payload in cases.values():
        assert uplink.publish(updates_topic("bad-a"), payload).ok
    # A replay of a good update is refused as a duplicate once the first copy is buffered.
    good_bytes = envelope.encode(good, key)
    for payload in (good_bytes, good_bytes):
        assert uplink.publish(updates_topic("bad-a"), payload).ok

    sent = set(cases.values()) | {good_bytes}

    def ours(letters: list[dict]) -> dict[str, dict]:
        """This test's dead letters by reason (the topic is shared with other tests on this broker)."""
        mine = [d for d in letters if d["source"].startswith("fl/v1/devices/bad-a") or
                (d["stage"] == "aggregator" and d["value"] in sent)]
        return {d["reason"]: d for d in mine}

    expected = set(cases) | {"duplicate"}
    reasons = ours(asyncio.run(_deadletters(kafka.bootstrap, lambda found: expected <= ours(found).keys())))
    for code in cases:
        assert code in reasons, f"no dead letter for {code}: got {sorted(reasons)}"
    assert "duplicate" in reasons
    assert reasons["device_mismatch"]["stage"] == "bridge"
    assert "envelope names device 'bad-b'" in reasons["device_mismatch"]["detail"]
    assert reasons["bad_shape"]["stage"] == "aggregator"
    assert "blocks.0.moe.experts.w_in.lora_B" in reasons["bad_shape"]["detail"]
    assert reasons["unknown_tensor"]["stage"] == "aggregator"
    assert reasons["future_base"]["detail"].startswith("base v5 is newer than the model v1")
    assert reasons["malformed"]["value"] == cases["malformed"]  # the payload is kept, not dropped

    # The aggregator kept running: one more good update (from the other device) completes a merge of good ones only.
    key_b = crypto.load_private_key(fed.agent_configs["bad-b"].parent / "signing.key")
    other = DeltaEnvelope(device_id="bad-b", base_version=1, rank=2, alpha=model_cfg.lora_alpha, num_samples=10,
                          tensors=_tensors(model_cfg, rank=2))
    assert device_link(fed, "bad-b").publish(updates_topic("bad-b"), envelope.encode(other, key_b)).ok
    registry = ModelRegistry(backend)
    fed.wait_for(lambda: registry.versions() == [1, 2], timeout=120, what="v2 from the two good updates")
    merged = sorted(u["update_id"] for u in registry.load(2).lineage["updates"])
    assert merged == sorted([good.update_id, other.update_id])
    assert fed.procs["aggregator"].wait(timeout=60) == 0
