"""LoRA product-space merge (ARCHITECTURE.md §1), pure numpy.

Device i changes expert e by dW_i = (alpha_i / r_i) * B_i @ A_i. The merge averages those products;
averaging A and B separately is biased because mean(B) @ mean(A) != mean(B @ A), and ranks may
differ between devices since only the product is ever added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

AdapterPairs = Mapping[str, tuple[np.ndarray, np.ndarray]]


def lora_product(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """Grouped delta: a `[E, r, in]`, b `[E, out, r]` -> `[E, out, in]` (float64 for exact sums)."""
    return scale * np.matmul(b.astype(np.float64), a.astype(np.float64))


def update_deltas(pairs: AdapterPairs, scale: float) -> dict[str, np.ndarray]:
    """One device's effective change to each adapted expert weight."""
    return {name: lora_product(a, b, scale) for name, (a, b) in pairs.items()}


def weighted_mean(deltas: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"need one weight per update, got {len(deltas)} updates and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    names = set(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if set(d) != names:
            raise ValueError(f"update {i} adapts {sorted(set(d) ^ names)[:3]} unlike update 0")
    return {name: sum(wi * d[name] for wi, d in zip(w, deltas, strict=True)) for name in sorted(names)}


def apply_delta(
    experts: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], lr: float = 1.0
) -> dict[str, np.ndarray]:
    """New expert weights: `W + lr * dW` for each adapted `<name>.weight`; others unchanged."""
    merged = {name: np.array(arr, copy=True) for name, arr in experts.items()}
    for base, d in delta.items():
        key = f"{base}.weight"
        if key not in merged:
            raise KeyError(f"delta for {base!r} has no expert weight {key!r}")
        if merged[key].shape != d.shape:
            raise ValueError(f"{key}: delta shape {d.shape} does not match weight {merged[key].shape}")
        merged[key] = (merged[key].astype(np.float64) + lr * d).astype(merged[key].dtype)
    return merged
