"""The device cycle without a network: install, train, policy, audit, outbox; denials and tampering."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fednestd.agent.daemon import Agent
from fednestd.backend.compiler import compile_bundle
from fednestd.shared import crypto, envelope
from fednestd.shared.announce import Announcement
from fednestd.shared.config import AgentConfig, ModelConfig
from fednestd.shared.model import build_model, partition_state

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "egress.rego"
LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
] * 30


@dataclass
class Backend:
    key_path: Path
    bundles: Path

    def announce(self, version: int, cfg: ModelConfig | None = None) -> bytes:
        cfg = cfg or ModelConfig()
        key = crypto.load_private_key(self.key_path)
        bundle_dir = self.bundles / f"v{version}"
        if not bundle_dir.exists():
            compile_bundle(cfg, partition_state(build_model(cfg)), version, self.bundles, key)
        manifest = (bundle_dir / "manifest.json").read_bytes()
        return Announcement(version, bundle_dir.as_uri(), hashlib.sha256(manifest).hexdigest(),
                            datetime.now(UTC).isoformat()).encode(key)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    root = tmp_path_factory.mktemp("backend")
    crypto.generate_signing_key(root / "backend.key")
    return Backend(root / "backend.key", root / "bundles")


def _agent(tmp_path: Path, backend: Backend, policy_data: dict | None = None) -> Agent:
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"text": line + f" {i}"}) + "\n" for i, line in enumerate(LINES)))
    crypto.generate_signing_key(tmp_path / "signing.key")
    cfg = AgentConfig(
        device_id="dev-a", data_path=data, state_dir=tmp_path / "state", signing_key=tmp_path / "signing.key",
        backend_public_key=crypto.public_key_path(backend.key_path), policy_paths=[POLICY],
        policy_data=policy_data or {},
        mqtt={"cert": tmp_path / "c.pem", "key": tmp_path / "c.key"},
        train={"steps": 15, "batch_size": 4, "seq_len": 32},
    )
    return Agent(cfg)


def test_allowed_update_is_signed_audited_and_queued(tmp_path: Path, backend: Backend) -> None:
    agent = _agent(tmp_path, backend)
    result = agent.handle_announcement(backend.announce(1))
    assert result is not None and result.decision is not None and result.decision.allow, result
    assert agent.updater.installed_version() == 1
    [item] = agent.outbox.pending()
    assert item.topic == "fl/v1/devices/dev-a/updates" and item.update_id == result.update_id
    env = envelope.decode(item.payload)
    envelope.verify_signature(env, crypto.load_public_key(agent.cfg.signing_key.with_suffix(".pub")))
    assert env.base_version == 1 and env.num_samples == 60
    assert any(abs(arr).max() > 0 for name, arr in env.tensors.items() if name.endswith("lora_B"))
    events = [r["event"] for r in agent.audit.rows()]
    assert events == ["model_install", "policy_decision"]
    # The same announcement again changes nothing.
    assert agent.handle_announcement(backend.announce(1)) is None
    assert len(agent.outbox) == 1


def test_policy_deny_is_audited_with_reasons_and_nothing_is_queued(tmp_path: Path, backend: Backend) -> None:
    agent = _agent(tmp_path, backend, policy_data={"fednestd": {"egress_config": {"max_total_bytes": 1024}}})
    result = agent.handle_announcement(backend.announce(1))
    assert result is not None and result.decision is not None and not result.decision.allow
    assert len(agent.outbox) == 0
    [row] = agent.audit.rows("policy_decision")
    payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
    assert payload["allow"] is False
    assert any(r.startswith("total_bytes ") and r.endswith("exceeds the limit of 1024") for r in payload["reasons"])
    assert agent.audit.verify().ok


def test_tampered_bundle_is_not_installed(tmp_path: Path, backend: Backend) -> None:
    ann = backend.announce(1)
    forged = tmp_path / "forged"
    shutil.copytree(backend.bundles / "v1", forged / "v1")
    with open(forged / "v1" / "training_model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    body = json.loads(ann)
    body["bundle_url"] = (forged / "v1").as_uri()
    key = crypto.load_private_key(backend.key_path)
    fields = (body["version"], body["bundle_url"], body["manifest_sha256"], body["created_at"])
    resigned = Announcement(*fields).encode(key)
    agent = _agent(tmp_path, backend)
    assert agent.handle_announcement(resigned) is None
    assert agent.updater.installed_version() is None
    assert len(agent.outbox) == 0
    [row] = agent.audit.rows("model_rejected")
    payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
    assert "training_model.onnx does not match its sha256" in payload["reason"]


def test_announcement_not_signed_by_the_backend_is_refused(tmp_path: Path, backend: Backend) -> None:
    body = json.loads(backend.announce(1))
    body["version"] = 7
    agent = _agent(tmp_path, backend)
    assert agent.handle_announcement(json.dumps(body).encode()) is None
    [row] = agent.audit.rows("model_rejected")
    payload = row["payload"] if isinstance(row["payload"], dict) else json.loads(row["payload"])
    assert "signature does not verify" in payload["reason"]
    assert agent.updater.installed_version() is None


def test_bundle_installs_over_http(tmp_path: Path, backend: Backend) -> None:
    import threading

    from fednestd.backend.compiler import bundle_server

    raw = json.loads(backend.announce(1))
    server = bundle_server(backend.bundles, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        key = crypto.load_private_key(backend.key_path)
        ann = Announcement(raw["version"], url, raw["manifest_sha256"], raw["created_at"]).encode(key)
        agent = _agent(tmp_path, backend)
        result = agent.handle_announcement(ann)
        assert result is not None and result.update_id is not None
        assert agent.updater.installed_version() == 1
    finally:
        server.shutdown()
        server.server_close()
