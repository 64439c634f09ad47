"""One real federated cycle: two agent processes, real Mosquitto, Kafka and MLflow, device -> backend -> device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fednestd.agent.audit import AuditLog
from fednestd.agent.outbox import Outbox
from fednestd.backend.devstack import DevPki, KafkaServer, MosquittoServer
from fednestd.backend.federation import Federation
from fednestd.backend.registry import ModelRegistry
from fednestd.backend.shakespeare import partition_roles, write_jsonl
from fednestd.shared.config import AggregationConfig, BackendConfig, load_config

DEVICES = ("dev-a", "dev-b")
TRAIN = {"steps": 40, "batch_size": 8, "seq_len": 64, "learning_rate": 0.01, "heldout_fraction": 0.1}


@pytest.fixture
def federation(tmp_path: Path, pki: DevPki, mosquitto: MosquittoServer, kafka: KafkaServer):
    fed = Federation(tmp_path / "fed", pki, mosquitto, kafka,
                     aggregation=AggregationConfig(buffer_size=2), )
    fed.write_backend_config()
    for device_id, roles in zip(DEVICES, partition_roles(len(DEVICES), 3, 1500), strict=True):
        data = write_jsonl(roles, tmp_path / f"{device_id}.jsonl")
        assert data > 1000
        path = fed.enroll(device_id, tmp_path / f"{device_id}.jsonl", TRAIN)
        cfg = yaml.safe_load(path.read_text())
        cfg["exit_after_version"] = 2  # stop once the merged version is installed and evaluated
        path.write_text(yaml.safe_dump(cfg))
    yield fed
    fed.stop()


def test_two_devices_train_merge_and_install_the_new_version(federation: Federation) -> None:
    federation.init_model()
    federation.start_backend(max_versions=1)
    agents = [federation.start_agent(d) for d in DEVICES]

    federation.wait_for(
        lambda: all(federation.agent_status(d).get("installed_version") == 2 for d in DEVICES),
        timeout=300, what="both agents to install v2",
    )
    for proc in agents:
        assert proc.wait(timeout=60) == 0

    # The new version is in MLflow with both devices' updates in its lineage.
    backend = load_config(federation.tier1_path, BackendConfig)
    registry = ModelRegistry(backend)
    assert registry.versions() == [1, 2]
    lineage = registry.load(2).lineage
    assert sorted(u["device_id"] for u in lineage["updates"]) == sorted(DEVICES)
    assert lineage["base_version"] == 1

    for device_id in DEVICES:
        status = federation.agent_status(device_id)
        before, after = status["evals"]["1"], status["evals"]["2"]
        assert after < before, f"{device_id}: held-out loss {before:.4f} -> {after:.4f} did not improve"
        state = federation.agent_configs[device_id].parent / "state"
        assert len(Outbox(state / "outbox.db")) == 0  # deleted only after PUBACK
        audit = AuditLog(state / "audit.db")
        assert audit.verify().ok
        events = [r["event"] for r in audit.rows()]
        assert events.count("model_install") == 2
        assert "policy_decision" in events and "export" in events


def test_agents_ran_from_the_device_only_environment() -> None:
    """The e2e agents use FEDNESTD_AGENT_PYTHON when `make test` provides the agent-only venv."""
    if not os.environ.get("FEDNESTD_AGENT_PYTHON"):
        pytest.skip("FEDNESTD_AGENT_PYTHON not set: run through `make test` to use the device venv")
    from fednestd.backend.federation import agent_command

    assert agent_command()[0] == os.environ["FEDNESTD_AGENT_PYTHON"]
