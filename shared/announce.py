"""Signed model announcements: what the backend broadcasts (retained) when a version is ready."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fednestd.shared import crypto


class AnnouncementError(ValueError):
    """An announcement that is malformed or not signed by the backend."""


@dataclass(frozen=True)
class Announcement:
    version: int
    bundle_url: str
    manifest_sha256: str
    created_at: str

    def _payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def encode(self, key: Ed25519PrivateKey) -> bytes:
        body = asdict(self) | {"signature": crypto.sign(key, self._payload())}
        return json.dumps(body, sort_keys=True).encode()


def decode(data: bytes, key: Ed25519PublicKey) -> Announcement:
    try:
        body = json.loads(data)
        signature = body.pop("signature")
        ann = Announcement(
            version=int(body["version"]),
            bundle_url=str(body["bundle_url"]),
            manifest_sha256=str(body["manifest_sha256"]),
            created_at=str(body["created_at"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnnouncementError(f"malformed announcement: {exc!r}") from exc
    try:
        crypto.verify(key, ann._payload(), signature)
    except crypto.SignatureError as exc:
        raise AnnouncementError(f"announcement of version {ann.version}: {exc}") from exc
    return ann
