"""Confidence intervals for the project's per-subject metrics (scipy's bootstrap, seeded).

Every table that compares methods states a mean with its bootstrap 95 % interval, and a comparison of two
methods on the same subjects the paired difference with its interval (resampling subjects, not images).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

N_RESAMPLES = 2000


def bootstrap_ci(
    values: np.ndarray, level: float = 0.95, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs dropped; NaN for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan"), float("nan")
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    res = stats.bootstrap(
        (v,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_difference(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over subjects with both values, and its bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same subjects: {a.shape} vs {b.shape}")
    d = a - b
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = bootstrap_ci(d, level, seed)
    return float(d.mean()), low, high
