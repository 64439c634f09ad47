"""The agent's full cycle in the real device install: a venv with only `pip install .[agent]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fednestd.shared import crypto

FORBIDDEN = ("torch", "deepspeed", "mlflow", "transformers", "peft")
REPO = Path(__file__).resolve().parents[2]

CYCLE = """
import json, sys
from pathlib import Path
from fednestd.agent.daemon import Agent
from fednestd.shared.config import AgentConfig, load_config
agent = Agent(load_config(Path(sys.argv[1]), AgentConfig))
result = agent.handle_announcement(Path(sys.argv[2]).read_bytes())
print(json.dumps({
    "allow": result.decision.allow, "update_id": result.update_id, "heldout": result.heldout_loss,
    "queued": len(agent.outbox), "loaded": sorted(m for m in %r if m in sys.modules),
}))
""".replace("%r", repr(FORBIDDEN))


@pytest.fixture(scope="module")
def agent_python() -> str:
    python = os.environ.get("FEDNESTD_AGENT_PYTHON")
    if not python:
        pytest.skip("FEDNESTD_AGENT_PYTHON is not set (`make test` builds the device venv and sets it)")
    return python


def test_device_venv_has_none_of_the_backend_stack(agent_python: str) -> None:
    probe = "import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m)]))"
    out = subprocess.run([agent_python, "-c", probe % (FORBIDDEN,)], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == []
    prefix = subprocess.run([agent_python, "-c", "import sys; print(sys.prefix)"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert Path(prefix).resolve() != Path(sys.prefix).resolve()


def test_full_cycle_runs_in_the_device_venv(agent_python: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_agent_cycle import LINES, Backend  # the same offline backend the unit tests use

    crypto.generate_signing_key(tmp_path / "backend.key")
    backend = Backend(tmp_path / "backend.key", tmp_path / "bundles")
    (tmp_path / "ann.json").write_bytes(backend.announce(1))
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"text": f"{line} {i}"}) + "\n" for i, line in enumerate(LINES)))
    crypto.generate_signing_key(tmp_path / "signing.key")
    (tmp_path / "agent.yaml").write_text(json.dumps({
        "device_id": "edge-1", "data_path": str(data), "state_dir": str(tmp_path / "state"),
        "signing_key": "signing.key", "backend_public_key": "backend.pub",
        "policy_paths": [str(REPO / "policies" / "egress.rego")],
        "mqtt": {"cert": "c.pem", "key": "c.key"}, "train": {"steps": 10, "batch_size": 4, "seq_len": 32},
    }))
    out = subprocess.run([agent_python, "-c", CYCLE, str(tmp_path / "agent.yaml"), str(tmp_path / "ann.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["allow"] is True and result["queued"] == 1 and result["update_id"]
    assert 0 < result["heldout"] < 10
    assert result["loaded"] == []
