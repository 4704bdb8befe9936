"""Evaluation metrics: slide classification (accuracy, F1, AUC) and survival (Harrell's C-index).

Classification follows the 2DMamba paper, which reports accuracy, macro F1 and the one-vs-one macro
AUC; the one-vs-rest AUC is given alongside. Survival uses Harrell's concordance index with exactly
the pair and tie rules of ``sksurv.metrics.concordance_index_censored``, so numbers are comparable
with papers that use scikit-survival.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

__all__ = [
    "NoComparablePairsError",
    "classification_metrics",
    "concordance_index",
    "concordance_index_details",
    "format_mean_std",
    "pixel_confusion",
    "segmentation_metrics",
    "summarise",
    "survival_metrics",
]

# Entries of the (events x samples) comparison block evaluated at once by the C-index; a few
# float64/bool temporaries of this size (~8 MB each) bound the peak memory whatever n is.
_CINDEX_BLOCK = 1 << 20


class NoComparablePairsError(ValueError):
    """The survival data hold no comparable pair, so the concordance index is undefined."""


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def _check_classification_inputs(y_true: Any, probs: Any, class_names: Sequence[str] | None
                                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated ``(y (n,) int64, probs (n, C) float64, C class names)``; ValueError otherwise."""
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (n,), got shape {y.shape}")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, n_classes), got shape {p.shape}")
    n, n_classes = p.shape
    if y.shape[0] != n:
        raise ValueError(f"y_true has {y.shape[0]} entries but probs has {n} rows")
    if n == 0:
        raise ValueError("need at least one sample, got n = 0")
    if n_classes < 2:
        raise ValueError(f"probs needs at least 2 class columns, got {n_classes}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"probs must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        raise ValueError(f"probs must be finite; found {int((~np.isfinite(p)).sum())} NaN/inf entries")
    if np.issubdtype(y.dtype, np.bool_):
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        # Labels that went through a float tensor are fine as long as they are whole numbers.
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise ValueError("y_true must hold integer class indices; found non-integer values")
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true labels must lie in [0, {n_classes - 1}] for {n_classes} probability "
                         f"columns, got values {int(y.min())}..{int(y.max())}")
    if class_names is None:
        names = [str(c) for c in range(n_classes)]
    else:
        names = [str(c) for c in class_names]
        if len(names) != n_classes:
            raise ValueError(f"class_names has {len(names)} names but probs has {n_classes} columns")
    return y, p, names


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a boolean target (m,) against a score (m,); NaN when one side is empty."""
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, score))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Slide-level classification metrics from class scores.

    ``y_true``: (n,) integer class indices in [0, C). ``probs``: (n, C) class scores, usually
    softmax probabilities; they need not sum to one (every AUC here is rank based, per column).
    ``class_names``: C names, used in ``auc_note`` and echoed back as ``class_names``.

    Returns a dict with
    ``accuracy`` (fraction of argmax predictions equal to the label), ``balanced_accuracy`` (mean
    recall over the classes present in ``y_true``, as sklearn), ``macro_f1`` (unweighted F1 mean over
    the classes present in ``y_true`` or predicted, as sklearn's default), ``auc`` (binary: ROC AUC
    of class 1; multi-class: one-vs-rest macro mean), ``auc_ovo`` (Hand & Till one-vs-one macro mean,
    the paper's AUC; equals ``auc`` for binary), ``confusion_matrix`` (C x C nested lists, rows =
    true class, columns = predicted class), ``n``, ``class_names`` and ``auc_note`` (``None``, or why
    an AUC is NaN or was averaged over fewer classes than C).

    An AUC that cannot be defined because classes are missing from ``y_true`` is NaN rather than an
    exception; the multi-class averages use the classes (or class pairs) that are defined.
    """
    y, p, names = _check_classification_inputs(y_true, probs, class_names)
    n, n_classes = p.shape
    pred = p.argmax(axis=1)

    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    present = support > 0
    recall = np.diag(cm)[present] / support[present]

    # F1 over the union of true and predicted labels, matching sklearn's default label set, so a
    # class that is neither present nor predicted does not drag the mean down with a 0/0 score.
    f1_labels = np.union1d(np.unique(y), np.unique(pred))
    macro_f1 = float(f1_score(y, pred, labels=f1_labels, average="macro", zero_division=0))

    absent = [names[c] for c in range(n_classes) if not present[c]]
    note: str | None = None
    if n_classes == 2:
        auc = _binary_auc(y == 1, p[:, 1])
        auc_ovo = auc
        if math.isnan(auc):
            note = f"AUC undefined: only class {names[int(y[0])]!r} is present in y_true"
    else:
        ovr = [_binary_auc(y == c, p[:, c]) for c in range(n_classes) if present[c]]
        ovr = [a for a in ovr if not math.isnan(a)]
        auc = float(np.mean(ovr)) if ovr else float("nan")
        # One-vs-one (Hand & Till 2001): for each class pair, the mean of the two AUCs that each
        # class's own score column gives when separating it from the other, on the pair's samples.
        ovo = []
        for a in range(n_classes):
            for b in range(a + 1, n_classes):
                if not (present[a] and present[b]):
                    continue
                pair = (y == a) | (y == b)
                auc_a = roc_auc_score(y[pair] == a, p[pair, a])
                auc_b = roc_auc_score(y[pair] == b, p[pair, b])
                ovo.append(0.5 * (float(auc_a) + float(auc_b)))
        auc_ovo = float(np.mean(ovo)) if ovo else float("nan")
        if not ovr:
            note = f"AUC undefined: only class {names[int(y[0])]!r} is present in y_true"
        elif absent:
            n_present = n_classes - len(absent)
            note = (f"classes absent from y_true: {absent}; OvR AUC averaged over the {n_present} present "
                    f"classes, OvO AUC over the {n_present * (n_present - 1) // 2} pairs of present classes")

    return {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recall)),
        "macro_f1": macro_f1,
        "auc": auc,
        "auc_ovo": auc_ovo,
        "confusion_matrix": cm.tolist(),
        "n": int(n),
        "class_names": names,
        "auc_note": note,
    }


