"""Evaluation figures: ROC curves, confusion matrices, Kaplan-Meier curves by risk group, training curves.

Figures are drawn on ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of pyplot, so
importing or calling this module neither selects nor disturbs the user's interactive backend, keeps
no global figure registry (no leaked figures in long training runs) and works headless.
Every file is written atomically (:func:`mamba2d.io.atomic_write`), so a reader never sees a
half-written image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from mamba2d.io import atomic_write
from mamba2d.train.metrics import _as_real, _check_classification_inputs
from mamba2d.train.survival_stats import kaplan_meier, logrank_test, number_at_risk

__all__ = ["save_confusion_matrix", "save_km_by_risk", "save_roc_comparison", "save_roc_curves",
           "save_segmentation_examples",
           "save_training_curves"]

_DPI = 120


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` atomically (:func:`mamba2d.io.atomic_write`); returns the Path.

    The format follows the suffix of ``path`` (PNG when it has none).
    """
    target = Path(path)
    fmt = (target.suffix or ".png").lstrip(".").lower()
    return atomic_write(target, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight"))


def save_roc_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None,
                    path: str | os.PathLike[str]) -> Path:
    """ROC curves, one per class (one-vs-rest), with each AUC in the legend; returns the written Path.

    ``y_true``: (n,) integer labels in [0, C); ``probs``: (n, C) class scores; ``class_names``: C
    names or None. Binary problems draw the single curve of class 1 against class 0. A class whose
    one-vs-rest problem has only one side present in ``y_true`` is listed as undefined, not drawn.
    """
    y, p, names = _check_classification_inputs(y_true, probs, class_names)
    n_classes = p.shape[1]
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    classes = [1] if n_classes == 2 else list(range(n_classes))
    for c in classes:
        positive = y == c
        if positive.all() or not positive.any():
            ax.plot([], [], linestyle="none", label=f"{names[c]}: AUC undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, c])
        auc = roc_auc_score(positive, p[:, c])
        label = f"{names[c]} vs {names[0]}" if n_classes == 2 else f"{names[c]} vs rest"
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{label} (AUC = {auc:.3f})")
    _finish_roc_axes(ax, "ROC curves" + (" (one-vs-rest)" if n_classes > 2 else ""))
    return _save_atomic(fig, path)


def _finish_roc_axes(ax, title: str) -> None:
    """Square unit axes, labels, legend and grid shared by the ROC figures."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)


def macro_roc(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Macro-averaged one-vs-rest ROC: (fpr grid (201,), mean tpr (201,), macro AUC).

    Binary problems give class 1's curve. Each class's curve is interpolated onto a common false
    positive grid and the true positive rates are averaged; the AUC is the mean of the per-class
    AUCs (as ``roc_auc_score(average="macro", multi_class="ovr")``).
    """
    y, p, _ = _check_classification_inputs(y_true, probs, None)
    classes = [1] if p.shape[1] == 2 else [c for c in range(p.shape[1]) if 0 < (y == c).sum() < y.size]
    grid = np.linspace(0.0, 1.0, 201)
    tprs, aucs = [], []
    for c in classes:
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(roc_auc_score(y == c, p[:, c]))
    if not tprs:
        raise ValueError("no class has both positives and negatives: ROC undefined")
    return grid, np.mean(tprs, axis=0), float(np.mean(aucs))


def save_roc_comparison(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str],
                        title: str = "ROC, macro one-vs-rest") -> Path:
    """One macro-averaged ROC curve per model on shared axes. ``curves``: name -> (y_true, probs)."""
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (y, p) in curves.items():
        fpr, tpr, auc = macro_roc(y, p)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC = {auc:.3f})")
    _finish_roc_axes(ax, title)
    return _save_atomic(fig, path)


