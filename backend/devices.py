"""Enrolled devices: the backend's record of each device's certificate and envelope-signing key.

Enrollment issues the device's TLS client certificate (CN = device id) and its Ed25519 signing key,
and writes a kit (keys, CA, backend public key, agent.yaml) to hand to the device. The bridge and
the aggregator check every update against this registry.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fednestd.shared import crypto, pki
from fednestd.shared.envelope import EnvelopeError
from fednestd.shared.topics import DEVICE_ID_RE


class EnrollmentError(ValueError):
    """A device id or kit that cannot be enrolled."""


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    cert_pem: bytes
    signing_key: Ed25519PublicKey
    revoked: bool


class DeviceRegistry:
    def __init__(self, root: Path, ca_cert: Path) -> None:
        self.root = root
        self.ca_cert = ca_cert
        self.root.mkdir(parents=True, exist_ok=True)

    def enroll(
        self,
        device_id: str,
        ca_key: Path,
        kit_dir: Path,
        backend_public_key: Path,
        mqtt_host: str,
        mqtt_port: int,
        data_path: Path,
        policy_paths: list[Path],
        state_dir: str = "state",
    ) -> Path:
        if not DEVICE_ID_RE.match(device_id):
            raise EnrollmentError(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern}")
        record = self.root / device_id
        if record.exists() and not (record / "revoked").exists():
            raise EnrollmentError(f"device {device_id!r} is already enrolled; revoke it first to re-enroll")
        kit_dir.mkdir(parents=True, exist_ok=True)
        cert, key = pki.issue_client_cert(self.ca_cert, ca_key, device_id, kit_dir)
        crypto.generate_signing_key(kit_dir / "signing.key")
        shutil.copyfile(self.ca_cert, kit_dir / "ca.pem")
        shutil.copyfile(backend_public_key, kit_dir / "backend.pub")
        for policy in policy_paths:  # the kit carries its policy: nothing refers back to this machine
            shutil.copyfile(policy, kit_dir / policy.name)
        shutil.rmtree(record, ignore_errors=True)
        record.mkdir()
        shutil.copyfile(cert, record / "cert.pem")
        shutil.copyfile(kit_dir / "signing.pub", record / "signing.pub")
        config = {
            "device_id": device_id,
            "data_path": str(data_path.resolve()),
            "state_dir": state_dir,
            "signing_key": "signing.key",
            "backend_public_key": "backend.pub",
            "policy_paths": [p.name for p in policy_paths],
            "mqtt": {"host": mqtt_host, "port": mqtt_port, "ca": "ca.pem", "cert": cert.name, "key": key.name},
        }
        (kit_dir / "agent.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return kit_dir / "agent.yaml"

    def identity(self, device_id: str) -> DeviceIdentity:
        record = self.root / device_id
        if not DEVICE_ID_RE.match(device_id) or not record.is_dir():
            raise EnvelopeError("unknown_device", f"device {device_id!r} is not enrolled")
        return DeviceIdentity(
            device_id=device_id,
            cert_pem=(record / "cert.pem").read_bytes(),
            signing_key=crypto.load_public_key(record / "signing.pub"),
            revoked=(record / "revoked").exists(),
        )

    def check_sender(self, topic_device_id: str, envelope_device_id: str) -> DeviceIdentity:
        """Topic id, envelope id and the enrolled certificate's CN must all name the same device."""
        if envelope_device_id != topic_device_id:
            raise EnvelopeError(
                "device_mismatch",
                f"envelope names device {envelope_device_id!r} but arrived on {topic_device_id!r}'s topic",
            )
        ident = self.identity(topic_device_id)
        if ident.revoked:
            raise EnvelopeError("revoked_device", f"device {topic_device_id!r} is revoked")
        cn = pki.cert_common_name(ident.cert_pem)
        if cn != topic_device_id:
            raise EnvelopeError("device_mismatch", f"certificate CN {cn!r} differs from device {topic_device_id!r}")
        if not pki.verify_issued_by(ident.cert_pem, self.ca_cert.read_bytes()):
            raise EnvelopeError("untrusted_certificate", f"{topic_device_id!r}'s certificate is not from this CA")
        return ident

    def revoke(self, device_id: str) -> None:
        self.identity(device_id)
        (self.root / device_id / "revoked").touch()

    def list(self) -> list[dict[str, str]]:
        out = []
        for record in sorted(p for p in self.root.iterdir() if p.is_dir()):
            ident = self.identity(record.name)
            out.append({"device_id": record.name, "status": "revoked" if ident.revoked else "active"})
        return out
