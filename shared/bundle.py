"""The signed device bundle: files plus a manifest of their sha256, signed by the backend key.

Shared so the backend writes and the device verifies exactly the same format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fednestd.shared import crypto
from fednestd.shared.config import ModelConfig

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "fednestd.bundle/1"


class BundleError(ValueError):
    """A bundle that must not be installed, saying which file or check failed."""


@dataclass(frozen=True)
class BundleManifest:
    version: int
    model: ModelConfig
    files: dict[str, str]
    created_at: str

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": self.version,
            "model": self.model.model_dump(),
            "files": dict(sorted(self.files.items())),
            "created_at": self.created_at,
        }
        return json.dumps(body, sort_keys=True, indent=1).encode()


def seal(directory: Path, version: int, model: ModelConfig, created_at: str, key: Ed25519PrivateKey) -> Path:
    """Hash every file in `directory`, write the manifest and its detached signature."""
    files = {
        p.name: crypto.sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }
    manifest = BundleManifest(version=version, model=model, files=files, created_at=created_at).to_bytes()
    (directory / MANIFEST).write_bytes(manifest)
    (directory / SIGNATURE).write_text(crypto.sign(key, manifest))
    return directory / MANIFEST


def verify(directory: Path, key: Ed25519PublicKey) -> BundleManifest:
    """Check the signature, then every file's hash; no unlisted files are allowed."""
    try:
        raw = (directory / MANIFEST).read_bytes()
        signature = (directory / SIGNATURE).read_text().strip()
    except FileNotFoundError as exc:
        raise BundleError(f"{directory}: missing {Path(exc.filename).name}") from exc
    try:
        crypto.verify(key, raw, signature)
    except crypto.SignatureError as exc:
        raise BundleError(f"{directory}/{MANIFEST}: {exc}") from exc
    body = json.loads(raw)
    if body.get("format") != FORMAT:
        raise BundleError(f"{directory}: bundle format {body.get('format')!r}, expected {FORMAT!r}")
    files: dict[str, str] = body["files"]
    present = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST, SIGNATURE}
    if present - files.keys():
        raise BundleError(f"{directory}: files not in the manifest: {sorted(present - files.keys())}")
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{directory}: {name} is listed in the manifest but missing")
        if crypto.sha256_file(path) != digest:
            raise BundleError(f"{directory}: {name} does not match its sha256 in the manifest")
    return BundleManifest(
        version=int(body["version"]),
        model=ModelConfig.model_validate(body["model"]),
        files=files,
        created_at=body["created_at"],
    )
