"""A crash never loses an accepted update: the aggregator is killed with one update buffered and
not yet merged; after a restart that update is replayed from Kafka and merged, exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable

import numpy as np

from fednestd.agent.uplink import Uplink
from fednestd.backend.federation import Federation
from fednestd.backend.registry import ModelRegistry
from fednestd.shared import crypto, envelope
from fednestd.shared.config import BackendConfig, load_config
from fednestd.shared.envelope import DeltaEnvelope
from fednestd.shared.model import adapter_shapes
from fednestd.shared.topics import updates_topic

DEVICES = ("crash-a", "crash-b")


def _send(fed: Federation, link: Callable[[Federation, str], Uplink], device: str) -> str:
    cfg = load_config(fed.tier1_path, BackendConfig).model
    rng = np.random.default_rng(len(device))
    tensors = {n: (1e-2 * rng.normal(size=s)).astype(np.float32) for n, s in adapter_shapes(cfg).items()}
    env = DeltaEnvelope(device_id=device, base_version=1, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                        num_samples=16, tensors=tensors)
    payload = envelope.encode(env, crypto.load_private_key(fed.agent_configs[device].parent / "signing.key"))
    assert link(fed, device).publish(updates_topic(device), payload).ok
    return env.update_id


def test_killed_aggregator_replays_its_buffered_update(make_federation: Callable[..., Federation],
                                                       device_link: Callable[[Federation, str], Uplink]) -> None:
    fed = make_federation(DEVICES)
    backend = load_config(fed.tier1_path, BackendConfig)
    fed.init_model()
    fed.start_bridge()
    first_proc = fed.start_aggregator(max_versions=1, name="aggregator")
    first = _send(fed, device_link, "crash-a")
    fed.wait_for(lambda: "buffered update 1/2" in fed.log("aggregator"), timeout=120, what="update 1 buffered")

    first_proc.send_signal(signal.SIGKILL)
    first_proc.wait(timeout=30)
    del fed.procs["aggregator"]  # killed on purpose
    registry = ModelRegistry(backend)
    assert registry.versions() == [1]

    fed.start_aggregator(max_versions=1, name="aggregator-restarted")
    second = _send(fed, device_link, "crash-b")
    fed.wait_for(lambda: registry.versions() == [1, 2], timeout=180, what="v2 after the restart")
    merged = [u["update_id"] for u in registry.load(2).lineage["updates"]]
    assert sorted(merged) == sorted([first, second])
    assert fed.procs["aggregator-restarted"].wait(timeout=60) == 0