def save_confusion_matrix(cm: Any, class_names: Sequence[str] | None, path: str | os.PathLike[str],
                          normalize: bool = False) -> Path:
    """Annotated heatmap of a confusion matrix; returns the written Path.

    ``cm``: (C, C) counts, rows = true class, columns = predicted class (e.g. the
    ``confusion_matrix`` of :func:`mamba2d.train.metrics.classification_metrics`). With
    ``normalize`` each row is divided by its total, showing per-class recall; empty rows show "-".
    """
    counts = np.asarray(cm, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("cm must hold finite non-negative counts")
    n_classes = counts.shape[0]
    names = [str(c) for c in range(n_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ValueError(f"class_names has {len(names)} names but cm is {n_classes} x {n_classes}")

    row_sum = counts.sum(axis=1, keepdims=True)
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(row_sum > 0, counts / row_sum, np.nan)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(counts.max()), 1.0)

    side = 1.6 + 0.7 * n_classes
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(np.nan_to_num(values, nan=0.0), cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n_classes):
        for j in range(n_classes):
            v = values[i, j]
            if np.isnan(v):
                text = "-"
            elif normalize:
                text = f"{v:.2f}"
            else:
                text = f"{int(round(v))}"
            # White text on dark cells keeps the annotation readable.
            dark = not np.isnan(v) and v > 0.5 * vmax
            colour = "white" if dark else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
    ax.set_xticks(range(n_classes), names, rotation=45, ha="right")
    ax.set_yticks(range(n_classes), names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    return _save_atomic(fig, path)


def _risk_groups(risk: np.ndarray, n_groups: int) -> np.ndarray:
    """(n,) group index 0 (lowest risk) .. n_groups - 1 from quantile cut points of ``risk``.

    A subject equal to a cut point goes to the lower group, so with two groups "high risk" means
    strictly above the median. Heavy ties can leave a group empty.
    """
    edges = np.quantile(risk, np.arange(1, n_groups) / n_groups)
    return np.searchsorted(edges, risk, side="left")


def save_km_by_risk(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: str | os.PathLike[str],
                    n_groups: int = 2, show_at_risk: bool = True) -> Path:
    """Kaplan-Meier curves of predicted-risk groups with the log-rank p-value; returns the written Path.

    ``time``: (n,) observed times (the x axis, in the data's unit); ``event``: (n,) bool or 0/1;
    ``risk``: (n,) predicted risk, higher = shorter survival. Subjects are split at the median of
    ``risk`` (``n_groups=2``), its tertiles (3) or, generally, its n_groups-quantiles. The title gives
    the k-group log-rank p-value over the non-empty groups; ``show_at_risk`` adds a table of the
    numbers at risk under the x ticks.
    """
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event)
    r = np.asarray(risk, dtype=np.float64)
    if not (t.ndim == e.ndim == r.ndim == 1 and t.shape == e.shape == r.shape) or t.size == 0:
        raise ValueError(f"time, event and risk must be non-empty 1-D arrays of one length, "
                         f"got shapes {t.shape}, {e.shape}, {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("risk must be finite")
    if n_groups < 2:
        raise ValueError(f"n_groups must be >= 2, got {n_groups}")
    group = _risk_groups(r, n_groups)
    used = [k for k in range(n_groups) if (group == k).any()]
    if n_groups == 2:
        names = {0: "low risk", 1: "high risk"}
    elif n_groups == 3:
        names = {0: "low risk", 1: "intermediate risk", 2: "high risk"}
    else:
        names = {k: f"risk quantile {k + 1}/{n_groups}" for k in range(n_groups)}

    if len(used) >= 2:
        _, p_value = logrank_test(t, e, group)
        title = f"Kaplan-Meier by predicted risk (log-rank p = {p_value:.3g})"
    else:
        title = "Kaplan-Meier by predicted risk (log-rank n/a: a single risk group)"

    fig = _new_figure(6.5, 5.5 if show_at_risk else 4.5)
    if show_at_risk:
        grid = fig.add_gridspec(2, 1, height_ratios=[4.0, 0.5 + 0.25 * len(used)], hspace=0.35)
        ax = fig.add_subplot(grid[0])
        table = fig.add_subplot(grid[1], sharex=ax)
    else:
        ax = fig.add_subplot()
        table = None
    colours = [f"C{k}" for k in range(n_groups)]
    for k in used:
        m = group == k
        times, surv = kaplan_meier(t[m], e[m])
        ax.step(times, surv, where="post", color=colours[k], linewidth=1.8,
                label=f"{names[k]} (n = {int(m.sum())}, events = {int(np.count_nonzero(e[m]))})")
        censored = m & ~e.astype(bool)
        if censored.any():
            # Censoring ticks sit on the curve at S(t_censored), the value of the step at that time.
            idx = np.searchsorted(times, t[censored], side="right") - 1
            ax.plot(t[censored], surv[idx], linestyle="none", marker="|", color=colours[k], markersize=7)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0.0)
    ax.set_ylabel("Survival probability")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if table is None:
        ax.set_xlabel("Time")
    else:
        ticks = [x for x in ax.get_xticks() if 0.0 <= x <= ax.get_xlim()[1]]
        for row, k in enumerate(used):
            counts = number_at_risk(t[group == k], np.asarray(ticks))
            for x, c in zip(ticks, counts, strict=True):
                table.text(x, row, str(int(c)), ha="center", va="center", color=colours[k], fontsize="small")
        table.set_ylim(len(used) - 0.5, -0.5)
        table.set_yticks(range(len(used)), [names[k] for k in used], fontsize="small")
        table.set_xlabel("Time")
        table.set_title("Number at risk", fontsize="small", loc="left")
        table.tick_params(axis="x", labelbottom=True)
        for side in ("top", "right", "left"):
            table.spines[side].set_visible(False)
        # Padding keeps the group names clear of the counts printed at t = 0.
        table.tick_params(axis="y", length=0, pad=14)
    return _save_atomic(fig, path)


def _curve_kind(key: str) -> str | None:
    """Panel of a history key: "loss", "lr", "metric", or None for per-epoch counts (``val_n``)."""
    tokens = key.lower().split("_")
    if "n" in tokens:
        return None  # sample counts are constant and would squash the metric axis
    if "loss" in key.lower():
        return "loss"
    if "lr" in tokens or "learning_rate" in key.lower():
        return "lr"
    return "metric"


def save_training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-epoch training curves; returns the written Path.

    ``history``: one dict per epoch, e.g. ``{"epoch": 3, "train_loss": 0.41, "lr": 1e-4,
    "val_loss": 0.47, "val_auc": 0.91, "val_n": 40}``. The x axis is ``epoch`` when every entry has
    it, else 1, 2, ...; keys holding "loss" share one panel, other real scalar metrics a second and
    learning rates (``lr``) a third on a log axis; panels without keys are left out, and counts
    (keys with an ``n`` token, such as ``val_n``) are not drawn. An epoch missing a key, or giving
    NaN, leaves a gap in that curve.
    """
    if len(history) == 0:
        raise ValueError("history is empty: nothing to plot")
    if all("epoch" in h and _as_real(h["epoch"]) is not None for h in history):
        x = np.asarray([_as_real(h["epoch"]) for h in history], dtype=np.float64)
    else:
        x = np.arange(1, len(history) + 1, dtype=np.float64)
    keys: dict[str, None] = {}
    for h in history:
        for key, value in h.items():
            if key != "epoch" and _as_real(value) is not None and _curve_kind(key) is not None:
                keys.setdefault(key, None)
    if not keys:
        raise ValueError("history holds no numeric metrics to plot")

    def column(key: str) -> np.ndarray:
        values = [_as_real(h.get(key)) for h in history]
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)

    panels = []
    for kind, label in (("loss", "Loss"), ("metric", "Metric"), ("lr", "Learning rate")):
        members = [k for k in keys if _curve_kind(k) == kind]
        if members:
            panels.append((kind, label, members))

    fig = _new_figure(4.5 * len(panels), 4.0)
    fig.set_layout_engine("constrained")  # keeps each panel's y label clear of its neighbour
    for i, (kind, label, members) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in members:
            y = column(key)
            # Markers keep single-epoch histories (and isolated points between gaps) visible.
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.5, label=key)
            if kind == "lr" and np.nanmin(y, initial=np.inf) > 0:
                ax.set_yscale("log")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Training curves")
    return _save_atomic(fig, path)


def save_segmentation_examples(images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                               class_names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """A row per example: the greyscale image, the true label map and the predicted one, with a
    legend of class colours; returns the written Path.

    ``images``: (n, H, W) floats; ``truth``, ``pred``: (n, H, W) integer labels in
    0..len(class_names) - 1 (0 drawn black, as the background).
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    images, truth, pred = np.asarray(images), np.asarray(truth), np.asarray(pred)
    if images.ndim != 3 or truth.shape != images.shape or pred.shape != images.shape:
        raise ValueError(f"images, truth and pred must be (n, H, W) of one shape, got {images.shape}, "
                         f"{truth.shape} and {pred.shape}")
    n_classes = len(class_names)
    colours = [(0.0, 0.0, 0.0)] + [colormaps["tab10"](i % 10)[:3] for i in range(n_classes - 1)]
    cmap = ListedColormap(colours)
    n = images.shape[0]
    height = 2.3 * n + 0.9
    fig = _new_figure(7.5, height)
    # Room at the bottom for the legend, little elsewhere.
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.35 / height, bottom=0.75 / height, hspace=0.12)
    for row in range(n):
        for col, (panel, title) in enumerate(((images[row], "image"), (truth[row], "truth"),
                                              (pred[row], "prediction"))):
            ax = fig.add_subplot(n, 3, row * 3 + col + 1)
            if col == 0:
                ax.imshow(panel, cmap="gray")
            else:
                ax.imshow(panel, cmap=cmap, vmin=-0.5, vmax=n_classes - 0.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
    fig.legend(handles=[Patch(color=c, label=name) for c, name in zip(colours, class_names, strict=True)],
               loc="lower center", ncol=min(n_classes, 6), fontsize="x-small")
    return _save_atomic(fig, path)
