"""Certificate issuance and checks, without any server."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fednestd.shared.pki import (
    CertificateFormatError,
    InvalidCommonName,
    PkiError,
    cert_common_name,
    create_ca,
    issue_client_cert,
    issue_server_cert,
    verify_issued_by,
)


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, Path]:
    return create_ca(tmp_path / "ca")


def _eku(pem: bytes) -> list[x509.ObjectIdentifier]:
    cert = x509.load_pem_x509_certificate(pem)
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_client_cert_carries_device_id_as_common_name(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = issue_client_cert(*ca, "dev-042", tmp_path / "out")
    assert (cert.name, key.name) == ("dev-042.pem", "dev-042.key")
    assert cert_common_name(cert.read_bytes()) == "dev-042"
    assert _eku(cert.read_bytes()) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_private_keys_are_owner_only(ca: tuple[Path, Path], tmp_path: Path) -> None:
    _, key = issue_client_cert(*ca, "dev-1", tmp_path / "out")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca[1].stat().st_mode) == 0o600


def test_server_cert_names_loopback(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert_path, _ = issue_server_cert(*ca, tmp_path / "out")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert _eku(cert_path.read_bytes()) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_chain_check_accepts_own_ca_and_rejects_another(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = issue_client_cert(*ca, "dev-1", tmp_path / "out")
    other_ca, _ = create_ca(tmp_path / "other")
    assert verify_issued_by(cert.read_bytes(), ca[0].read_bytes())
    assert not verify_issued_by(cert.read_bytes(), other_ca.read_bytes())


def test_same_subject_from_a_rogue_ca_is_rejected(ca: tuple[Path, Path], tmp_path: Path) -> None:
    # A rogue CA that copies the real CA's name: only the signature check can tell them apart.
    rogue_ca, rogue_key = create_ca(tmp_path / "rogue", name="fednestd-ca")
    forged, _ = issue_client_cert(rogue_ca, rogue_key, "dev-1", tmp_path / "rogue-out")
    assert not verify_issued_by(forged.read_bytes(), ca[0].read_bytes())


def test_chain_check_respects_validity_period(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = issue_client_cert(*ca, "dev-1", tmp_path / "out", valid_days=30)
    pem, ca_pem = cert.read_bytes(), ca[0].read_bytes()
    now = dt.datetime.now(dt.UTC)
    assert verify_issued_by(pem, ca_pem, at=now + dt.timedelta(days=29))
    assert not verify_issued_by(pem, ca_pem, at=now + dt.timedelta(days=31))
    assert not verify_issued_by(pem, ca_pem, at=now - dt.timedelta(days=1))


def test_leaf_cannot_act_as_ca(ca: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = issue_client_cert(*ca, "dev-1", tmp_path / "out")
    assert not verify_issued_by(cert.read_bytes(), cert.read_bytes())


@pytest.mark.parametrize("bad", ["", "dev/1", "dev+", "#", " dev", "d" * 65])
def test_common_names_that_break_mqtt_acls_are_refused(
    ca: tuple[Path, Path], tmp_path: Path, bad: str
) -> None:
    with pytest.raises(InvalidCommonName):
        issue_client_cert(*ca, bad, tmp_path / "out")


def test_garbage_pem_raises_a_format_error() -> None:
    with pytest.raises(CertificateFormatError):
        cert_common_name(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_mismatched_ca_key_is_refused(ca: tuple[Path, Path], tmp_path: Path) -> None:
    _, other_key = create_ca(tmp_path / "other")
    with pytest.raises(PkiError, match="is not the key of"):
        issue_client_cert(ca[0], other_key, "dev-1", tmp_path / "out")
