"""Evaluate a finished run (on its own test parts or on new slides) and compare runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from mamba2d.data.labels import LabelTable
from mamba2d.data.splits import read_split_csv, resolve_split
from mamba2d.io import load_checkpoint, write_json, write_text
from mamba2d.train.config import TrainConfig
from mamba2d.train.distributed import DistInfo, pick_device
from mamba2d.train.engine import RunData, _plots, load_data, predict, rebuild_model, score, summarise_results
from mamba2d.train.metrics import format_mean_std
from mamba2d.train.rundir import claim_output_folder, write_marker

# The columns `compare` shows, per task, in order.
COMPARE_METRICS = {"classification": ("auc", "auc_ovo", "accuracy", "balanced_accuracy", "macro_f1"),
                   "survival": ("c_index",)}


def _model_dirs(run: Path) -> list[Path]:
    dirs = sorted(p for p in run.glob("fold*_seed*") if (p / "best.pt").is_file())
    if not dirs:
        raise FileNotFoundError(f"{run}: no trained models (fold*_seed*/best.pt); is this a mamba2d run "
                                f"directory?")
    return dirs


def evaluate_run(run: str | Path, out: str | Path, features: str | None = None, labels: str | None = None,
                 device: str = "auto", patch_size: int | None = None,
                 skip_bad: bool = False) -> dict[str, Any]:
    """Evaluate every trained model of ``run`` and write predictions, metrics and plots to ``out``.

    Without ``features``/``labels`` each model is evaluated on its own split's test part (its
    validation part when the split has no test part), with the run's data. With them, every
    labelled slide of the new cohort is evaluated by every model (an external test set).
    """
    run, out = Path(run), Path(out)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: no config.yaml; is this a run directory written by `mamba2d train`?")
    claim_output_folder(out, "eval", inside_forbidden=[run])
    cfg = TrainConfig.load(run / "config.yaml")
    external = features is not None or labels is not None
    if external:
        if features is None or labels is None:
            raise ValueError("an external evaluation needs both --features and --labels")
        cfg.features, cfg.labels = features, labels
    if patch_size is not None:
        cfg.patch_size = patch_size
    cfg.skip_bad = skip_bad or cfg.skip_bad
    info = DistInfo(0, 1, pick_device(device))
    data = load_data(cfg)
    results = []
    for model_dir in _model_dirs(run):
        card = load_checkpoint(model_dir / "best.pt", map_location=info.device)
        table = _table_for(card, data.table, cfg)
        model = rebuild_model(card, info.device)
        if external:
            part, rows = "external", list(range(len(table)))
        else:
            k = int(model_dir.name.split("_")[0].removeprefix("fold"))
            split = read_split_csv(run / "splits" / f"splits_{k}.csv")
            parts = resolve_split(split, table, unknown="drop" if cfg.skip_bad else "error", leakage="warn")
            part = "test" if parts["test"] else "val"
            rows = parts[part]
        pred = predict(model, RunData(table, data.bags, data.grid), table, rows, info, cfg)
        metrics = score(pred, table)
        target = out / model_dir.name
        target.mkdir(parents=True, exist_ok=True)
        write_text(target / f"predictions_{part}.csv", pred.to_csv(index=False))
        _plots(table, pred, metrics, target, part)
        res = {"model_dir": model_dir.name, "part": part, "test": metrics}
        write_json(target / "metrics.json", res)
        results.append(res)
    summary = {"run": str(run), "task": cfg.task, "model": cfg.model, "runs": results,
               **summarise_results(results)}
    write_json(out / "metrics.json", summary)
    write_marker(out, "eval", "complete")
    return summary


def _table_for(card: dict[str, Any], table: LabelTable, cfg: TrainConfig) -> LabelTable:
    """The label table in the trained model's terms: its class order, or its survival bin edges."""
    if card["task"] != table.task:
        raise ValueError(f"the model was trained for {card['task']}, the labels are for {table.task}")
    if table.task == "survival":
        return table.with_bins(card["bin_edges"])
    names = list(card["class_names"])
    unknown = sorted(set(table.class_names) - set(names))
    if unknown:
        raise ValueError(f"{table.source}: label(s) {unknown} were not among the trained classes {names}")
    if list(table.class_names) == names:
        return table
    frame = table.frame.copy()
    frame["label"] = frame["label_name"].map({name: i for i, name in enumerate(names)}).astype("int64")
    return replace(table, frame=frame, class_names=names)


def compare_runs(runs: list[str | Path], part: str = "test") -> pd.DataFrame:
    """One row per run: model, number of models, and mean ± std of each headline metric."""
    rows = []
    for run in runs:
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a finished mamba2d run (or eval output)?")
        metrics = json.loads(path.read_text())
        summary = metrics.get(f"{part}_summary") or metrics.get("val_summary")
        if summary is None:
            raise ValueError(f"{path}: no {part} or val metrics")
        row: dict[str, Any] = {"run": str(run), "model": metrics.get("model", "?"),
                               "n": max((v["n"] for v in summary.values()), default=0)}
        for name in COMPARE_METRICS.get(metrics.get("task", "classification"), ()):
            if name in summary:
                s = summary[name]
                mean, std = _number(s["mean"]), _number(s["std"])
                row[name] = format_mean_std(mean, std) if not math.isnan(mean) else "n/a"
                row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        rows.append(row)
    return pd.DataFrame(rows)


def _number(value: Any) -> float:
    """A metric read back from JSON: null (undefined) as NaN."""
    return float("nan") if value is None else float(value)


def format_table(frame: pd.DataFrame) -> str:
    """A Markdown table of the ``mean ± std`` columns of :func:`compare_runs`."""
    cols = [c for c in frame.columns if not c.endswith(("_mean", "_std"))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)
