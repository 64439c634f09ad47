"""Model partitions on disk: one safetensors file per partition (numpy only, no pickle).

Kept apart from `model.py` so code without torch (devices, tools) can read and write them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

Parts = dict[str, dict[str, np.ndarray]]


def save_parts(parts: Mapping[str, Mapping[str, np.ndarray]], directory: Path,
               partitions: Iterable[str] = ("core", "experts")) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for part in partitions:
        path = directory / f"{part}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in parts[part].items()}, str(path))
        written.append(path)
    return written


def load_parts(directory: Path, partitions: Iterable[str] = ("core", "experts")) -> Parts:
    """Read the named partitions; partitions not stored (adapters, usually) come back empty."""
    parts: Parts = {"core": {}, "experts": {}, "adapters": {}}
    for part in partitions:
        parts[part] = load_file(str(directory / f"{part}.safetensors"))
    return parts
