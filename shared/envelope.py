"""The delta envelope (ARCHITECTURE.md §4): one safetensors file, strings-only metadata, signed.

Decoding is strict because the envelope crosses a trust boundary: every problem is reported as an
`EnvelopeError` whose `code` is stable (dead-letter records and metrics key on it) and whose
message says what was wrong and where.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import uuid6
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fednestd.shared import crypto
from fednestd.shared.topics import DEVICE_ID_RE

SCHEMA = "fednestd.delta/1"
MAX_ENVELOPE_BYTES = 64 << 20
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
METADATA_KEYS = frozenset(
    {
        "schema",
        "update_id",
        "device_id",
        "base_version",
        "rank",
        "alpha",
        "num_samples",
        "metrics",
        "created_at",
        "policy_revision",
        "signature",
    }
)
_DTYPES = {"F32": np.float32}


class EnvelopeError(ValueError):
    """An envelope refused for a specific, named reason."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class DeltaEnvelope:
    device_id: str
    base_version: int
    rank: int
    alpha: float
    num_samples: int
    tensors: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)
    policy_revision: str = ""
    update_id: str = field(default_factory=lambda: str(uuid6.uuid7()))
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    signature: str = ""

    def metadata(self) -> dict[str, str]:
        """The strings-only metadata, without the signature."""
        return {
            "schema": SCHEMA,
            "update_id": self.update_id,
            "device_id": self.device_id,
            "base_version": str(self.base_version),
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "num_samples": str(self.num_samples),
            "metrics": json.dumps(dict(self.metrics), sort_keys=True),
            "created_at": self.created_at,
            "policy_revision": self.policy_revision,
        }

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter_pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Map each adapted parameter name to its (A, B)."""
        pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in self.tensors:
            if name.endswith(".lora_A"):
                base = name[: -len(".lora_A")]
                pairs[base] = (self.tensors[name], self.tensors[base + ".lora_B"])
        return pairs


def signing_payload(metadata: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> bytes:
    """Canonical bytes the device signs: metadata plus each tensor's name, dtype, shape and digest."""
    digest = [
        [name, str(tensors[name].dtype), list(tensors[name].shape),
         hashlib.sha256(np.ascontiguousarray(tensors[name]).tobytes()).hexdigest()]
        for name in sorted(tensors)
    ]
    body = {"metadata": {k: metadata[k] for k in sorted(metadata) if k != "signature"}, "tensors": digest}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encode(envelope: DeltaEnvelope, key: Ed25519PrivateKey) -> bytes:
    """Serialise and sign; the result is what goes on the wire and into the outbox."""
    tensors = {name: np.ascontiguousarray(arr, dtype=np.float32) for name, arr in envelope.tensors.items()}
    metadata = envelope.metadata()
    metadata["signature"] = crypto.sign(key, signing_payload(metadata, tensors))
    return st_save(tensors, metadata=metadata)


