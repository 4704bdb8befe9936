"""Survival outcomes: Weibull event times set by a per-slide risk, censored independently.

A risk r in [0, 1] sets a Weibull event time T = scale * exp(-beta * r) * Weibull(shape) in months;
censoring times are uniform on [0, c_max], with c_max calibrated to a target censoring rate on a
Monte-Carlo sample of the risk distribution. The built-in benchmark's risk is the fraction of a
slide's k lesion tiles in its largest cluster s, r = (s - 1) / (k - 1); the spatial tasks of
:mod:`mamba2d.bench.taskdata` use their arrangement level.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from mamba2d.bench.config import S_SURV, BenchmarkConfig, random_stream

__all__ = ["censor", "censoring_horizon", "horizon_for_rate", "survival_outcome", "weibull_event_times"]


def weibull_event_times(rng: np.random.Generator, risk: np.ndarray, scale: float, beta: float,
                        shape: float) -> np.ndarray:
    """Event times in months for risks (n,) in [0, 1]: scale * exp(-beta r) * Weibull(shape)."""
    return scale * np.exp(-beta * risk) * rng.weibull(shape, risk.shape)


def horizon_for_rate(times: np.ndarray, rate: float) -> float:
    """c_max (months) such that censoring times uniform on [0, c_max] censor a fraction ``rate`` of
    event ``times`` in expectation (bisection; P(C < T) with C ~ U(0, c) is E[min(T, c)] / c)."""
    def censored(c: float) -> float:
        return float(np.minimum(times, c).mean() / c)

    lo, hi = 1e-6, float(times.max()) * 1e3
    for _ in range(100):  # censored() decreases in c
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if censored(mid) > rate else (lo, mid)
    return math.sqrt(lo * hi)


def censor(rng: np.random.Generator, event: float, horizon: float) -> tuple[float, int]:
    """(observed months, censorship 1 = censored) of one event time under U(0, ``horizon``) censoring.
    Observed times are rounded to 0.01 month (at least 0.01)."""
    cens = float(rng.uniform(0.0, horizon))
    return max(round(min(event, cens), 2), 0.01), int(cens < event)


def _weibull_times(rng: np.random.Generator, risk: np.ndarray, config: BenchmarkConfig) -> np.ndarray:
    return weibull_event_times(rng, risk, config.survival_scale_months, config.survival_beta,
                               config.survival_shape)


@functools.lru_cache(maxsize=16)
def censoring_horizon(config: BenchmarkConfig) -> float:
    """c_max (months) such that censoring times uniform on [0, c_max] censor ``censoring_rate`` of
    slides in expectation, found on a fixed Monte-Carlo sample of the risk and time model."""
    rng = random_stream(S_SURV, 0xC0FFEE)
    n = 100_000
    k = rng.integers(config.lesion_min, config.lesion_max + 1, n)
    s = 1 + np.round(rng.random(n) * (k - 1))
    return horizon_for_rate(_weibull_times(rng, (s - 1) / (k - 1), config), config.censoring_rate)


def survival_outcome(config: BenchmarkConfig, key: Sequence[int],
                     compactness: float) -> tuple[float, int, float]:
    """(observed months, censorship 1 = censored, true event months) of one slide.

    The event time depends only on ``compactness`` r; the censoring time is U(0, c_max), independent
    of it. Observed times are rounded to 0.01 month (at least 0.01).
    """
    rng = random_stream(S_SURV, *key)
    event = float(_weibull_times(rng, np.asarray([compactness]), config)[0])
    observed, censored = censor(rng, event, censoring_horizon(config))
    return observed, censored, event
