"""The sweep behind the sensitivity study: job grid and filters, the results log, the report's
numbers on hand-made results, one real job through the worker pool (resumed on the second call),
and the study driver's grid."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from mamba2d.bench.sweep import (
    Job,
    Setting,
    TaskData,
    append_record,
    filter_jobs,
    format_lr,
    job_grid,
    learnable_tasks,
    plot_sensitivity,
    read_results,
    report_markdown,
    results_frame,
    run_pool,
    setting_table,
)
from mamba2d.bench.taskdata import build_task, task_config

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("sensitivity", ROOT / "benchmarks" / "sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_jobs_and_filters():
    assert [format_lr(v) for v in (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2.5e-4)] == \
        ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3", "2.5e-4"]
    s = Setting.point(5e-4, 20, conv="2d")
    assert s.name == "lr=5e-4 ep=20 conv=2d" and s.model_args == (("conv", "2d"),) and s.preset == "paper"
    settings = {"2dmambamil": [Setting.point(lr, 20, conv=c) for c in ("1d", "2d") for lr in (1e-4, 5e-4)],
                "abmil": [Setting.point(1e-4, 20)]}
    jobs = job_grid("grid", settings, ["t1", "t2"], [0, 1])
    assert len(jobs) == (4 + 1) * 2 * 2 and len({j.key for j in jobs}) == len(jobs)
    assert jobs[0].key == "grid|2dmambamil|lr=1e-4 ep=20 conv=1d|t1|0"
    picked = filter_jobs(jobs, models=["2dmambamil"], settings=["*conv=2d"], tasks=["t2"], seeds=[1])
    assert [j.setting.name for j in picked] == ["lr=1e-4 ep=20 conv=2d", "lr=5e-4 ep=20 conv=2d"]

    study = _study()
    grid = study.settings_for("grid")
    assert len(grid["2dmambamil"]) == 20 and all(len(grid[m]) == 5 for m in study.BASELINES)
    assert {s.epochs for m in study.BASELINES for s in grid[m]} == {20}
    defaults = [s for g in study.settings_for("defaults").values() for s in g]
    assert all(s.preset == "default" and s.lr is None and s.epochs is None for s in defaults)
    from mamba2d.mil.recipes import recipe_for

    r = recipe_for("2dmambamil")  # a result of an older default must not count for the current one
    named = study.settings_for("defaults")["2dmambamil"][0].name
    assert named.startswith("defaults: lr=") and f"ep={r.epochs}" in named
    assert all(f"{k}={v}" in named for k, v in r.model_args.items())
    core = [n for n, (g, _) in study.study_tasks().items() if "core" in g]
    assert study.pick_tasks("core,diagonal-*") == [*core, "diagonal-fmnist", "diagonal-g48-large",
                                                   "diagonal-g48-sep8"]
    for _, kwargs in study.study_tasks().values():  # every instance is a valid config
        kwargs = dict(kwargs)
        task_config(kwargs.pop("task"), **kwargs)


def test_results_log_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"key": "a", "status": "error"})
    append_record(path, {"key": "b", "status": "ok", "test_metric": math.nan})
    with open(path, "a") as f:
        f.write('{"key": "c", "sta')  # a killed writer
    append_record(path, {"key": "a", "status": "ok"})
    recs = read_results([path, tmp_path / "missing.jsonl"])
    assert [(r["key"], r["status"]) for r in recs] == [("a", "ok"), ("b", "ok")]
    assert math.isnan(recs[1]["test_metric"])


def _rec(model, setting, task, seed, auc, needs_2d=True, mode="grid", lr=1e-4):
    return {"key": f"{mode}|{model}|{setting}|{task}|{seed}", "mode": mode, "model": model,
            "setting": setting, "task": task, "seed": seed, "kind": "classification", "needs_2d": needs_2d,
            "raster_visible": False, "status": "ok", "test_metric": auc, "seconds": 10.0,
            "train_seconds_per_epoch": 0.5, "lr": lr, "epochs": 20, "device": "cpu", "date": "2026-12-02"}


def test_report_numbers(tmp_path):
    # Task "hard" (2D) is learned by model A only; "never" (2D) by nobody; "ctl" is a control.
    recs = []
    for seed in range(2):
        recs += [_rec("A", "lr=1e-4", "hard", seed, [0.95, 0.85][seed]),
                 _rec("A", "lr=1e-4", "never", seed, 0.7),
                 _rec("A", "lr=1e-4", "ctl", seed, 1.0, needs_2d=False),
                 _rec("B", "lr=1e-4", "hard", seed, 0.5), _rec("B", "lr=1e-4", "never", seed, 0.55),
                 _rec("B", "lr=1e-4", "ctl", seed, [0.9, 0.8][seed], needs_2d=False),
                 _rec("A", "default", "hard", seed, 0.99, mode="defaults"),
                 _rec("B", "default", "hard", seed, 0.4, mode="defaults")]
    recs.append({**_rec("B", "lr=1e-4", "ctl", 9, 0.0), "status": "error"})  # failed jobs are not results
    frame = results_frame(recs)
    assert len(frame) == 16
    assert learnable_tasks(frame) == ["ctl", "hard"]  # mean >= 0.9: A on hard (0.90), A on ctl
    table = setting_table(frame).set_index(["mode", "model"])
    a, b = table.loc[("grid", "A")], table.loc[("grid", "B")]
    assert a["2d_learned"] == 0.5 and b["2d_learned"] == 0.0  # only "hard" counts: A 1 of 2 seeds
    assert a["2d_auc"] == pytest.approx((0.95 + 0.85 + 0.7 + 0.7) / 4) and a["2d_worst"] == pytest.approx(0.7)
    assert a["2d_chance"] == 0 and b["2d_chance"] == 1  # B is at chance on the learnable "hard"
    assert b["control_learned"] == 0.5 and a["control_learned"] == 1.0
    text = report_markdown(recs, model_order=("B", "A"))
    assert "| B | lr=1e-4 | 0 % | 0.525 | 0.500 | 1 | 50 % | 0.850 | 6 | 10 |" in text
    assert "**defaults**, test AUC per task" in text and "| A | 0.990 ± 0.000 |" in text
    png = plot_sensitivity(recs, tmp_path / "img" / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_trains_a_job_and_resumes(tmp_path):
    folder = tmp_path / "data"
    build_task(folder, "presence", "gauss16", n_slides=14, seed=0, grid=(8, 10))
    data = {"presence-tiny": TaskData.from_folder("presence-tiny", folder)}
    assert data["presence-tiny"].kind == "classification" and not data["presence-tiny"].needs_2d
    jobs = [Job("grid", "meanmil", Setting.point(1e-3, 2), "presence-tiny", 0)]
    results = tmp_path / "r.jsonl"
    lines: list[str] = []
    summary = run_pool(jobs, data, results, work=tmp_path / "work", devices=["cpu"], log=lines.append)
    assert summary["done"] == 1 and summary["failed"] == 0, lines
    (rec,) = read_results([results])
    assert rec["status"] == "ok" and rec["metric"] == "auc" and 0.0 <= rec["test_metric"] <= 1.0
    assert rec["lr"] == 1e-3 and rec["epochs"] == 2 and rec["threads"] == 1 and rec["device"] == "cpu"
    assert set(rec["test"]) >= {"auc", "accuracy"} and rec["seconds"] > 0
    assert not (tmp_path / "work" / "runs" / jobs[0].slug).exists()  # run folders are not kept
    again = run_pool(jobs, data, results, work=tmp_path / "work", devices=["cpu"], log=lines.append)
    assert again["skipped"] == 1 and again["done"] == 0
    later = [Job("grid", "meanmil", Setting.point(1e-3, 2), "presence-tiny", 1)]
    none = run_pool(later, data, results, work=tmp_path / "work", devices=["cpu"], max_minutes=0)
    assert none["not_started"] == 1 and none["done"] == 0
    assert json.loads(results.read_text().splitlines()[0])["key"] == jobs[0].key


def test_gpu_only_models_never_go_to_a_cpu_worker():
    from mamba2d.bench.sweep import Job, Setting, _next_job

    todo = [Job("grid", m, Setting.point(1e-4, 20), "t", 0) for m in ("abmil", "mambamil", "2dmambamil")]
    assert _next_job(todo, on_gpu=False, gpu_only={"mambamil"}) == 0
    assert _next_job(todo, on_gpu=True, gpu_only={"mambamil"}) == 1
    assert _next_job(todo[1:2], on_gpu=False, gpu_only={"mambamil"}) is None
    assert _next_job(todo[2:], on_gpu=True, gpu_only={"mambamil"}) == 0
    assert _next_job([], on_gpu=True, gpu_only=()) is None
    assert _next_job(todo, on_gpu=False, gpu_only=lambda j: j.model != "2dmambamil") == 2
