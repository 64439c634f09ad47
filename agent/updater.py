"""Download, verify and atomically install announced bundles; keep the previous one for rollback."""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fednestd.shared import bundle
from fednestd.shared.announce import Announcement

MAX_FILE_BYTES = 512 << 20


class UpdateError(ValueError):
    """A bundle that was not installed, and why."""


class ModelUpdater:
    def __init__(self, root: Path, backend_key: Ed25519PublicKey) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = backend_key

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    def installed_version(self) -> int | None:
        if not self.current_link.exists():
            return None
        return int(json.loads((self.current_link / bundle.MANIFEST).read_text())["version"])

    def install(self, ann: Announcement) -> Path:
        """Fetch into a staging dir, verify everything, then switch `current` with one rename."""
        staging = self.root / f".staging-v{ann.version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            base = ann.bundle_url.rstrip("/") + "/"
            manifest = _fetch(base + bundle.MANIFEST)
            if hashlib.sha256(manifest).hexdigest() != ann.manifest_sha256:
                raise UpdateError(f"v{ann.version}: manifest sha256 differs from the announcement")
            (staging / bundle.MANIFEST).write_bytes(manifest)
            (staging / bundle.SIGNATURE).write_bytes(_fetch(base + bundle.SIGNATURE))
            for name in json.loads(manifest)["files"]:
                if "/" in name or name.startswith("."):
                    raise UpdateError(f"v{ann.version}: refusing file name {name!r} in the manifest")
                (staging / name).write_bytes(_fetch(base + name))
            verified = bundle.verify(staging, self._key)
            if verified.version != ann.version:
                raise UpdateError(f"bundle says version {verified.version}, announcement says {ann.version}")
        except (bundle.BundleError, OSError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise UpdateError(str(exc)) from exc
        final = self.root / f"v{ann.version}"
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        tmp_link = self.root / ".current.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(final.name)
        tmp_link.replace(self.current_link)
        self._prune(keep={final.name, *self._previous()})
        return final

    def _previous(self) -> list[str]:
        versions = sorted(
            (p for p in self.root.glob("v*") if p.is_dir()), key=lambda p: int(p.name[1:]), reverse=True
        )
        return [p.name for p in versions[:2]]

    def _prune(self, keep: set[str]) -> None:
        for path in self.root.glob("v*"):
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _fetch(url: str) -> bytes:
    if not url.startswith(("file://", "https://", "http://")):
        raise UpdateError(f"unsupported bundle URL scheme: {url}")
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - scheme checked above
        data = resp.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise UpdateError(f"{url}: larger than {MAX_FILE_BYTES} bytes")
    return data
