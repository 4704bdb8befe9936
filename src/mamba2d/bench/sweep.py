"""A training sweep over spatial tasks: jobs, a pool of long-lived workers, a results log, a report.

A :class:`Job` is one training run: a model under a :class:`Setting` (a recipe preset, and the lr,
epochs and model arguments it overrides) on one built task (:class:`TaskData`) with one seed.
:func:`run_pool` trains jobs in worker processes that each live for the whole sweep and call
:func:`mamba2d.train.engine.run_training` in-process, so Python imports, kernel compilation and
CUDA start-up are paid once per worker, not once per job. Every finished job is appended at once
to a JSONL results file (one JSON object per line), which is also what makes a sweep resumable:
jobs already in it are skipped. :func:`report_markdown` and :func:`plot_sensitivity` turn results
into the study's tables and figure.

Time-boxing: no job starts after ``max_minutes``; running jobs finish, unless ``hard_minutes`` is
reached, when they are killed (their results are simply missing, so a later call runs them again).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CHANCE_AUC", "LEARNED_AUC", "Job", "Setting", "TaskData", "append_record", "filter_jobs",
           "format_lr", "job_grid", "learnable_tasks", "plot_sensitivity", "read_results", "report_markdown",
           "results_frame", "run_pool", "setting_table", "train_job"]

#: A classification job counts as learned at test AUC >= this.
LEARNED_AUC = 0.9
#: A task's mean test AUC below this is "at chance".
CHANCE_AUC = 0.6


def format_lr(lr: float) -> str:
    """A learning rate as the study writes it: 5e-05 -> '5e-5', 0.001 -> '1e-3', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class Setting:
    """How a model is trained: ``preset`` (a recipe of :mod:`mamba2d.mil.recipes`) fills whatever
    ``lr``, ``epochs`` and ``model_args`` leave unset. ``name`` is how tables show it."""

    name: str
    preset: str = "paper"
    lr: float | None = None
    epochs: int | None = None
    model_args: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def point(cls, lr: float, epochs: int, preset: str = "paper", **model_args: Any) -> Setting:
        """A grid point, named like ``lr=5e-4 ep=20 conv=2d``."""
        args = tuple(sorted(model_args.items()))
        name = " ".join([f"lr={format_lr(lr)}", f"ep={epochs}", *(f"{k}={v}" for k, v in args)])
        return cls(name=name, preset=preset, lr=lr, epochs=epochs, model_args=args)


@dataclass(frozen=True)
class TaskData:
    """A built task folder and what the report needs to know about it."""

    name: str
    folder: str
    kind: str  # classification or survival
    needs_2d: bool
    raster_visible: bool
    rule: str  # the task function's name
    source: str

    @classmethod
    def from_folder(cls, name: str, folder: str | Path) -> TaskData:
        """Read a folder built by :func:`mamba2d.bench.taskdata.build_task`."""
        info = json.loads((Path(folder) / "benchmark.json").read_text())
        return cls(name=name, folder=str(folder), kind=info["task"], needs_2d=bool(info["needs_2d"]),
                   raster_visible=bool(info["raster_visible"]), rule=info["task_name"],
                   source=info["config"]["source"])


@dataclass(frozen=True)
class Job:
    """One training run. ``mode``: which part of the study it belongs to (e.g. grid, defaults, paper)."""

    mode: str
    model: str
    setting: Setting
    task: str
    seed: int

    @property
    def key(self) -> str:
        """Unique id in a results file: ``mode|model|setting|task|seed``."""
        return f"{self.mode}|{self.model}|{self.setting.name}|{self.task}|{self.seed}"

    @property
    def slug(self) -> str:
        """A folder name for the run."""
        raw = f"{self.mode}-{self.model}-{self.setting.name}-{self.task}-s{self.seed}"
        return "".join(c if c.isalnum() or c in "-." else "_" for c in raw)


def job_grid(mode: str, settings: dict[str, Sequence[Setting]], tasks: Iterable[str],
             seeds: Iterable[int]) -> list[Job]:
    """Every (model, setting) of ``settings`` x task x seed, in that nesting order."""
    return [Job(mode, model, s, t, seed) for model, group in settings.items() for s in group
            for t in tasks for seed in seeds]


def filter_jobs(jobs: Iterable[Job], *, models: Sequence[str] | None = None,
                settings: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None) -> list[Job]:
    """The jobs whose model, setting name, task and seed match (shell-style patterns for the
    names, e.g. ``lr=5e-4*``); None keeps all."""
    def ok(value: str, patterns: Sequence[str] | None) -> bool:
        return patterns is None or any(fnmatch.fnmatchcase(value, p) for p in patterns)

    return [j for j in jobs if ok(j.model, models) and ok(j.setting.name, settings) and ok(j.task, tasks)
            and (seeds is None or j.seed in seeds)]


