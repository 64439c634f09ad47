"""The delta envelope: round trip, signature, and a specific reason for every kind of bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import save

from fednestd.shared import envelope
from fednestd.shared.config import ModelConfig
from fednestd.shared.envelope import DeltaEnvelope, EnvelopeError
from fednestd.shared.model import adapter_shapes

CFG = ModelConfig()
SHAPES = adapter_shapes(CFG)


def _tensors(rank: int = CFG.lora_rank) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in SHAPES.items():
        s = list(shape)
        s[1 if name.endswith("lora_A") else 2] = rank
        out[name] = rng.normal(size=s).astype(np.float32)
    return out


def _env(**kw: object) -> DeltaEnvelope:
    args: dict = dict(device_id="dev-a", base_version=1, rank=CFG.lora_rank, alpha=CFG.lora_alpha,
                      num_samples=64, tensors=_tensors(), metrics={"train_loss_last": 2.5})
    args.update(kw)
    return DeltaEnvelope(**args)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _resave(data: bytes, mutate) -> bytes:  # noqa: ANN001
    """Re-serialise an envelope after changing its metadata or tensors."""
    header = envelope.read_header(data)
    meta = dict(header["__metadata__"])
    tensors = dict(envelope.decode(data).tensors)
    mutate(meta, tensors)
    return save(tensors, metadata=meta)


def test_round_trip_and_signature(key: Ed25519PrivateKey) -> None:
    env = _env()
    data = envelope.encode(env, key)
    back = envelope.decode(data)
    assert back.update_id == env.update_id and back.device_id == "dev-a" and back.base_version == 1
    assert back.metrics == {"train_loss_last": 2.5}
    for name, arr in env.tensors.items():
        np.testing.assert_array_equal(back.tensors[name], arr)
    envelope.verify_signature(back, key.public_key())
    envelope.check_against_model(back, SHAPES)


def test_other_rank_is_accepted_for_product_space_merging(key: Ed25519PrivateKey) -> None:
    env = envelope.decode(envelope.encode(_env(rank=2, tensors=_tensors(2)), key))
    envelope.check_against_model(env, SHAPES)


@pytest.mark.parametrize(
    ("mutate", "code", "fragment"),
    [
        (lambda m, t: m.pop("device_id"), "malformed", "missing metadata keys: device_id"),
        (lambda m, t: m.update(extra="x"), "malformed", "unknown metadata keys: extra"),
        (lambda m, t: m.update(schema="fednestd.delta/0"), "bad_schema", "fednestd.delta/0"),
        (lambda m, t: m.update(update_id="not-a-uuid"), "malformed", "is not a UUID"),
        (lambda m, t: m.update(update_id="6f1c1c52-9b8e-4b5e-9d2a-1a2b3c4d5e6f"), "malformed", "not a UUIDv7"),
        (lambda m, t: m.update(base_version="two"), "malformed", "base_version 'two' is not an integer"),
        (lambda m, t: m.update(metrics="[1,2]"), "malformed", "metrics must be a JSON object"),
        (lambda m, t: m.update(device_id="Bad Id"), "malformed", "not a valid device id"),
        (lambda m, t: t.update({"tok_emb.weight": np.zeros((2, 2), np.float32)}), "unknown_tensor",
         "'tok_emb.weight' is not a LoRA adapter tensor"),
        (lambda m, t: t.pop("blocks.0.moe.experts.w_in.lora_B"), "unknown_tensor", "has no matching"),
        (lambda m, t: t.update({"blocks.0.moe.experts.w_in.lora_A": t["blocks.0.moe.experts.w_in.lora_A"]
                                .astype(np.float16)}), "bad_dtype", "dtype 'F16'"),
        (lambda m, t: t["blocks.1.moe.experts.w_out.lora_B"].__setitem__((0, 0, 0), np.nan), "non_finite",
         "'blocks.1.moe.experts.w_out.lora_B' holds 1 NaN/Inf"),
        (lambda m, t: t["blocks.1.moe.experts.w_out.lora_A"].__setitem__((0, 0, 0), np.inf), "non_finite",
         "NaN/Inf"),
    ],
)
def test_bad_envelopes_are_refused_with_their_reason(key: Ed25519PrivateKey, mutate, code, fragment) -> None:  # noqa: ANN001
    data = _resave(envelope.encode(_env(), key), mutate)
    with pytest.raises(EnvelopeError) as info:
        envelope.decode(data)
    assert info.value.code == code
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "too short"),
        (struct.pack("<Q", 10_000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 5) + b"nope!", "header is not JSON"),
        (struct.pack("<Q", 2) + b"{}", "no __metadata__"),
    ],
)
def test_garbage_is_malformed(data: bytes, fragment: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        envelope.decode(data)
    assert info.value.code == "malformed" and fragment in str(info.value)


def test_tampered_tensor_or_metadata_fails_the_signature(key: Ed25519PrivateKey) -> None:
    data = envelope.encode(_env(), key)
    tampered = _resave(data, lambda m, t: t["blocks.0.moe.experts.w_in.lora_B"].__imul__(2.0))
    with pytest.raises(EnvelopeError) as info:
        envelope.verify_signature(envelope.decode(tampered), key.public_key())
    assert info.value.code == "bad_signature"
    relabelled = _resave(data, lambda m, t: m.update(num_samples="100000"))
    with pytest.raises(EnvelopeError, match="bad_signature"):
        envelope.verify_signature(envelope.decode(relabelled), key.public_key())
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(EnvelopeError, match="bad_signature"):
        envelope.verify_signature(envelope.decode(data), other)


def test_model_check_names_unknown_tensor_and_wrong_shape(key: Ed25519PrivateKey) -> None:
    t = _tensors()
    t["blocks.7.moe.experts.w_in.lora_A"] = t.pop("blocks.0.moe.experts.w_in.lora_A")
    t["blocks.7.moe.experts.w_in.lora_B"] = t.pop("blocks.0.moe.experts.w_in.lora_B")
    env = envelope.decode(envelope.encode(_env(tensors=t), key))
    with pytest.raises(EnvelopeError) as info:
        envelope.check_against_model(env, SHAPES)
    assert info.value.code == "unknown_tensor" and "blocks.7" in str(info.value)

    t = _tensors()
    t["blocks.0.moe.experts.w_out.lora_B"] = np.zeros((CFG.n_experts, 3, CFG.lora_rank), np.float32)
    env = envelope.decode(envelope.encode(_env(tensors=t), key))
    with pytest.raises(EnvelopeError) as info:
        envelope.check_against_model(env, SHAPES)
    assert info.value.code == "bad_shape" and "expected [4, 64, 4]" in str(info.value)


def test_metadata_is_strings_only_and_json_metrics(key: Ed25519PrivateKey) -> None:
    meta = envelope.read_header(envelope.encode(_env(), key))["__metadata__"]
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["metrics"]) == {"train_loss_last": 2.5}
    assert set(meta) == envelope.METADATA_KEYS