# --------------------------------------------------------------------------------------------------
# Survival: Harrell's concordance index
# --------------------------------------------------------------------------------------------------


def _check_survival_inputs(time: Any, event: Any, risk: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(time)
    e = np.asarray(event)
    r = np.asarray(risk)
    for name, arr in (("time", t), ("event", e), ("risk", r)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D (n,), got shape {arr.shape}")
    if not (t.shape == e.shape == r.shape):
        raise ValueError("time, event and risk need equal lengths, "
                         f"got {t.shape[0]}, {e.shape[0]}, {r.shape[0]}")
    if not np.issubdtype(e.dtype, np.bool_):
        if not (np.issubdtype(e.dtype, np.number) and np.isin(e, (0, 1)).all()):
            raise ValueError("event must be boolean or hold only 0/1 (1 = event observed, 0 = censored)")
        e = e.astype(bool)
    if not (np.issubdtype(t.dtype, np.number) and not np.issubdtype(t.dtype, np.complexfloating)):
        raise ValueError(f"time must be real numeric, got dtype {t.dtype}")
    # float64 holds every float32 and every integer time below 2**53 exactly, so ordering and
    # equality of times (which define the pairs) are unchanged.
    t = t.astype(np.float64, copy=False)
    if not np.isfinite(t).all():
        raise ValueError("time must be finite")
    # Float risks keep the caller's precision: ties are judged on |r_j - r_i| <= tol in that
    # precision, as scikit-survival does, and upcasting float32 would move pairs across the tolerance.
    if not np.issubdtype(r.dtype, np.floating):
        if not (np.issubdtype(r.dtype, np.integer) or np.issubdtype(r.dtype, np.bool_)):
            raise ValueError(f"risk must be real numeric, got dtype {r.dtype}")
        r = r.astype(np.float64)
    if not np.isfinite(r).all():
        raise ValueError("risk must be finite")
    return t, e, r


def concordance_index_details(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                              tied_tol: float = 1e-8) -> tuple[float, int, int, int, int]:
    """Harrell's C-index with its pair counts, as ``sksurv.metrics.concordance_index_censored``.

    ``time``: (n,) observed times (event or censoring; any unit). ``event``: (n,) bool or 0/1,
    True when the event was observed. ``risk``: (n,) predicted risk; higher risk = shorter survival.

    A pair (i, j) is comparable when i has an event and either t_j > t_i, or t_j == t_i and j is
    censored (the censored subject is taken to outlive an event at the same time). Two events at the
    same time are not comparable, nor is anything involving only censored subjects. In a comparable
    pair the risks are tied when |r_j - r_i| <= ``tied_tol`` (absolute, in ``risk``'s precision) and
    count 1/2; otherwise the pair is concordant when r_i > r_j.

    Returns ``(cindex, concordant, discordant, tied_risk, tied_time)``: cindex =
    (concordant + tied_risk / 2) / (concordant + discordant + tied_risk); tied_time is the number of
    comparable pairs whose times are equal (an event and a censoring at one time).

    Raises ``NoComparablePairsError`` (a ValueError) when there is no comparable pair.
    scikit-survival raises too, except when every event is tied in time with other events and
    nothing outlives them; then it returns NaN (0/0) where this raises.

    Cost: O(n * n_events) comparisons, done in blocks of about 1M pairs to bound memory.
    """
    t, e, r = _check_survival_inputs(time, event, risk)
    n = t.shape[0]
    if n < 2:
        raise NoComparablePairsError(f"need at least two samples for a concordance index, got {n}")
    if not e.any():
        raise NoComparablePairsError("all samples are censored: no comparable pairs, C-index undefined")
    if not (tied_tol >= 0):
        raise ValueError(f"tied_tol must be >= 0, got {tied_tol}")

    order = np.argsort(t, kind="stable")
    t, e, r = t[order], e[order], r[order]
    event_rows = np.flatnonzero(e)
    censored = ~e

    concordant = discordant = tied_risk = tied_time = 0
    start = 0
    while start < event_rows.size:
        # Events are in time order, so every partner of this block lies at or after `first`; the
        # block height is chosen so that rows x columns stays near _CINDEX_BLOCK.
        first = int(np.searchsorted(t, t[event_rows[start]], side="left"))
        width = n - first
        rows = max(1, _CINDEX_BLOCK // max(width, 1))
        block = event_rows[start:start + rows]
        start += rows

        ti = t[block][:, None]
        ri = r[block][:, None]
        tj = t[None, first:]
        rj = r[None, first:]
        same_time = tj == ti
        comparable = (tj > ti) | (same_time & censored[None, first:])
        tie = np.abs(rj - ri) <= tied_tol
        n_comparable = int(comparable.sum())
        n_tie = int((comparable & tie).sum())
        n_con = int((comparable & ~tie & (rj < ri)).sum())
        concordant += n_con
        tied_risk += n_tie
        discordant += n_comparable - n_con - n_tie
        tied_time += int((same_time & censored[None, first:]).sum())

    denominator = concordant + discordant + tied_risk
    if denominator == 0:
        raise NoComparablePairsError(
            "no comparable pairs: every event is tied in time with other events and no subject is "
            "observed beyond them, so the C-index is undefined")
    # Integer counts below 2**53 are exact in float64, so this is the same division sksurv makes.
    cindex = (float(concordant) + 0.5 * float(tied_risk)) / float(denominator)
    return cindex, concordant, discordant, tied_risk, tied_time


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tied_tol: float = 1e-8) -> float:
    """Harrell's C-index in [0, 1]; equal to ``concordance_index_censored(event, time, risk)[0]``.

    ``time``: (n,) observed times; ``event``: (n,) bool or 0/1; ``risk``: (n,) predicted risk,
    higher = shorter survival. See :func:`concordance_index_details` for the pair and tie rules.
    """
    return concordance_index_details(time, event, risk, tied_tol)[0]


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, Any]:
    """C-index and counts for a survival evaluation.

    ``time``: (n,) observed times; ``event``: (n,) bool or 0/1; ``risk``: (n,) predicted risk.
    Returns ``{"c_index", "n", "n_events"}``. When the data hold no comparable pair (e.g. a small
    fold with every patient censored) ``c_index`` is NaN and ``c_index_note`` says why, so an
    evaluation loop does not crash; malformed inputs still raise ValueError.
    """
    t, e, r = _check_survival_inputs(time, event, risk)
    out: dict[str, Any] = {"c_index": float("nan"), "n": int(t.shape[0]), "n_events": int(e.sum())}
    try:
        out["c_index"] = concordance_index(t, e, r)
    except NoComparablePairsError as err:
        out["c_index_note"] = str(err)
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation over runs / folds
# --------------------------------------------------------------------------------------------------


def _as_real(value: Any) -> float | None:
    """The value as a float if it is a real scalar (bools excluded), else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.number) \
            and not np.issubdtype(value.dtype, np.complexfloating):
        return float(value)
    return None


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and spread of each numeric scalar metric over runs (folds, seeds).

    ``runs``: one metrics dict per run. A key is summarised when every run that has it gives a real
    scalar (bools, strings, lists and None are skipped); keys keep their first-seen order.
    Returns ``{key: {"mean", "std", "n", "n_nan", "values"}}`` where ``values`` lists the run values
    in order (NaN included), ``n`` counts the non-NaN ones, ``mean`` and ``std`` (sample standard
    deviation, ddof = 1; 0.0 for a single value) ignore NaNs, and both are NaN when n = 0.
    """
    keys: dict[str, None] = {}
    for run in runs:
        for key in run:
            keys.setdefault(key, None)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        raw = [run[key] for run in runs if key in run]
        values = [_as_real(v) for v in raw]
        if not values or any(v is None for v in values):
            continue
        vals = np.asarray(values, dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        if ok.size == 0:
            mean = std = float("nan")
        else:
            mean = float(ok.mean())
            std = float(ok.std(ddof=1)) if ok.size > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "n": int(ok.size), "n_nan": int(vals.size - ok.size),
                    "values": [float(v) for v in vals]}
    return out


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``mean ± std`` with ``digits`` decimals each.

    ``format_mean_std(0.9123, 0.0131)`` -> ``'0.912 ± 0.013'``; NaNs print as ``nan``.
    """
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def pixel_confusion(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> Any:
    """(C, C) int64 counts of pixels, rows = true class, columns = predicted class.

    ``pred``, ``target``: integer label maps of one shape (torch tensors, on any device; the result
    is on the same device, so batches can be summed there and all-reduced). Pixels whose target is
    ``ignore_index`` are left out; any other label outside 0..C-1 is an error.
    """
    import torch

    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes or int(p.min()) < 0
                      or int(p.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy from a pixel confusion matrix (see :func:`pixel_confusion`).

    IoU_c = TP / (TP + FP + FN). A class absent from both the truth and the predictions has no IoU
    (None) and is left out of the mean, as in mmsegmentation.
    """
    cm = np.asarray(confusion.cpu() if hasattr(confusion, "cpu") else confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion must be a square (C, C) matrix, got shape {cm.shape}")
    if cm.sum() == 0:
        raise ValueError("confusion holds no pixels")
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"class_names has {len(names)} names but confusion is {len(tp)} x {len(tp)}")
    return {
        "miou": float(np.nanmean(iou)),
        "pixel_accuracy": float(tp.sum() / cm.sum()),
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "class_names": names,
    }
