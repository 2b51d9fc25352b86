"""The statistics every experiment reports: sample sd, t-intervals, their verdicts, and the
paired bootstrap. One implementation, so that every page's intervals mean the same thing."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def sample_sd(x: Sequence[float]) -> float:
    """Sample standard deviation (``ddof=1``) of the finite values; NaN for fewer than two."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.std(x, ddof=1)) if len(x) >= 2 else float("nan")


def t_interval(x: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of the finite values and its 95% t-interval.

    The interval is ``mean ± t_{0.975}(n-1) * sd / sqrt(n)`` with the sample sd; NaN bounds for
    fewer than two values (a single seed says nothing about noise).

    Example:
      >>> [round(v, 3) for v in t_interval([1.0, 2.0, 3.0])]
      [2.0, -0.484, 4.484]
    """
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(x) - 1)) * sample_sd(x) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, treatment: str, control: str) -> str:
    """Words for a 95% interval of ``treatment - control``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval (fewer than 2 seeds)"
    if lo <= 0 <= hi:
        return "within noise"
    return f"{treatment} better" if lo > 0 else f"{control} better"


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: ``statistic(idx)`` on all ``n`` items and the 95% percentile
    interval of ``statistic`` over ``resamples`` draws of ``n`` items with replacement. The
    same draw feeds both systems of a comparison inside ``statistic``: a paired bootstrap."""
    rng = np.random.default_rng(seed)
    draws = [statistic(rng.integers(0, n, n)) for _ in range(resamples)]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return statistic(np.arange(n)), float(lo), float(hi)


def power_paired_t(delta: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs whose
    differences have mean ``delta`` and standard deviation ``sd`` (noncentral t).

    Example:
      >>> round(power_paired_t(1.0, 1.0, 10, 0.05), 3)
      0.803
    """
    df, nc = n - 1, delta * math.sqrt(n) / sd
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    return float(1 - stats.nct.cdf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def power_tost(
    margin: float, sd: float, n: int, alpha: float, *, delta: float = 0.0, draws: int = 40000
) -> float:
    """Power of the paired equivalence test (two one-sided t-tests at level ``alpha``, margin
    ``± margin``) when the differences have mean ``delta`` and sd ``sd``; by simulation with a
    fixed seed, so the same arguments give the same number."""
    x = np.random.default_rng(0).normal(delta, sd, (draws, n))
    mean, se = x.mean(1), x.std(1, ddof=1) / math.sqrt(n)
    crit = float(stats.t.ppf(1 - alpha, n - 1))
    return float(np.mean((mean - crit * se > -margin) & (mean + crit * se < margin)))
