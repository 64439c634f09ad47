"""X.509 for the MQTT link: one CA, a broker certificate, one client certificate per identity.

The broker maps a client certificate's common name to the MQTT username
(`use_identity_as_username`), and the ACL grants topics by that name, so the CN *is* the device id
(or the bridge's identity). Keys are ECDSA P-256, signatures SHA-256: small, fast on devices, and
accepted by Mosquitto's OpenSSL and Python's `ssl` alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_FILE_MODE = 0o600
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825
# Backdate a little so a certificate issued a moment ago verifies on a peer whose clock lags.
_CLOCK_SKEW = dt.timedelta(minutes=5)
# Characters that MQTT treats as topic syntax: a CN holding them would break the ACL's %u patterns.
_FORBIDDEN_CN_CHARS = frozenset("/+#\0")


class PkiError(Exception):
    """Base class for certificate problems."""


class InvalidCommonName(PkiError, ValueError):
    """A common name that cannot serve as an MQTT username in the broker ACL."""


class CertificateFormatError(PkiError, ValueError):
    """Bytes or a file that do not hold the expected PEM certificate or key."""


def create_ca(
    out_dir: Path, name: str = "fednestd-ca", *, valid_days: int = CA_VALID_DAYS
) -> tuple[Path, Path]:
    """Create a self-signed CA; returns (ca.pem, ca.key). The CA may sign leaves only (pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    not_before = _now() - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(out_dir, "ca", cert, key)


def issue_server_cert(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    name: str = "mqtt-broker",
    dns: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1",),
    *,
    valid_days: int = LEAF_VALID_DAYS,
) -> tuple[Path, Path]:
    """Issue the broker's certificate; clients check the host they dial against these SANs."""
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    try:
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as exc:
        raise PkiError(f"server certificate {name!r}: bad IP address in ips={list(ips)!r}: {exc}") from exc
    if not sans:
        raise PkiError(f"server certificate {name!r} needs at least one DNS name or IP address")
    extensions: list[x509.ExtensionType] = [
        x509.SubjectAlternativeName(sans),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    ]
    return _issue_leaf(ca_cert, ca_key, out_dir, name, extensions, valid_days)


def issue_client_cert(
    ca_cert: Path, ca_key: Path, common_name: str, out_dir: Path, *, valid_days: int = LEAF_VALID_DAYS
) -> tuple[Path, Path]:
    """Issue `<cn>.pem` / `<cn>.key` for a device or the bridge; the CN becomes its MQTT username."""
    _check_common_name(common_name)
    extensions: list[x509.ExtensionType] = [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]
    return _issue_leaf(ca_cert, ca_key, out_dir, common_name, extensions, valid_days)


def cert_common_name(cert_pem: bytes) -> str:
    """The subject CN, i.e. the identity the broker will see for this certificate."""
    cert = _load_cert(cert_pem, "certificate")
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise CertificateFormatError(f"certificate {cert.subject.rfc4514_string()!r} has no common name")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def verify_issued_by(cert_pem: bytes, ca_pem: bytes, *, at: dt.datetime | None = None) -> bool:
    """True when `ca_pem` (a CA certificate) signed `cert_pem` and both are valid at `at` (default now).

    Malformed PEM raises CertificateFormatError: that is a caller's bug, not an untrusted peer.
    """
    cert = _load_cert(cert_pem, "certificate")
    ca = _load_cert(ca_pem, "CA certificate")
    when = at if at is not None else _now()
    if when.tzinfo is None:
        raise ValueError("verify_issued_by: `at` must be timezone-aware")
    if not _is_ca(ca) or not (_valid_at(cert, when) and _valid_at(ca, when)):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issue_leaf(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    common_name: str,
    extensions: list[x509.ExtensionType],
    valid_days: int,
) -> tuple[Path, Path]:
    ca, signing_key = _load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before = _now() - _CLOCK_SKEW
    # A leaf must not outlive its CA: clients would reject it from that day on anyway.
    not_after = min(not_before + dt.timedelta(days=valid_days), ca.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return _write_pair(out_dir, common_name, builder.sign(signing_key, hashes.SHA256()), key)


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = _load_cert(ca_cert.read_bytes(), f"CA certificate {ca_cert}")
    try:
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateFormatError(f"{ca_key}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateFormatError(f"{ca_key}: expected an EC private key, got {type(key).__name__}")
    if _spki(key.public_key()) != _spki(ca.public_key()):
        raise PkiError(f"{ca_key} is not the key of {ca_cert}")
    return ca, key


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateFormatError(f"{what}: not a PEM X.509 certificate: {exc}") from exc


def _write_pair(
    out_dir: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(key_path, key_pem, KEY_FILE_MODE)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # O_CREAT's mode only applies to new files (and is masked by umask): chmod makes it exact.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def _check_common_name(common_name: str) -> None:
    if not common_name or len(common_name) > 64:
        raise InvalidCommonName(f"common name must be 1-64 characters, got {common_name!r}")
    bad = sorted(_FORBIDDEN_CN_CHARS.intersection(common_name))
    if bad or common_name != common_name.strip():
        raise InvalidCommonName(
            f"common name {common_name!r} contains MQTT topic characters or surrounding spaces: {bad}"
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, when: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= when <= cert.not_valid_after_utc


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
