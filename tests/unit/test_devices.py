"""The bridge's identity check: topic id, envelope id and the enrolled certificate's CN must agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fednestd.backend.devices import DeviceRegistry, EnrollmentError
from fednestd.shared import crypto, pki
from fednestd.shared.envelope import EnvelopeError


@pytest.fixture
def registry(tmp_path: Path) -> tuple[DeviceRegistry, Path]:
    ca, ca_key = pki.create_ca(tmp_path / "pki")
    crypto.generate_signing_key(tmp_path / "backend.key")
    reg = DeviceRegistry(tmp_path / "devices", ca)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    (tmp_path / "egress.rego").write_text("package fednestd.egress\n")
    for device in ("dev-a", "dev-b"):
        reg.enroll(device, ca_key, tmp_path / device, tmp_path / "backend.pub", "127.0.0.1", 8883, data,
                   [tmp_path / "egress.rego"])
    return reg, tmp_path


def _code(fn, *args) -> EnvelopeError:  # noqa: ANN001
    with pytest.raises(EnvelopeError) as info:
        fn(*args)
    return info.value


def test_matching_ids_pass(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, _ = registry
    assert reg.check_sender("dev-a", "dev-a").device_id == "dev-a"


def test_envelope_naming_another_device_is_refused(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, _ = registry
    err = _code(reg.check_sender, "dev-a", "dev-b")
    assert err.code == "device_mismatch" and "envelope names device 'dev-b'" in err.detail


def test_certificate_cn_that_disagrees_with_the_topic_is_refused(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, _ = registry
    shutil.copyfile(reg.root / "dev-b" / "cert.pem", reg.root / "dev-a" / "cert.pem")
    err = _code(reg.check_sender, "dev-a", "dev-a")
    assert err.code == "device_mismatch" and "certificate CN 'dev-b' differs from device 'dev-a'" in err.detail


def test_certificate_from_another_ca_is_refused(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, tmp = registry
    other_ca, other_key = pki.create_ca(tmp / "other-ca")
    cert, _ = pki.issue_client_cert(other_ca, other_key, "dev-a", tmp / "other")
    shutil.copyfile(cert, reg.root / "dev-a" / "cert.pem")
    assert _code(reg.check_sender, "dev-a", "dev-a").code == "untrusted_certificate"


def test_unknown_and_revoked_devices(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, _ = registry
    assert _code(reg.check_sender, "dev-z", "dev-z").code == "unknown_device"
    assert _code(reg.check_sender, "../etc", "../etc").code == "unknown_device"
    reg.revoke("dev-b")
    assert _code(reg.check_sender, "dev-b", "dev-b").code == "revoked_device"


def test_bad_device_ids_cannot_be_enrolled(registry: tuple[DeviceRegistry, Path]) -> None:
    reg, tmp = registry
    with pytest.raises(EnrollmentError, match="must match"):
        reg.enroll("Bad/Id", tmp / "pki" / "ca.key", tmp / "x", tmp / "backend.pub", "h", 1, tmp / "d.jsonl", [])
