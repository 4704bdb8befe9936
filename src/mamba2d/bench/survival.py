"""Survival outcomes of the benchmark's survival task: event times set by how clustered the lesions
are, censored independently.

The risk r = (s - 1) / (k - 1), the fraction of a slide's k lesion tiles in its largest cluster s,
sets a Weibull event time T = scale * exp(-beta * r) * Weibull(shape) in months; censoring times are
uniform on [0, c_max], with c_max calibrated to the configured censoring rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from mamba2d.bench.config import S_SURV, BenchmarkConfig, random_stream

__all__ = ["censoring_horizon", "survival_outcome"]


def _weibull_times(rng: np.random.Generator, risk: np.ndarray, config: BenchmarkConfig) -> np.ndarray:
    """Event times in months for risks (n,) in [0, 1]: scale * exp(-beta r) * Weibull(shape)."""
    return (config.survival_scale_months * np.exp(-config.survival_beta * risk)
            * rng.weibull(config.survival_shape, risk.shape))


@functools.lru_cache(maxsize=16)
def censoring_horizon(config: BenchmarkConfig) -> float:
    """c_max (months) such that censoring times uniform on [0, c_max] censor ``censoring_rate`` of
    slides in expectation, found on a fixed Monte-Carlo sample of the risk and time model."""
    rng = random_stream(S_SURV, 0xC0FFEE)
    n = 100_000
    k = rng.integers(config.lesion_min, config.lesion_max + 1, n)
    s = 1 + np.round(rng.random(n) * (k - 1))
    times = _weibull_times(rng, (s - 1) / (k - 1), config)

    def censored(c: float) -> float:  # P(C < T) with C ~ U(0, c) is E[min(T, c)] / c
        return float(np.minimum(times, c).mean() / c)

    lo, hi = 1e-6, float(times.max()) * 1e3
    for _ in range(100):  # censored() decreases in c
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if censored(mid) > config.censoring_rate else (lo, mid)
    return math.sqrt(lo * hi)


def survival_outcome(config: BenchmarkConfig, key: Sequence[int],
                     compactness: float) -> tuple[float, int, float]:
    """(observed months, censorship 1 = censored, true event months) of one slide.

    The event time depends only on ``compactness`` r; the censoring time is U(0, c_max), independent
    of it. Observed times are rounded to 0.01 month (at least 0.01).
    """
    rng = random_stream(S_SURV, *key)
    event = float(_weibull_times(rng, np.asarray([compactness]), config)[0])
    cens = float(rng.uniform(0.0, censoring_horizon(config)))
    observed = max(round(min(event, cens), 2), 0.01)
    return observed, int(cens < event), event
