"""Update weighting and robustness transforms, pure functions over arrays (FedBuff-style)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def staleness(current_version: int, base_version: int) -> int:
    return current_version - base_version


def staleness_weight(num_samples: int, staleness_steps: int, exponent: float) -> float:
    """Polynomial staleness discount (FedBuff / FedAsync): n * (1 + s) ** -a."""
    if staleness_steps < 0:
        raise ValueError(f"staleness {staleness_steps} is negative: the update's base is newer than the model")
    return float(num_samples) * (1.0 + staleness_steps) ** (-exponent)


def global_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(d))) for d in delta.values())))


def clip_by_norm(delta: Mapping[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """Bound one update's influence: scale it down to `max_norm` if its global norm is larger."""
    norm = global_norm(delta)
    factor = 1.0 if norm <= max_norm or norm == 0 else max_norm / norm
    return {name: d * factor for name, d in delta.items()}
