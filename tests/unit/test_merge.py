"""The product-space merge is the weighted mean of (alpha/r) B_i A_i, exactly; naive A/B averaging is not."""

from __future__ import annotations

import numpy as np
import pytest

from fednestd.backend.aggregation import merge, strategies
from fednestd.backend.aggregator import Buffered, merge_updates
from fednestd.shared.config import AggregationConfig
from fednestd.shared.envelope import DeltaEnvelope

E, D_IN, D_OUT = 3, 6, 5


def _pair(rng: np.random.Generator, rank: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(E, rank, D_IN)).astype(np.float32), rng.normal(size=(E, D_OUT, rank)).astype(np.float32)


def _env(a: np.ndarray, b: np.ndarray, alpha: float, samples: int, base: int = 1) -> DeltaEnvelope:
    return DeltaEnvelope(device_id="dev", base_version=base, rank=a.shape[1], alpha=alpha, num_samples=samples,
                         tensors={"l.w.lora_A": a, "l.w.lora_B": b})


def test_merge_equals_weighted_mean_of_scaled_products() -> None:
    rng = np.random.default_rng(0)
    ranks, alphas, samples = [2, 4, 8], [4.0, 8.0, 2.0], [10, 30, 60]
    pairs = [_pair(rng, r) for r in ranks]
    weights = np.array(samples, dtype=np.float64) / sum(samples)
    expected = sum(
        w * (alpha / r) * np.einsum("eor,eri->eoi", b.astype(np.float64), a.astype(np.float64))
        for w, alpha, r, (a, b) in zip(weights, alphas, ranks, pairs, strict=True)
    )
    deltas = [merge.update_deltas({"l.w": p}, alpha / r) for p, alpha, r in zip(pairs, alphas, ranks, strict=True)]
    merged = merge.weighted_mean(deltas, samples)["l.w"]
    np.testing.assert_allclose(merged, expected, rtol=1e-12, atol=1e-12)

    w0 = rng.normal(size=(E, D_OUT, D_IN)).astype(np.float32)
    buffered = [Buffered(_env(a, b, alpha, n), 0) for (a, b), alpha, n in zip(pairs, alphas, samples, strict=True)]
    new, used = merge_updates({"l.w.weight": w0}, buffered, AggregationConfig(staleness_exponent=0.5))
    assert used == [float(n) for n in samples]  # staleness 0: weight = samples
    np.testing.assert_allclose(new["l.w.weight"], (w0 + expected).astype(np.float32), rtol=1e-6, atol=1e-6)


def test_averaging_a_and_b_separately_is_biased() -> None:
    rng = np.random.default_rng(1)
    rank, alpha = 4, 8.0
    pairs = [_pair(rng, rank) for _ in range(3)]
    product_space = merge.weighted_mean([merge.update_deltas({"x": p}, alpha / rank) for p in pairs], [1, 1, 1])["x"]
    mean_a = np.mean([a for a, _ in pairs], axis=0)
    mean_b = np.mean([b for _, b in pairs], axis=0)
    naive = merge.lora_product(mean_a, mean_b, alpha / rank)
    gap = np.abs(naive - product_space).max()
    assert gap > 0.1 * np.abs(product_space).max()


def test_staleness_weight_discounts_older_bases() -> None:
    assert strategies.staleness_weight(100, 0, 0.5) == 100.0
    assert strategies.staleness_weight(100, 3, 0.5) == pytest.approx(50.0)
    assert strategies.staleness_weight(100, 3, 0.0) == 100.0
    with pytest.raises(ValueError, match="negative"):
        strategies.staleness_weight(100, -1, 0.5)


def test_clip_bounds_one_updates_norm() -> None:
    delta = {"a": np.full((2, 2), 3.0), "b": np.full((1,), 4.0)}
    clipped = strategies.clip_by_norm(delta, 1.0)
    assert strategies.global_norm(clipped) == pytest.approx(1.0)
    unchanged = strategies.clip_by_norm(delta, 100.0)
    np.testing.assert_array_equal(unchanged["a"], delta["a"])


def test_mismatched_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="one weight per update"):
        merge.weighted_mean([{"x": np.zeros(1)}], [1.0, 2.0])
    with pytest.raises(ValueError, match="unlike update 0"):
        merge.weighted_mean([{"x": np.zeros(1)}, {"y": np.zeros(1)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="does not match weight"):
        merge.apply_delta({"x.weight": np.zeros((2, 2))}, {"x": np.zeros((3, 2))})
