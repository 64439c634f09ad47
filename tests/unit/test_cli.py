"""The admin and agent CLIs, driven as an operator would (no servers needed for these commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fednestd.agent.audit import AuditLog
from fednestd.agent.cli import app as agent_app
from fednestd.backend.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def tier1(tmp_path: Path) -> Path:
    path = tmp_path / "tier1.yaml"
    result = runner.invoke(app, ["init-config", "tier1", "--out", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pki", "init", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run/pki/clients/fednestd-bridge.pem").exists()  # where the template points
    return path


def test_pki_init_refuses_to_replace_an_existing_ca(tier1: Path) -> None:
    before = (tier1.parent / "run/pki/ca.pem").read_bytes()
    result = runner.invoke(app, ["pki", "init", "-c", str(tier1)])
    assert result.exit_code == 1 and "refusing to replace" in result.output
    assert (tier1.parent / "run/pki/ca.pem").read_bytes() == before


def test_enroll_list_revoke_and_reenroll(tier1: Path, tmp_path: Path) -> None:
    data = tmp_path / "local.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    enroll = ["devices", "enroll", "truck-7", "--data", str(data), "--out", str(tmp_path / "kit"),
              "--policy", str(REPO / "policies/egress.rego"), "-c", str(tier1)]
    result = runner.invoke(app, enroll)
    assert result.exit_code == 0, result.output
    kit = tmp_path / "kit"
    assert {p.name for p in kit.iterdir()} >= {"agent.yaml", "truck-7.pem", "truck-7.key", "signing.key",
                                               "signing.pub", "ca.pem", "backend.pub", "egress.rego"}
    check = runner.invoke(app, ["check-config", str(kit / "agent.yaml"), "--tier", "tier2"])
    assert check.exit_code == 0, check.output
    again = runner.invoke(app, enroll)
    assert again.exit_code == 1 and "already enrolled" in again.output
    assert "active" in runner.invoke(app, ["devices", "list", "-c", str(tier1)]).output
    assert runner.invoke(app, ["devices", "revoke", "truck-7", "-c", str(tier1)]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["devices", "list", "-c", str(tier1)]).output
    unknown = runner.invoke(app, ["devices", "revoke", "no-such-box", "-c", str(tier1)])
    assert unknown.exit_code == 1 and "'no-such-box' is not enrolled" in unknown.output
    assert runner.invoke(app, enroll).exit_code == 0  # a revoked id may be enrolled again, with new keys


def test_models_list_and_promote(tier1: Path) -> None:
    assert runner.invoke(app, ["tier1", "init-model", "-c", str(tier1)]).exit_code == 0
    assert runner.invoke(app, ["models", "promote", "1", "-c", str(tier1)]).exit_code == 0
    listed = runner.invoke(app, ["models", "list", "-c", str(tier1)], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if line.strip("│ ").startswith("1"))
    assert "champion" in row and "candidate" in row and "init" in row


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "tier1.yaml"
    path.write_text("state_dir: x\nmqtt: {cert: a, key: b}\naggregation: {buffer_size: 0}\n")
    result = runner.invoke(app, ["models", "list", "-c", str(path)])
    assert result.exit_code == 2
    assert "aggregation.buffer_size: Input should be greater than or equal to 1" in result.output


def test_agent_audit_show_and_verify(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(json.dumps({"device_id": "a", "data_path": "d.jsonl", "state_dir": "state",
                               "signing_key": "k", "backend_public_key": "b", "policy_paths": ["p.rego"],
                               "mqtt": {"cert": "c", "key": "k"}}))
    log = AuditLog(tmp_path / "state" / "audit.db")
    log.record("model_install", {"version": 3})
    log.close()
    shown = runner.invoke(agent_app, ["audit", "show", "-c", str(cfg)], terminal_width=200)
    assert shown.exit_code == 0 and "model_install" in shown.output and '"version": 3' in shown.output
    verified = runner.invoke(agent_app, ["audit", "verify", "-c", str(cfg)])
    assert verified.exit_code == 0 and "chain intact" in verified.output