def read_header(data: bytes) -> dict:
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError("too_large", f"{len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit")
    if len(data) < 8:
        raise EnvelopeError("malformed", f"{len(data)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise EnvelopeError("malformed", f"header length {size} runs past the end of the {len(data)}-byte payload")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError("malformed", f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise EnvelopeError("malformed", "header is not a JSON object")
    return header


def decode(data: bytes) -> DeltaEnvelope:
    """Parse and check structure; the signature is checked separately (the key depends on who sent it)."""
    header = read_header(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise EnvelopeError("malformed", "no __metadata__ in the safetensors header")
    missing = sorted(METADATA_KEYS - meta.keys())
    if missing:
        raise EnvelopeError("malformed", f"missing metadata keys: {', '.join(missing)}")
    unknown = sorted(meta.keys() - METADATA_KEYS)
    if unknown:
        raise EnvelopeError("malformed", f"unknown metadata keys: {', '.join(unknown)}")
    if meta["schema"] != SCHEMA:
        raise EnvelopeError("bad_schema", f"schema {meta['schema']!r}, expected {SCHEMA!r}")
    try:
        parsed = uuid.UUID(meta["update_id"])
    except ValueError as exc:
        raise EnvelopeError("malformed", f"update_id {meta['update_id']!r} is not a UUID") from exc
    if parsed.version != 7:
        raise EnvelopeError("malformed", f"update_id {meta['update_id']!r} is not a UUIDv7")
    if not DEVICE_ID_RE.match(meta["device_id"]):
        raise EnvelopeError("malformed", f"device_id {meta['device_id']!r} is not a valid device id")
    base_version = _int_field(meta, "base_version", minimum=1)
    rank = _int_field(meta, "rank", minimum=1)
    num_samples = _int_field(meta, "num_samples", minimum=1)
    try:
        alpha = float(meta["alpha"])
    except ValueError as exc:
        raise EnvelopeError("malformed", f"alpha {meta['alpha']!r} is not a number") from exc
    if not math.isfinite(alpha) or alpha <= 0:
        raise EnvelopeError("malformed", f"alpha {meta['alpha']!r} must be a positive finite number")
    metrics = _metrics_field(meta["metrics"])
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise EnvelopeError("malformed", f"header entry {name!r} is not a tensor description")
        if info.get("dtype") not in _DTYPES:
            raise EnvelopeError("bad_dtype", f"tensor {name!r} has dtype {info.get('dtype')!r}, expected F32")
        if not name.endswith(ADAPTER_SUFFIXES):
            raise EnvelopeError("unknown_tensor", f"tensor {name!r} is not a LoRA adapter tensor")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for every framing problem
        raise EnvelopeError("malformed", f"tensor data unreadable: {exc}") from exc
    if not tensors:
        raise EnvelopeError("malformed", "envelope carries no tensors")
    for name, arr in tensors.items():
        partner = name[:-1] + ("B" if name.endswith("A") else "A")
        if partner not in tensors:
            raise EnvelopeError("unknown_tensor", f"tensor {name!r} has no matching {partner!r}")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise EnvelopeError("non_finite", f"tensor {name!r} holds {bad} NaN/Inf values")
    return DeltaEnvelope(
        device_id=meta["device_id"],
        base_version=base_version,
        rank=rank,
        alpha=alpha,
        num_samples=num_samples,
        tensors=tensors,
        metrics=metrics,
        policy_revision=meta["policy_revision"],
        update_id=meta["update_id"],
        created_at=meta["created_at"],
        signature=meta["signature"],
    )


def verify_signature(envelope: DeltaEnvelope, key: Ed25519PublicKey) -> None:
    try:
        crypto.verify(key, signing_payload(envelope.metadata(), envelope.tensors), envelope.signature)
    except crypto.SignatureError as exc:
        raise EnvelopeError("bad_signature", f"update {envelope.update_id} from {envelope.device_id}: {exc}") from exc


def check_against_model(envelope: DeltaEnvelope, adapter_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse tensors the model does not have, or with the wrong shape for the envelope's rank.

    `adapter_shapes` maps adapter tensor names to their shapes at the model's own rank; the rank
    axis (1 for lora_A, 2 for lora_B) may differ, since product-space merging accepts any rank.
    """
    for name, arr in envelope.tensors.items():
        if name not in adapter_shapes:
            raise EnvelopeError("unknown_tensor", f"tensor {name!r} is not an adapter of this model")
        expected = list(adapter_shapes[name])
        expected[1 if name.endswith(".lora_A") else 2] = envelope.rank
        if list(arr.shape) != expected:
            raise EnvelopeError(
                "bad_shape", f"tensor {name!r} has shape {list(arr.shape)}, expected {expected} at rank {envelope.rank}"
            )


def _int_field(meta: Mapping[str, str], key: str, minimum: int) -> int:
    try:
        value = int(meta[key])
    except ValueError as exc:
        raise EnvelopeError("malformed", f"{key} {meta[key]!r} is not an integer") from exc
    if value < minimum:
        raise EnvelopeError("malformed", f"{key} {value} is below {minimum}")
    return value


def _metrics_field(raw: str) -> dict[str, float]:
    try:
        metrics = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise EnvelopeError("malformed", f"metrics is not JSON: {exc}") from exc
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) and math.isfinite(v) for v in metrics.values()
    ):
        raise EnvelopeError("malformed", "metrics must be a JSON object of finite numbers")
    return {str(k): float(v) for k, v in metrics.items()}
