"""Kaplan-Meier survival curves and the log-rank test, for risk-group analyses of survival models."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import chi2

__all__ = ["kaplan_meier", "logrank_test", "number_at_risk"]


def _check_time_event(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time)
    e = np.asarray(event)
    if t.ndim != 1 or e.ndim != 1:
        raise ValueError(f"time and event must be 1-D (n,), got shapes {t.shape} and {e.shape}")
    if t.shape != e.shape:
        raise ValueError(f"time and event need equal lengths, got {t.shape[0]} and {e.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("need at least one sample")
    if not np.issubdtype(t.dtype, np.number) or np.issubdtype(t.dtype, np.complexfloating):
        raise ValueError(f"time must be real numeric, got dtype {t.dtype}")
    t = t.astype(np.float64, copy=False)
    if not np.isfinite(t).all():
        raise ValueError("time must be finite")
    if (t < 0).any():
        raise ValueError(f"time must be non-negative, got minimum {t.min()}")
    if not np.issubdtype(e.dtype, np.bool_):
        if not (np.issubdtype(e.dtype, np.number) and np.isin(e, (0, 1)).all()):
            raise ValueError("event must be boolean or hold only 0/1 (1 = event observed, 0 = censored)")
        e = e.astype(bool)
    return t, e


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit (Kaplan-Meier) estimate of the survival function.

    ``time``: (n,) non-negative observed times (any unit). ``event``: (n,) bool or 0/1, True when
    the event was observed, False when censored.

    Returns ``(times, survival)``, both (m,): ``times`` is 0 followed by every distinct observed
    time (events and censorings) in increasing order, and ``survival[k]`` = S(times[k]) =
    prod over event times u <= times[k] of (1 - d_u / n_u), with d_u events at u and n_u subjects
    with time >= u. S is a right-continuous step function, so S(0) = 1 unless events occur at time 0
    (then 0 is not repeated and S(0) < 1). This is the grid of lifelines' ``survival_function_``.
    """
    t, e = _check_time_event(time, event)
    times, inverse = np.unique(t, return_inverse=True)
    exits = np.bincount(inverse, minlength=times.size)
    deaths = np.bincount(inverse, weights=e.astype(np.float64), minlength=times.size)
    # Subjects still at risk just before each distinct time: everyone minus those who left earlier.
    at_risk = t.size - np.concatenate(([0], np.cumsum(exits)[:-1]))
    survival = np.cumprod(1.0 - deaths / at_risk)
    if times[0] > 0:
        times = np.concatenate(([0.0], times))
        survival = np.concatenate(([1.0], survival))
    return times, survival


def number_at_risk(time: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Subjects still under observation at each time in ``at``: (k,) counts of ``time >= at[i]``."""
    t = np.sort(np.asarray(time, dtype=np.float64).ravel())
    return t.size - np.searchsorted(t, np.asarray(at, dtype=np.float64), side="left")


def logrank_test(time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Log-rank test that k >= 2 groups share one survival function.

    ``time``: (n,) non-negative observed times; ``event``: (n,) bool or 0/1; ``groups``: (n,)
    group labels of any sortable type (ints, strings).

    At each distinct event time u, with n_u at risk and d_u events overall and n_gu at risk in group
    g, the expected events are E_g = sum_u d_u n_gu / n_u and the hypergeometric covariance is
    V_gh = sum_u d_u (n_u - d_u) / (n_u - 1) * n_gu (delta_gh n_u - n_hu) / n_u^2 (the factor
    (n_u - d_u) / (n_u - 1) is taken as 1 when n_u = 1, where it multiplies zero anyway). The
    statistic is Z' V^+ Z on the first k - 1 groups, Z = O - E, with V^+ the pseudo-inverse so that
    degenerate groups do not raise; its p-value is the chi-square(k - 1) upper tail.

    Returns ``(statistic, p_value)``.
    """
    t, e = _check_time_event(time, event)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != t.shape[0]:
        raise ValueError(f"groups must be 1-D with {t.shape[0]} entries, got shape {g.shape}")
    labels, gidx = np.unique(g, return_inverse=True)
    k = labels.size
    if k < 2:
        raise ValueError(f"the log-rank test needs at least two groups, got {k}")

    times, tidx = np.unique(t, return_inverse=True)
    m = times.size
    # (m, k) tables of exits and events per distinct time and group.
    exits = np.zeros((m, k))
    deaths = np.zeros((m, k))
    np.add.at(exits, (tidx, gidx), 1.0)
    np.add.at(deaths, (tidx, gidx), e.astype(np.float64))
    # At risk just before time u = all minus everyone who exited strictly earlier.
    at_risk_g = exits.sum(axis=0)[None, :] - np.vstack([np.zeros((1, k)), np.cumsum(exits, axis=0)[:-1]])
    at_risk = at_risk_g.sum(axis=1)
    d = deaths.sum(axis=1)
    keep = d > 0  # times with no event contribute nothing
    at_risk_g, at_risk, d, deaths = at_risk_g[keep], at_risk[keep], d[keep], deaths[keep]

    observed = deaths.sum(axis=0)
    expected = (d / at_risk) @ at_risk_g
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(at_risk > 1, (at_risk - d) / (at_risk - 1), 1.0)
    w = ratio * d / at_risk**2  # (m',)
    cov = np.diag((w * at_risk) @ at_risk_g) - (at_risk_g * w[:, None]).T @ at_risk_g
    z = (observed - expected)[: k - 1]
    statistic = float(z @ np.linalg.pinv(cov[: k - 1, : k - 1]) @ z)
    p_value = float(chi2.sf(statistic, k - 1))
    return statistic, p_value
