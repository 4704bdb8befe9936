"""Metrics against independent implementations: scikit-survival, lifelines and scikit-learn.

The survival references are scikit-survival's bundled datasets (veterans' lung cancer, WHAS500,
GBSG2), so every comparison runs on real censoring patterns and real tied times.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import sksurv.datasets as sksurv_datasets
import sksurv.metrics as sksurv_metrics
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as ll_logrank_test
from lifelines.statistics import multivariate_logrank_test
from lifelines.utils import concordance_index as ll_concordance_index
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score
from sksurv.column import encode_categorical
from sksurv.linear_model import CoxPHSurvivalAnalysis

from mamba2d.train import metrics
from mamba2d.train.metrics import (
    NoComparablePairsError,
    classification_metrics,
    concordance_index,
    concordance_index_details,
    format_mean_std,
    summarise,
    survival_metrics,
)
from mamba2d.train.survival_stats import kaplan_meier, logrank_test

# (name, covariates, time (n,) float64, event (n,) bool) of one shipped dataset.
Case = tuple[str, pd.DataFrame, np.ndarray, np.ndarray]

# (loader, an informative numeric covariate): age in all three, a genuine predictor of death.
_DATASETS: dict[str, tuple[Callable[[], tuple[pd.DataFrame, np.ndarray]], str]] = {
    "veterans": (sksurv_datasets.load_veterans_lung_cancer, "Age_in_years"),
    "whas500": (sksurv_datasets.load_whas500, "age"),
    "gbsg2": (sksurv_datasets.load_gbsg2, "age"),
}


@pytest.fixture(scope="module", params=sorted(_DATASETS))
def dataset(request: pytest.FixtureRequest) -> Case:
    """One shipped dataset as (name, covariates, time, event)."""
    loader, _ = _DATASETS[request.param]
    X, y = loader()
    event_field, time_field = y.dtype.names
    time = np.asarray(y[time_field], dtype=np.float64)
    return request.param, X, time, np.asarray(y[event_field], dtype=bool)


def _sksurv(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[float, int, int, int, int]:
    out = sksurv_metrics.concordance_index_censored(np.asarray(event).astype(bool), time, risk)
    return float(out[0]), int(out[1]), int(out[2]), int(out[3]), int(out[4])


def _risks(name: str, X: pd.DataFrame, time: np.ndarray, event: np.ndarray) -> dict[str, np.ndarray]:
    """Risk vectors covering untied, real-covariate, model, heavily tied and float32 scores."""
    rng = np.random.default_rng(sorted(_DATASETS).index(name))
    covariate = X[_DATASETS[name][1]].to_numpy(dtype=np.float64)
    Xe = encode_categorical(X).astype(np.float64)
    y = np.empty(time.size, dtype=[("event", bool), ("time", np.float64)])
    y["event"], y["time"] = event, time
    cox = CoxPHSurvivalAnalysis(alpha=1e-3).fit(Xe, y).predict(Xe)
    random = rng.normal(size=time.size)
    return {
        "random": random,
        "covariate": covariate,
        "coxph": cox,
        "rounded": np.round(random, 1),  # ~40 distinct values: many tied-risk pairs
        "coarse_int": rng.integers(0, 3, size=time.size),  # three values only
        "float32": random.astype(np.float32),
    }


# --------------------------------------------------------------------------------------------------
# Concordance index
# --------------------------------------------------------------------------------------------------


def test_cindex_matches_sksurv_on_shipped_datasets(dataset: Case) -> None:
    name, X, time, event = dataset
    # Coarsened times (whole months) add many tied event/event and event/censored times.
    month_time = np.floor(time / 30.0) + 1.0
    for times_label, t in (("time", time), ("months", month_time)):
        for risk_label, risk in _risks(name, X, t, event).items():
            ours = concordance_index_details(t, event, risk)
            ref = _sksurv(t, event, risk)
            assert ours[1:] == ref[1:], (name, times_label, risk_label, ours, ref)
            assert abs(ours[0] - ref[0]) <= 1e-12, (name, times_label, risk_label)
            assert concordance_index(t, event.astype(int), risk) == ours[0]
    # The coarsened times really do exercise the tied-time rule.
    assert concordance_index_details(month_time, event, time)[4] > 0


def test_cindex_real_covariate_is_informative(dataset: Case) -> None:
    name, X, time, event = dataset
    cox = _risks(name, X, time, event)["coxph"]
    # A fitted Cox model ranks its own training data well above chance.
    assert concordance_index(time, event, cox) > 0.6
    assert concordance_index(time, event, -cox) == pytest.approx(1.0 - concordance_index(time, event, cox))


def test_cindex_hand_case_tied_times_and_risks() -> None:
    # Sorted by time:  t=1 event A(r=3), t=1 censored B(r=1), t=2 events C(r=2), D(r=2),
    # t=3 censored E(r=1), t=3 event F(r=0).
    time = np.array([1, 1, 2, 2, 3, 3], dtype=float)
    event = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    risk = np.array([3, 1, 2, 2, 1, 0], dtype=float)
    # Comparable pairs: A (event at 1) with B (censored at 1: the censored one outlives it, a
    # tied_time pair) and with C, D, E, F; C and D (tied events, not comparable with each other)
    # each with E and F; F (event at 3) with E (censored at 3: the second tied_time pair).
    # A outranks all five, C and D outrank E and F, and F (0) < E (1) is the one discordant pair.
    assert concordance_index_details(time, event, risk) == (0.9, 9, 1, 0, 2)
    assert _sksurv(time, event, risk) == (0.9, 9, 1, 0, 2)
    # Tied risks count one half: C drops to E's risk, so C-E ties while C-F stays concordant.
    risk2 = np.array([3, 1, 1, 2, 1, 0], dtype=float)
    ours = concordance_index_details(time, event, risk2)
    assert ours == _sksurv(time, event, risk2) == (8.5 / 10, 8, 1, 1, 2)
    assert ours[0] == pytest.approx((ours[1] + 0.5 * ours[3]) / sum(ours[1:4]))


def test_cindex_risk_tie_tolerance_matches_sksurv_not_lifelines() -> None:
    rng = np.random.default_rng(7)
    n = 300
    time = rng.exponential(10.0, size=n).round(1) + 0.1
    event = rng.random(n) < 0.7
    base = rng.integers(0, 20, size=n).astype(float)
    # Risks that differ by 1e-9: equal within sksurv's default tolerance (1e-8), distinct to lifelines.
    risk = base + 1e-9 * rng.integers(0, 2, size=n)
    ours = concordance_index_details(time, event, risk)
    assert ours == _sksurv(time, event, risk)
    lifelines_c = ll_concordance_index(time, -risk, event)
    assert lifelines_c != pytest.approx(ours[0], abs=1e-12)
    # lifelines compares risks exactly, which is tied_tol = 0 here ...
    assert concordance_index(time, event, risk, tied_tol=0.0) == pytest.approx(lifelines_c, rel=0, abs=1e-12)
    # ... and without near-ties the two libraries (and this one) agree, ties in time included.
    assert concordance_index(time, event, base) == pytest.approx(ll_concordance_index(time, -base, event),
                                                                 rel=0, abs=1e-12)


def test_cindex_agrees_with_lifelines_on_shipped_datasets(
        dataset: Case) -> None:
    name, X, time, event = dataset
    for risk_label, risk in _risks(name, X, time, event).items():
        if risk_label == "float32":
            continue  # lifelines upcasts to float64; the tolerance then acts on other differences
        ours = concordance_index(time, event, risk)
        theirs = ll_concordance_index(time, -np.asarray(risk, dtype=np.float64), event)
        assert ours == pytest.approx(theirs, rel=0, abs=1e-12), (name, risk_label)


def test_cindex_blocking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = sksurv_datasets.load_whas500()
    time, event = np.asarray(y["lenfol"], dtype=float), np.asarray(y["fstat"], dtype=bool)
    time = np.floor(time / 30.0)
    risk = np.round(np.random.default_rng(3).normal(size=time.size), 1)
    expected = _sksurv(time, event, risk)
    for block in (1, 7, 499, 12_345):
        monkeypatch.setattr(metrics, "_CINDEX_BLOCK", block)
        assert concordance_index_details(time, event, risk) == expected, block


def test_cindex_no_comparable_pairs() -> None:
    risk = np.array([0.3, 0.1, 0.2])
    # All censored: both libraries raise.
    with pytest.raises(NoComparablePairsError, match="censored"):
        concordance_index([1.0, 2.0, 3.0], [0, 0, 0], risk)
    with pytest.raises(ValueError):
        sksurv_metrics.concordance_index_censored(np.zeros(3, bool), np.array([1.0, 2.0, 3.0]), risk)
    # The only event is the last time: nobody can be compared with it.
    with pytest.raises(NoComparablePairsError, match="no comparable pairs"):
        concordance_index([1.0, 2.0, 3.0], [0, 0, 1], risk)
    with pytest.raises(ValueError, match="no comparable pairs"):
        sksurv_metrics.concordance_index_censored(np.array([0, 0, 1], bool), np.array([1.0, 2.0, 3.0]), risk)
    # Events tied in time with nothing after them: sksurv returns NaN (0/0); this raises instead.
    with pytest.raises(NoComparablePairsError):
        concordance_index([1.0, 2.0, 2.0], [0, 1, 1], risk)
    assert math.isnan(sksurv_metrics.concordance_index_censored(
        np.array([0, 1, 1], bool), np.array([1.0, 2.0, 2.0]), risk)[0])
    with pytest.raises(NoComparablePairsError, match="two samples"):
        concordance_index([1.0], [1], [0.5])
    # survival_metrics turns it into NaN with a note, for evaluation loops on tiny folds.
    out = survival_metrics([1.0, 2.0, 3.0], [0, 0, 0], risk)
    assert math.isnan(out["c_index"]) and "censored" in out["c_index_note"]
    assert (out["n"], out["n_events"]) == (3, 0)


@pytest.mark.parametrize(
    ("time", "event", "risk", "match"),
    [
        ([1.0, 2.0], [1, 0], [0.1], "equal lengths"),
        ([[1.0, 2.0]], [[1, 0]], [[0.1, 0.2]], "1-D"),
        ([1.0, 2.0], [1, 2], [0.1, 0.2], "0/1"),
        ([1.0, np.nan], [1, 0], [0.1, 0.2], "time must be finite"),
        ([1.0, 2.0], [1, 0], [0.1, np.inf], "risk must be finite"),
        ([1.0, 2.0], [1, 0], ["a", "b"], "real numeric"),
    ],
)
def test_cindex_input_validation(time: list, event: list, risk: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        concordance_index(np.asarray(time), np.asarray(event), np.asarray(risk))


def test_survival_metrics_keys(dataset: Case) -> None:
    _, _, time, event = dataset
    risk = -time  # shortest time = highest risk: concordant apart from ties
    out = survival_metrics(time, event, risk)
    assert out["c_index"] == _sksurv(time, event, risk)[0]
    assert out["n"] == time.size and out["n_events"] == int(event.sum())
    assert "c_index_note" not in out


# --------------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank
# --------------------------------------------------------------------------------------------------


def test_kaplan_meier_matches_lifelines(dataset: Case) -> None:
    _, _, time, event = dataset
    for t in (time, np.floor(time / 30.0)):  # the second has events at time 0
        times, surv = kaplan_meier(t, event)
        ref = KaplanMeierFitter().fit(t, event).survival_function_
        np.testing.assert_array_equal(times, ref.index.to_numpy())
        np.testing.assert_allclose(surv, ref.to_numpy()[:, 0], rtol=1e-12, atol=1e-14)
        assert np.all(np.diff(surv) <= 0)


def test_kaplan_meier_hand_case() -> None:
    times, surv = kaplan_meier([1, 1, 2, 2, 3], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(times, [0, 1, 2, 3])
    np.testing.assert_allclose(surv, [1.0, 0.8, 0.8 * 2 / 3, 0.8 * 2 / 3])
    with pytest.raises(ValueError, match="non-negative"):
        kaplan_meier([-1.0, 2.0], [1, 0])


def test_logrank_matches_lifelines(dataset: Case) -> None:
    name, X, time, event = dataset
    categorical = [c for c in X.columns if isinstance(X[c].dtype, pd.CategoricalDtype)]
    rng = np.random.default_rng(11)
    groupings = {c: X[c].astype(str).to_numpy() for c in categorical}
    groupings["random3"] = rng.integers(0, 3, size=time.size)
    groupings["age_median"] = X[_DATASETS[name][1]].to_numpy() > np.median(X[_DATASETS[name][1]])
    checked_two = checked_many = 0
    for label, groups in groupings.items():
        levels = np.unique(groups)
        stat, p = logrank_test(time, event, groups)
        ref = multivariate_logrank_test(time, groups, event)
        assert stat == pytest.approx(ref.test_statistic, rel=1e-10), (name, label)
        assert p == pytest.approx(ref.p_value, rel=1e-10), (name, label)
        if levels.size == 2:
            a = groups == levels[0]
            two = ll_logrank_test(time[a], time[~a], event[a], event[~a])
            assert stat == pytest.approx(two.test_statistic, rel=1e-10), (name, label)
            assert p == pytest.approx(two.p_value, rel=1e-10), (name, label)
            checked_two += 1
        else:
            checked_many += 1
    assert checked_two >= 1 and checked_many >= 1


def test_logrank_needs_two_groups() -> None:
    with pytest.raises(ValueError, match="two groups"):
        logrank_test([1.0, 2.0], [1, 1], ["a", "a"])


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _random_problem(seed: int, n: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    # Scores mildly informative of the label, so AUCs are away from 0.5 and from 1.
    logits = rng.normal(size=(n, n_classes)) + 0.8 * np.eye(n_classes)[y]
    return y, _softmax(logits)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_classification_matches_sklearn(seed: int, n_classes: int) -> None:
    y, probs = _random_problem(1000 * n_classes + seed, 257, n_classes)
    out = classification_metrics(y, probs, [f"c{i}" for i in range(n_classes)])
    pred = probs.argmax(axis=1)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-15)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-15)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-15)
    assert out["confusion_matrix"] == confusion_matrix(y, pred, labels=range(n_classes)).tolist()
    assert out["n"] == y.size and out["auc_note"] is None
    if n_classes == 2:
        assert out["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-15)
        assert out["auc_ovo"] == out["auc"]
    else:
        ovr = roc_auc_score(y, probs, multi_class="ovr", average="macro")
        ovo = roc_auc_score(y, probs, multi_class="ovo", average="macro")
        assert out["auc"] == pytest.approx(ovr, abs=1e-12)
        assert out["auc_ovo"] == pytest.approx(ovo, abs=1e-12)
        assert out["auc"] != out["auc_ovo"]


def test_classification_class_absent_from_y_true() -> None:
    # Four classes, class 2 never occurs in y_true. Build the scores on the three present classes and
    # give class 2 a zero column, so rows still sum to one and sklearn can score the 3-class problem.
    y3, probs3 = _random_problem(42, 200, 3)
    present = np.array([0, 1, 3])
    y = present[y3]
    probs = np.zeros((200, 4))
    probs[:, present] = probs3
    out = classification_metrics(y, probs, ["a", "b", "c", "d"])
    assert out["auc"] == pytest.approx(roc_auc_score(y3, probs3, multi_class="ovr"), abs=1e-12)
    assert out["auc_ovo"] == pytest.approx(roc_auc_score(y3, probs3, multi_class="ovo"), abs=1e-12)
    assert "'c'" in out["auc_note"] and "3 present" in out["auc_note"]
    cm = np.asarray(out["confusion_matrix"])
    assert cm.shape == (4, 4) and cm[2].sum() == 0 and cm.sum() == 200
    pred = probs.argmax(axis=1)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-15)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-15)


def test_classification_single_class_gives_nan_auc() -> None:
    rng = np.random.default_rng(5)
    for n_classes in (2, 3):
        probs = _softmax(rng.normal(size=(20, n_classes)))
        out = classification_metrics(np.ones(20, dtype=int), probs)
        assert math.isnan(out["auc"]) and math.isnan(out["auc_ovo"])
        assert "only class '1'" in out["auc_note"]
        assert out["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == 1)))


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), None, "2-D"),
        (np.array([[0, 1]]), np.ones((2, 2)), None, "1-D"),
        (np.array([0, 1, 1]), np.ones((2, 2)), None, "3 entries"),
        (np.array([0, 0]), np.ones((2, 1)), None, "at least 2 class"),
        (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), None, "finite"),
        (np.array([0, 2]), np.ones((2, 2)), None, r"lie in \[0, 1\]"),
        (np.array([0, -1]), np.ones((2, 2)), None, "lie in"),
        (np.array([0.0, 0.5]), np.ones((2, 2)), None, "integer"),
        (np.array([0, 1]), np.ones((2, 2)), ["only-one"], "class_names"),
    ],
)
def test_classification_validation(y: np.ndarray, probs: np.ndarray, names: list[str] | None,
                                   match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs, names)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def test_summarise_hand_case() -> None:
    runs = [
        {"auc": 0.9, "acc": 0.8, "n": 10, "note": "x", "flag": True},
        {"auc": 0.8, "acc": float("nan"), "n": 12, "note": None, "flag": False},
        {"auc": 1.0, "acc": np.float32(0.6), "n": np.int64(11), "cm": [[1]]},
    ]
    out = summarise(runs)
    assert list(out) == ["auc", "acc", "n"]  # strings, None, bools and lists are not summarised
    assert out["auc"]["mean"] == pytest.approx(0.9)
    assert out["auc"]["std"] == pytest.approx(0.1)
    assert (out["auc"]["n"], out["auc"]["n_nan"]) == (3, 0)
    assert out["auc"]["values"] == [0.9, 0.8, 1.0]
    acc = out["acc"]
    assert acc["mean"] == pytest.approx(0.7) and acc["std"] == pytest.approx(math.sqrt(0.02))
    assert (acc["n"], acc["n_nan"]) == (2, 1) and math.isnan(acc["values"][1])
    assert out["n"]["mean"] == pytest.approx(11.0) and out["n"]["std"] == pytest.approx(1.0)

    single = summarise([{"auc": 0.75}])
    assert single["auc"] == {"mean": 0.75, "std": 0.0, "n": 1, "n_nan": 0, "values": [0.75]}
    empty = summarise([{"auc": float("nan")}])["auc"]
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"]) and (empty["n"], empty["n_nan"]) == (0, 1)
    assert summarise([]) == {}


def test_format_mean_std() -> None:
    assert format_mean_std(0.9123, 0.0131) == "0.912 ± 0.013"
    assert format_mean_std(0.5, 0.26, digits=1) == "0.5 ± 0.3"
    assert format_mean_std(float("nan"), float("nan")) == "nan ± nan"