# --------------------------------------------------------------------------------------------------
# The results log


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` in a single write on an O_APPEND descriptor, then fsync. A
    killed writer can leave at most a torn last line: the next record starts on a new line, and
    :func:`read_results` skips the torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # after a torn line: start a new one
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every record of the JSONL files that exist, in order (an unreadable, e.g. torn, line is
    skipped); a later record of a job replaces an earlier one."""
    by_key: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                by_key[rec["key"]] = rec
    return list(by_key.values())


# --------------------------------------------------------------------------------------------------
# One job (runs inside a worker)


def train_job(job: Job, data: TaskData, work: Path, device: str, keep_runs: bool = False) -> dict[str, Any]:
    """Train ``job`` on ``data`` in ``work/runs/<slug>`` and return its results record.

    An interrupted run folder of the same job is continued; a failed one is started afresh. The
    folder is deleted afterwards unless ``keep_runs``.
    """
    from mamba2d.train.config import TrainConfig
    from mamba2d.train.engine import run_training
    from mamba2d.train.rundir import read_marker

    started = time.perf_counter()
    folder = Path(data.folder)
    run_dir = work / "runs" / job.slug
    marker = read_marker(run_dir) if run_dir.is_dir() else None
    if marker is not None and marker.get("status") == "failed":
        shutil.rmtree(run_dir)
    s = job.setting
    cfg = TrainConfig(features=str(folder / "features"), labels=str(folder / "labels.csv"),
                      splits=str(folder / "splits.csv"), out=str(run_dir), task=data.kind, model=job.model,
                      preset=s.preset, lr=s.lr, epochs=s.epochs, model_args=dict(s.model_args),
                      seeds=[job.seed], cache=True, device=device, progress=False)
    result = run_training(cfg, reuse_finished=True)
    run = result["runs"][0]
    metric = "auc" if data.kind == "classification" else "c_index"
    scalars = {part: {k: v for k, v in run.get(part, {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)} for part in ("val", "test")}
    per_epoch = float("nan")
    history = run_dir / f"fold0_seed{job.seed}" / "history.csv"
    if history.is_file():
        h = pd.read_csv(history)
        later = h["train_seconds"].iloc[1:] if len(h) > 1 else h["train_seconds"]
        per_epoch = round(float(later.mean()), 3)
    if not keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {**_job_fields(job, data), "status": "ok", "metric": metric,
            "test_metric": scalars["test"].get(metric), "val_metric": scalars["val"].get(metric),
            "test": scalars["test"], "val": scalars["val"], "best_epoch": run.get("best_epoch"),
            "lr": cfg.lr, "epochs": cfg.epochs, "weight_decay": cfg.weight_decay,
            "model_args": cfg.model_args,
            "seconds": round(time.perf_counter() - started, 2), "train_seconds_per_epoch": per_epoch,
            "device": device}


def _job_fields(job: Job, data: TaskData) -> dict[str, Any]:
    return {"key": job.key, "mode": job.mode, "model": job.model, "setting": job.setting.name,
            "preset": job.setting.preset, "task": job.task, "seed": job.seed, "kind": data.kind,
            "needs_2d": data.needs_2d, "raster_visible": data.raster_visible, "rule": data.rule,
            "source": data.source, "date": date.today().isoformat()}


def _worker(wid: int, device: str, threads: int, work: str, jobs: Any, results: Any) -> None:
    """A worker process: train jobs from ``jobs`` until it gets None, report each on ``results``."""
    log_path = Path(work) / "logs" / f"worker-{wid}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stdout = sys.stderr = log
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError, ValueError):
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    while True:
        item = jobs.get()
        if item is None:
            break
        job, data, keep_runs = item
        print(f"--- {job.key}", flush=True)
        try:
            rec = train_job(job, data, Path(work), device, keep_runs)
        except Exception as err:  # a failed job is a result too; the worker carries on
            traceback.print_exc()
            rec = {**_job_fields(job, data), "status": "error", "device": device,
                   "error": f"{type(err).__name__}: {err}"[-1000:]}
        rec.update(worker=wid, threads=threads)
        results.put((wid, rec))


# --------------------------------------------------------------------------------------------------
# The pool


def _next_job(todo: Sequence[Job], *, on_gpu: bool,
              gpu_only: Collection[str] | Callable[[Job], bool]) -> int | None:
    """Index in ``todo`` of the job a worker takes next (see :func:`run_pool`), or None."""
    wants_gpu = gpu_only if callable(gpu_only) else (lambda j: j.model in gpu_only)
    if on_gpu:
        first = next((i for i, j in enumerate(todo) if wants_gpu(j)), None)
        return first if first is not None else (0 if todo else None)
    return next((i for i, j in enumerate(todo) if not wants_gpu(j)), None)


@dataclass
class _Slot:
    wid: int
    device: str
    proc: Any
    jobs: Any
    job: Job | None = None
    since: float = 0.0


def run_pool(jobs: Sequence[Job], data: dict[str, TaskData], results_path: str | Path, *, work: str | Path,
             devices: Sequence[str], threads: int = 1, max_minutes: float = math.inf,
             hard_minutes: float | None = None, keep_runs: bool = False, retry_failed: bool = False,
             gpu_only: Collection[str] | Callable[[Job], bool] = (),
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``jobs`` (skipping those already in ``results_path``) in one worker per entry of
    ``devices`` (e.g. ``["cpu", "cpu"]`` or ``["cuda:0"] * 4``), each with ``threads`` CPU threads,
    appending each finished job's record to ``results_path``. Jobs of the models in ``gpu_only``
    (those far slower on a CPU), or for which ``gpu_only(job)`` is true, go to GPU workers only; a
    GPU worker takes them before other jobs, a CPU worker takes the first job not among them. Returns
    a summary: jobs done, failed, skipped (already in the results), not started (time limit) and
    killed (hard limit).
    """
    results_path = Path(results_path)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    seen = {r["key"]: r for r in read_results([results_path])}
    pending = [j for j in jobs if j.key not in seen or (retry_failed and seen[j.key].get("status") != "ok")]
    summary = {"jobs": len(jobs), "skipped": len(jobs) - len(pending), "done": 0, "failed": 0,
               "not_started": 0, "killed": 0}
    if not pending or max_minutes <= 0:
        summary["not_started"] = len(pending)
        return summary
    start = time.monotonic()
    deadline = start + max_minutes * 60
    hard = start + hard_minutes * 60 if hard_minutes is not None else math.inf
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    slots: list[_Slot] = []

    def spawn(wid: int, device: str) -> _Slot:
        q = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(wid, device, threads, str(work), q, results), daemon=True)
        proc.start()
        return _Slot(wid, device, proc, q)

    # Thread counts for libraries that read them at import (OpenMP, MKL, numba), inherited by the workers.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    os.environ.update({k: str(threads) for k in saved})
    try:
        slots = [spawn(i, d) for i, d in enumerate(devices)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    todo = list(pending)
    deaths = 0
    try:
        while True:
            now = time.monotonic()
            for slot in slots:
                if slot.job is None and todo and now < deadline:
                    pick = _next_job(todo, on_gpu=slot.device != "cpu", gpu_only=gpu_only)
                    if pick is None:
                        continue
                    slot.job, slot.since = todo.pop(pick), now
                    slot.jobs.put((slot.job, data[slot.job.task], keep_runs))
            busy = [s for s in slots if s.job is not None]
            if not busy:
                break
            if now >= hard:
                for slot in busy:
                    log(f"killed at the hard limit: {slot.job.key}")
                    slot.proc.kill()
                    summary["killed"] += 1
                    slot.job = None
                break
            try:
                wid, rec = results.get(timeout=1.0)
            except queue_mod.Empty:
                for i, slot in enumerate(slots):
                    if slot.job is not None and not slot.proc.is_alive():
                        job = slot.job
                        rec = {**_job_fields(job, data[job.task]), "status": "error", "device": slot.device,
                               "error": f"the worker died (exit code {slot.proc.exitcode}); out of memory?"}
                        append_record(results_path, rec)
                        summary["failed"] += 1
                        deaths += 1
                        log(f"error {job.key}: {rec['error']}")
                        slots[i] = spawn(slot.wid, slot.device)
                if deaths > 2 * len(slots):  # workers that cannot start would fail every job
                    log(f"stopping: {deaths} workers died in a row; see {work / 'logs'}")
                    break
                continue
            deaths = 0
            slot = next(s for s in slots if s.wid == wid)
            slot.job = None
            append_record(results_path, rec)
            if rec["status"] == "ok":
                summary["done"] += 1
                log(f"{rec['key']}: test {rec['metric']} {rec['test_metric']:.3f} in {rec['seconds']:.0f} s")
            else:
                summary["failed"] += 1
                log(f"error {rec['key']}: {rec['error'][-300:]}")
    finally:
        for slot in slots:
            if slot.proc.is_alive():
                with contextlib.suppress(Exception):
                    slot.jobs.put(None)
        for slot in slots:
            slot.proc.join(timeout=30)
            if slot.proc.is_alive():
                slot.proc.kill()
    summary["not_started"] = len(todo)
    summary["minutes"] = round((time.monotonic() - start) / 60, 2)
    return summary


# --------------------------------------------------------------------------------------------------
# The report


def results_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished job (status ok): mode, model, setting, task, seed, kind, needs_2d,
    raster_visible, test_metric, seconds, train_seconds_per_epoch."""
    cols = ["mode", "model", "setting", "task", "seed", "kind", "needs_2d", "raster_visible", "test_metric",
            "seconds", "train_seconds_per_epoch", "lr", "epochs"]
    rows = [{c: r.get(c) for c in cols} for r in records if r.get("status") == "ok"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["test_metric"] = pd.to_numeric(frame["test_metric"], errors="coerce")
    return frame


def learnable_tasks(frame: pd.DataFrame, threshold: float = LEARNED_AUC) -> list[str]:
    """Classification tasks on which some (mode, model, setting) reaches a mean test AUC over its
    seeds of at least ``threshold``."""
    cls = frame[frame["kind"] == "classification"]
    means = cls.groupby(["task", "mode", "model", "setting"])["test_metric"].mean()
    return sorted({t for (t, *_), v in means.items() if v >= threshold})


def setting_table(frame: pd.DataFrame, threshold: float = LEARNED_AUC) -> pd.DataFrame:
    """Per (mode, model, setting), for 2D tasks and controls separately: ``learned`` (fraction of
    (task, seed) pairs on learnable tasks with test AUC >= threshold), ``auc`` (mean test AUC over
    all pairs), ``worst`` (lowest per-task mean AUC), ``chance`` (learnable tasks whose mean AUC is
    below :data:`CHANCE_AUC`) and ``pairs``."""
    cls = frame[frame["kind"] == "classification"]
    learnable = set(learnable_tasks(frame, threshold))
    rows = []
    for (mode, model, setting), g in cls.groupby(["mode", "model", "setting"], sort=False):
        row: dict[str, Any] = {"mode": mode, "model": model, "setting": setting}
        for group, sub in (("2d", g[g["needs_2d"]]), ("control", g[~g["needs_2d"].astype(bool)])):
            on = sub[sub["task"].isin(learnable)]
            per_task = sub.groupby("task")["test_metric"].mean()
            learned = (on["test_metric"] >= threshold).mean()
            row[f"{group}_learned"] = float(learned) if len(on) else float("nan")
            row[f"{group}_auc"] = float(sub["test_metric"].mean()) if len(sub) else float("nan")
            row[f"{group}_worst"] = float(per_task.min()) if len(per_task) else float("nan")
            row[f"{group}_chance"] = int(sum(v < CHANCE_AUC for t, v in per_task.items() if t in learnable))
            row[f"{group}_pairs"] = int(len(sub))
        row["seconds"] = float(g["seconds"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.3f}" if len(v) == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.0f} %"


def _num(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def report_markdown(records: Iterable[dict[str, Any]], *, threshold: float = LEARNED_AUC,
                    model_order: Sequence[str] = ()) -> str:
    """The study's Markdown: the per-setting table of every mode, per-task tables of the modes that
    have one setting per model (e.g. defaults, paper), and the survival C-index table."""
    records = list(records)
    frame = results_frame(records)
    if frame.empty:
        return "_no finished jobs_\n"
    order = {m: i for i, m in enumerate(model_order)}
    frame = frame.assign(_o=frame["model"].map(lambda m: order.get(m, len(order))))
    frame = frame.sort_values(["_o", "model", "epochs", "setting"], kind="stable").drop(columns="_o")
    learnable = learnable_tasks(frame, threshold)
    cls = frame[frame["kind"] == "classification"]
    tasks2d = sorted(cls[cls["needs_2d"]]["task"].unique())
    controls = sorted(cls[~cls["needs_2d"].astype(bool)]["task"].unique())
    devices = sorted({str(r.get("device")) for r in records if r.get("status") == "ok"})
    dates = sorted({str(r.get("date")) for r in records if r.get("status") == "ok"})
    out = [f"Results of {len(frame)} jobs ({dates[0]} to {dates[-1]}; devices: {', '.join(devices)}). "
           f"Learned: test AUC ≥ {threshold} on a task that some setting learns (mean over seeds ≥ "
           f"{threshold}): {', '.join(learnable) or 'none'}. 2D tasks: {', '.join(tasks2d) or 'none'}; "
           f"controls: {', '.join(controls) or 'none'}.", ""]
    table = setting_table(frame, threshold)
    for mode, g in table.groupby("mode", sort=False):
        out += [f"**{mode}** (classification; per model and setting, over (task, seed) pairs)", "",
                "| model | setting | 2D learned | 2D mean AUC | 2D worst task | 2D at chance "
                "| control learned | control mean AUC | pairs | s / job |", "|---" * 10 + "|"]
        for _, r in g.iterrows():
            pairs = r["2d_pairs"] + r["control_pairs"]
            out.append(f"| {r['model']} | {r['setting']} | {_pct(r['2d_learned'])} | {_num(r['2d_auc'])} | "
                       f"{_num(r['2d_worst'])} | {r['2d_chance']} | {_pct(r['control_learned'])} | "
                       f"{_num(r['control_auc'])} | {pairs} | {r['seconds']:.0f} |")
        out.append("")
    for mode, g in cls.groupby("mode", sort=False):
        if g.groupby("model")["setting"].nunique().max() != 1:
            continue
        tasks = tasks2d + controls
        tasks = [t for t in tasks if t in set(g["task"])]
        out += [f"**{mode}**, test AUC per task (mean ± std over seeds; * = needs 2D)", "",
                "| model | " + " | ".join(t + ("*" if t in tasks2d else "") for t in tasks) + " |",
                "|---" * (len(tasks) + 1) + "|"]
        for model, m in g.groupby("model", sort=False):
            cells = [_cell(m[m["task"] == t]["test_metric"]) for t in tasks]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        out.append("")
    surv = frame[frame["kind"] == "survival"]
    if len(surv):
        tasks = sorted(surv["task"].unique())
        out += ["**survival**, test C-index (mean ± std over seeds)", "",
                "| mode | model | setting | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 3) + "|"]
        for (mode, model, setting), m in surv.groupby(["mode", "model", "setting"], sort=False):
            out.append(f"| {mode} | {model} | {setting} | "
                       + " | ".join(_cell(m[m["task"] == t]["test_metric"]) for t in tasks) + " |")
        out.append("")
    return "\n".join(out)


def plot_sensitivity(records: Iterable[dict[str, Any]], path: str | Path, *,
                     threshold: float = LEARNED_AUC, title: str = "") -> Path:
    """PNG: fraction of (task, seed) pairs learned (top) and mean test AUC (bottom) against the
    learning rate, for 2D tasks (left) and controls (right); one line per model (per conv and
    epochs for 2dmambamil) of the grid mode, and each model's default as a marker at its lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mamba2d.io import atomic_write

    frame = results_frame(records)
    table = setting_table(frame, threshold)
    lr_of = frame.groupby(["mode", "model", "setting"])["lr"].first()
    table["lr"] = [lr_of.get((r["mode"], r["model"], r["setting"]), np.nan) for _, r in table.iterrows()]
    # Top: the fraction learned (undefined while no task is learnable); bottom: the mean test AUC.
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4), sharex=True)
    grid = table[table["mode"] == "grid"].copy()
    # One line per model, and per (conv, epochs) for models with more settings than learning rates.
    grid["line"] = [" ".join([m, *(p for p in s.split() if not p.startswith("lr="))])
                    for m, s in zip(grid["model"], grid["setting"], strict=True)]
    cmap = plt.get_cmap("tab20")
    for row, (what, label) in enumerate((("learned", f"fraction of (task, seed) learned (AUC ≥ {threshold})"),
                                         ("auc", "mean test AUC over (task, seed)"))):
        for ax, group in zip(axes[row], ("2d", "control"), strict=True):
            for i, (line, g) in enumerate(grid.groupby("line", sort=False)):
                g = g.sort_values("lr")
                style = "-" if line.startswith("2dmambamil") else "--"
                ax.plot(g["lr"], g[f"{group}_{what}"], style, marker="o", ms=3, color=cmap(i % 20),
                        label=line)
            for i, (_, r) in enumerate(table[table["mode"] != "grid"].iterrows()):
                ax.plot([r["lr"]], [r[f"{group}_{what}"]], marker="*" if r["mode"] == "defaults" else "s",
                        ms=9, ls="none", color=cmap((i + 10) % 20), label=f"{r['model']} ({r['mode']})")
            ax.set_xscale("log")
            if row == 1:
                ax.set_xlabel("learning rate")
                ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            else:
                ax.set_title("tasks that need 2D context" if group == "2d" else "controls")
            ax.set_ylim(-0.03 if what == "learned" else 0.2, 1.03)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(label)
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")

    atomic_write(path, write)
    plt.close(fig)
    return Path(path)

