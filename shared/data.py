"""Local JSONL text to byte-level training windows (numpy only: devices use it too)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file the trainer cannot use, naming the file and line."""


@dataclass(frozen=True)
class Split:
    train: list[str]
    heldout: list[str]


def read_jsonl(path: Path) -> list[str]:
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not JSON: {exc.msg}") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            texts.append(obj["text"])
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def split_heldout(texts: list[str], fraction: float) -> Split:
    """Held-out membership by content hash: stable across runs, versions and both tiers."""
    train, heldout = [], []
    for text in texts:
        bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") / 2**32
        (heldout if bucket < fraction else train).append(text)
    if not heldout:
        heldout.append(train.pop())
    return Split(train, heldout)


def encode_stream(texts: list[str]) -> np.ndarray:
    """Bytes of the texts, newline-joined: the byte vocabulary needs no tokenizer file."""
    return np.frombuffer("\n".join(texts).encode("utf-8") + b"\n", dtype=np.uint8).astype(np.int64)


def windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (input, next-byte target) windows covering the stream once."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(f"need more than {seq_len} bytes of text, have {len(stream)}")
    x = stream[: n * seq_len].reshape(n, seq_len)
    y = stream[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def sample_batches(
    stream: np.ndarray, seq_len: int, batch_size: int, steps: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random windows for training: `steps` batches of `batch_size`."""
    if len(stream) <= seq_len + 1:
        raise DataError(f"need more than {seq_len + 1} bytes of training text, have {len(stream)}")
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
        x = np.stack([stream[s : s + seq_len] for s in starts])
        y = np.stack([stream[s + 1 : s + seq_len + 1] for s in starts])
        batches.append((x, y))
    return batches
