"""Configs: the starter templates are valid, and a bad file names the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednestd.backend import templates
from fednestd.shared.config import AgentConfig, BackendConfig, ConfigError, load_config


def test_templates_load_and_resolve_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "tier1.yaml").write_text(templates.TIER1)
    (tmp_path / "agent.yaml").write_text(templates.TIER2)
    backend = load_config(tmp_path / "tier1.yaml", BackendConfig)
    agent = load_config(tmp_path / "agent.yaml", AgentConfig)
    assert backend.state_dir == tmp_path / "run/backend"
    assert backend.tracking_uri == f"sqlite:///{tmp_path / 'run/backend/mlflow.db'}"
    assert agent.mqtt.cert == tmp_path / "vehicle-0001.pem"
    assert agent.policy_paths == [Path("/etc/fednestd/policies/egress.rego")]
    assert agent.train.steps == 30 and backend.aggregation.buffer_size == 2


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (("steps: 30", "steps: -1"), "train.steps: Input should be greater than or equal to 1"),
        (("device_id: vehicle-0001", "device_id: Vehicle 1"), "device_id: String should match pattern"),
        (("port: 8883", "port: eighty"), "mqtt.port: Input should be a valid integer"),
        (("trainer: ort", "trainer: tflite"), "trainer: Input should be 'ort'"),
        (("threads: 1", "threads: 1\n  turbo: true"), "train.turbo: Extra inputs are not permitted"),
    ],
)
def test_bad_agent_config_names_field_and_reason(tmp_path: Path, edit: tuple[str, str], fragment: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(templates.TIER2.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path, AgentConfig)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_bad_backend_model_sizes_are_explained(tmp_path: Path) -> None:
    path = tmp_path / "tier1.yaml"
    path.write_text(templates.TIER1.replace("top_k: 2 ", "top_k: 9 "))
    with pytest.raises(ConfigError, match=r"model: Value error, top_k \(9\) cannot exceed n_experts \(4\)"):
        load_config(path, BackendConfig)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml", AgentConfig)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml", AgentConfig)
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", AgentConfig)
