"""The sensitivity study of issue 16: every MIL model over learning rates (and 2DMambaMIL's
convolution and schedule) on a family of spatial tasks, to choose defaults that are robust across
tasks; and the validation of those defaults.

Modes (the job grid is models x settings x tasks x seeds):

* ``grid``: 2dmambamil over lr {5e-5, 1e-4, 2e-4, 5e-4, 1e-3} x conv {1d, 2d} x epochs {20, 50};
  every baseline over the same lrs at 20 epochs. Everything a setting leaves open comes from the
  paper recipe (AdamW, weight decay 1e-5, each model's published architecture), so the grid does
  not depend on the defaults it is used to choose. 3 seeds.
* ``defaults``: every model with no setting at all (``mamba2d train --model X``: its default
  recipe). 5 seeds.
* ``paper``: every model under ``--preset paper``. 5 seeds.

Each task is built once into ``--data`` (reused by later calls) and trained on by a pool of
long-lived workers (``mamba2d.bench.sweep``); every finished job is appended to ``--results`` at
once, and jobs already there are skipped, so a study runs as a series of time-boxed chunks:

    # CPU, a subset: two workers of one thread each, 9 minutes per call
    python benchmarks/sensitivity.py run --mode grid --tasks core --models 2dmambamil,abmil \\
        --settings 'lr=5e-4*' --seeds 0 --device cpu --workers 2 --max-minutes 9 \\
        --data ~/.cache/mamba2d/sensitivity --results benchmarks/results/sensitivity_cpu.jsonl
    # GPU: several workers per GPU
    python benchmarks/sensitivity.py run --mode grid --device cuda --workers-per-gpu 6 --max-minutes 8 ...
    # what is left to run, and the report (Markdown on stdout, the figure in docs/img/)
    python benchmarks/sensitivity.py list --mode grid --results R.jsonl
    python benchmarks/sensitivity.py report R.jsonl [MORE.jsonl ...] --plot docs/img/sensitivity.png

``--tasks`` takes task names, shell patterns or groups: ``core`` (one instance of each
classification task, small grids), ``variants`` (other feature sources and dimensions, more holes,
no distractors), ``large`` (grids up to 200 cells a side), ``easy`` (prototypes 8 noise sd apart, 320
slides), ``survival``, ``all``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import sys
import time
from pathlib import Path

#: Where task datasets are built and reused, unless --data says otherwise.
DEFAULT_DATA = str(Path.home() / ".cache" / "mamba2d" / "sensitivity")
#: The learning rates of the grid.
LRS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3)
BASELINES = ("mambamil", "abmil", "s4mil", "transmil", "clam_sb", "dsmil", "dtfd", "meanmil", "maxmil")
MODELS = ("2dmambamil", *BASELINES)
#: Default seeds per mode.
SEEDS = {"grid": (0, 1, 2), "defaults": (0, 1, 2, 3, 4), "paper": (0, 1, 2, 3, 4)}
#: Rough relative cost of one epoch per model, to start the slowest jobs first (longest-first
#: packing keeps the end of a time-boxed chunk busy with short jobs).
COST = {"mambamil": 6, "transmil": 5, "2dmambamil": 4, "dtfd": 3, "s4mil": 2, "clam_sb": 2, "dsmil": 2,
        "abmil": 1, "meanmil": 1, "maxmil": 1}


def study_tasks() -> dict[str, tuple[tuple[str, ...], dict]]:
    """Task instances: name -> (groups, build_task keyword arguments)."""
    small = {"n_slides": 192}
    large = {"n_slides": 120}
    out: dict[str, tuple[tuple[str, ...], dict]] = {}
    for task in ("diagonal", "corner", "enclosure", "adjacency", "pair_orientation", "border_distance",
                 "cluster_count", "presence", "amount"):
        out[f"{task}-g48"] = (("core",), {"task": task, "source": "gauss48", **small})
    out["arrangement-fmnist"] = (("core",), {"task": "arrangement", "source": "fmnist", **small})
    out["diagonal-fmnist"] = (("variants",), {"task": "diagonal", "source": "fmnist", **small})
    out["enclosure-g32"] = (("variants",), {"task": "enclosure", "source": "gauss32", **small})
    out["adjacency-g128"] = (("variants",), {"task": "adjacency", "source": "gauss128", **small})
    out["cluster_count-g48-holes"] = (("variants",), {"task": "cluster_count", "source": "gauss48",
                                                      "holes": (0.15, 0.3), **small})
    out["corner-g48-nodistract"] = (("variants",), {"task": "corner", "source": "gauss48",
                                                    "distractors": (0, 0), **small})
    out["presence-g32"] = (("variants",), {"task": "presence", "source": "gauss32", **small})
    out["border_distance-g48-large"] = (("large",), {"task": "border_distance", "source": "gauss48",
                                                     "grid": (48, 160), **large})
    out["diagonal-g48-large"] = (("large",), {"task": "diagonal", "source": "gauss48", "grid": (64, 200),
                                              **large})
    # Stronger signal and more slides: a lone tile is certain (8 noise sd between prototypes).
    for task in ("diagonal", "enclosure", "adjacency", "presence", "corner", "pair_orientation",
                 "border_distance", "cluster_count", "amount"):
        out[f"{task}-g48-sep8"] = (("easy",), {"task": task, "source": "gauss48", "separation": 8.0,
                                               "n_slides": 320})
    for task in ("surv_enclosure", "surv_adjacency", "surv_amount"):
        out[f"{task}-g48"] = (("survival",), {"task": task, "source": "gauss48", **small})
    return out


def pick_tasks(spec: str) -> list[str]:
    """Task instance names from a comma list of names, shell patterns and groups."""
    tasks = study_tasks()
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            names = list(tasks)
        elif any(item in groups for groups, _ in tasks.values()):
            names = [n for n, (groups, _) in tasks.items() if item in groups]
        else:
            names = [n for n in tasks if fnmatch.fnmatchcase(n, item)]
            if not names:
                raise SystemExit(f"--tasks: no task instance or group {item!r}; "
                                 f"instances: {', '.join(tasks)}")
        chosen += [n for n in names if n not in chosen]
    return chosen


def settings_for(mode: str) -> dict:
    """Model -> its settings under ``mode``."""
    from mamba2d.bench.sweep import Setting

    if mode == "grid":
        out = {"2dmambamil": [Setting.point(lr, ep, conv=conv) for ep in (20, 50) for conv in ("1d", "2d")
                              for lr in LRS]}
        out.update({m: [Setting.point(lr, 20) for lr in LRS] for m in BASELINES})
        return out
    if mode in ("defaults", "paper"):
        from mamba2d.mil.recipes import recipe_for

        preset = "default" if mode == "defaults" else "paper"
        # The name carries the recipe, so results of an older default are not taken for the current one.
        return {m: [Setting(name=f"{mode}: " + Setting.point(r.lr, r.epochs, **r.model_args).name,
                            preset=preset)] for m in MODELS for r in [recipe_for(m, preset)]}
    raise SystemExit(f"--mode must be grid, defaults or paper, got {mode!r}")


def build(data_root: Path, names: list[str], *, fmnist_dir: str | None, log=print) -> dict:
    """Build (or find) each task instance in ``data_root/<name>``; returns name -> TaskData."""
    from mamba2d.bench.sweep import TaskData
    from mamba2d.bench.taskdata import build_task

    tasks = study_tasks()
    out = {}
    for name in names:
        kwargs = dict(tasks[name][1])
        task = kwargs.pop("task")
        t0 = time.perf_counter()
        folder = data_root / name
        info = build_task(folder, task, cache_dir=data_root / "feature-cache", fmnist_dir=fmnist_dir,
                          **kwargs)
        seconds = time.perf_counter() - t0
        if seconds > 1:
            patches = info["counts"]["train"]["patches"]
            log(f"built {name}: {sum(info['counts'][p]['slides'] for p in ('train', 'val', 'test'))} slides, "
                f"{patches['mean']:.0f} patches per slide on average, {seconds:.1f} s")
        out[name] = TaskData.from_folder(name, folder)
    return out


def _jobs(a: argparse.Namespace) -> list:
    from mamba2d.bench.sweep import filter_jobs, job_grid

    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(SEEDS[a.mode])
    tasks = pick_tasks(a.tasks or ("all" if a.mode != "grid" else "core"))
    jobs = job_grid(a.mode, settings_for(a.mode), tasks, seeds)
    jobs = filter_jobs(jobs, models=a.models.split(",") if a.models else None,
                       settings=a.settings.split(",") if a.settings else None)
    if a.chunk:
        i, n = (int(v) for v in a.chunk.split("/"))
        jobs = [j for k, j in enumerate(jobs) if k % n == i - 1]
    # Longest first: more epochs, costlier models, larger tasks.
    jobs.sort(key=lambda j: (-(j.setting.epochs or 20) * COST.get(j.model, 1), "large" not in j.task))
    return jobs


def timing(a: argparse.Namespace) -> dict:
    """Time jobs of 1 and ``--long-epochs`` epochs per (model, task) in one warm worker, and
    extrapolate a job of 20 and 50 epochs: fixed cost + epochs x per-epoch cost (training, then
    validation). Each model first trains one warm-up epoch on the smallest selected task (imports,
    kernel compilation), which is not timed."""
    import tempfile

    import torch

    from mamba2d.bench.sweep import Job, Setting, read_results, run_pool

    names = pick_tasks(a.tasks)
    models = [m for m in MODELS if any(fnmatch.fnmatchcase(m, p) for p in a.models.split(","))]
    data_root = Path(a.data).expanduser()
    t0 = time.perf_counter()
    data = build(data_root, names, fmnist_dir=a.fmnist_dir)
    build_s = time.perf_counter() - t0
    smallest = min(names, key=lambda n: json.loads((Path(data[n].folder) / "benchmark.json").read_text())
                   ["counts"]["train"]["patches"]["total"])
    jobs = []
    for m in models:
        args = {"conv": "2d"} if m == "2dmambamil" else {}
        jobs.append(Job("warmup", m, Setting.point(5e-4, 1, **args), smallest, 0))
        for name in names:
            for epochs in (1, a.long_epochs):
                jobs.append(Job("timing", m, Setting.point(5e-4, epochs, **args), name, 0))
    device = "cpu" if a.device == "cpu" else "cuda:0"
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "timing.jsonl"
        run_pool(jobs, data, results, work=Path(tmp) / "work", devices=[device], threads=a.threads,
                 log=lambda m: print(m, flush=True))
        recs = {r["key"]: r for r in read_results([results])}
    rows = []
    for m in models:
        args = {"conv": "2d"} if m == "2dmambamil" else {}
        for name in names:
            short, long = (recs.get(Job("timing", m, Setting.point(5e-4, e, **args), name, 0).key)
                           for e in (1, a.long_epochs))
            if not short or not long or short["status"] != "ok" or long["status"] != "ok":
                continue
            # Two points on a shared machine can give a slope below the training time alone: clamp.
            per_epoch = max((long["seconds"] - short["seconds"]) / (a.long_epochs - 1),
                            long["train_seconds_per_epoch"])
            fixed = max(short["seconds"] - per_epoch, 0.0)
            info = json.loads((Path(data[name].folder) / "benchmark.json").read_text())
            rows.append({"model": m, "task": name, "mean_patches": info["counts"]["train"]["patches"]["mean"],
                         "slides": sum(info["counts"][p]["slides"] for p in ("train", "val", "test")),
                         "source": data[name].source,
                         "job_1_epoch_s": short["seconds"], f"job_{a.long_epochs}_epochs_s": long["seconds"],
                         "train_s_per_epoch": long["train_seconds_per_epoch"],
                         "per_epoch_s": round(per_epoch, 2), "fixed_s": round(fixed, 2),
                         "est_job_20_epochs_s": round(fixed + 20 * per_epoch, 1),
                         "est_job_50_epochs_s": round(fixed + 50 * per_epoch, 1)})
    device_name = torch.cuda.get_device_name(0) if device != "cpu" else "cpu"
    return {"date": _dt.date.today().isoformat(), "device": device_name, "threads_per_worker": a.threads,
            "workers": 1, "torch": torch.__version__, "build_seconds": round(build_s, 1), "rows": rows,
            "note": "one worker; on a shared machine these numbers are preliminary"}


def probe(a: argparse.Namespace) -> list[dict]:
    """Context-free baselines per classification task instance, fitted on train + val slides and
    scored on the test slides: logistic regression on mean-pooled and on max-pooled features, and on
    the true counts of each tile kind (the best any bag-of-tiles model can do)."""
    import h5py
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    data = build(Path(a.data).expanduser(), pick_tasks(a.tasks), fmnist_dir=a.fmnist_dir)
    rows = []
    for name, d in data.items():
        if d.kind != "classification":
            continue
        slides = pd.read_csv(Path(d.folder) / "slides.csv")
        feats = {"mean-pooled features": [], "max-pooled features": [], "counts of tile kinds": []}
        for sid in slides["slide_id"]:
            with h5py.File(Path(d.folder) / "features" / f"{sid}.h5") as f:
                x, kind = f["features"][()], f["tile_kind"][()]
            feats["mean-pooled features"].append(x.mean(0))
            feats["max-pooled features"].append(x.max(0))
            feats["counts of tile kinds"].append(np.bincount(kind, minlength=5).astype(float))
        y = slides["label"].to_numpy()
        train = slides["part"].isin(["train", "val"]).to_numpy()
        row = {"task": name, "needs_2d": d.needs_2d}
        for what, x in feats.items():
            x = StandardScaler().fit(np.asarray(x)[train]).transform(np.asarray(x))
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(x[train], y[train])
            p = clf.predict_proba(x[~train])
            auc = roc_auc_score(y[~train], p[:, 1]) if p.shape[1] == 2 else \
                roc_auc_score(y[~train], p, multi_class="ovr")
            row[what] = round(float(auc), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="grid", choices=("grid", "defaults", "paper"))
    p.add_argument("--tasks", help="names, patterns or groups (core, variants, large, survival, all); "
                                   "default: core for grid, all otherwise")
    p.add_argument("--models", help="comma list or patterns (default: all)")
    p.add_argument("--settings", help="comma list of setting names or patterns, e.g. 'lr=5e-4*,*conv=2d'")
    p.add_argument("--seeds", help="comma list (default: 0,1,2 for grid, 0-4 otherwise)")
    p.add_argument("--chunk", help="I/N: only every N-th job starting at the I-th (to split a study)")
    p.add_argument("--results", default="benchmarks/results/sensitivity.jsonl")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train the selected jobs that are not in --results yet")
    _add_selection(run)
    run.add_argument("--data", default=DEFAULT_DATA,
                     help="where task datasets are built and reused")
    run.add_argument("--work", help="run folders and worker logs (default: DATA/work)")
    run.add_argument("--device", default="cpu", help="cpu or cuda (workers spread over every visible GPU)")
    run.add_argument("--workers", type=int, default=1, help="worker processes (cpu)")
    run.add_argument("--workers-per-gpu", type=int, default=4)
    run.add_argument("--cpu-workers", type=int, default=0,
                     help="with --device cuda: CPU workers beside the GPU ones")
    run.add_argument("--gpu-only", default="mambamil,transmil",
                     help="models whose jobs go to GPU workers only (with --cpu-workers)")
    run.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    run.add_argument("--max-minutes", type=float, default=9.0, help="start no job after this")
    run.add_argument("--hard-minutes", type=float, default=None, help="kill running jobs at this")
    run.add_argument("--keep-runs", action="store_true", help="keep each job's run folder")
    run.add_argument("--retry-failed", action="store_true")
    run.add_argument("--fmnist-dir")
    bld = sub.add_parser("build", help="only build the selected tasks")
    bld.add_argument("--tasks", default="all")
    bld.add_argument("--data", default=DEFAULT_DATA)
    bld.add_argument("--fmnist-dir")
    lst = sub.add_parser("list", help="count the selected jobs, done and pending")
    _add_selection(lst)
    tim = sub.add_parser("timing", help="time 1- and N-epoch jobs per model and task; write JSON")
    tim.add_argument("--tasks", default="diagonal-g48")
    tim.add_argument("--models", default="*", help="comma list or patterns")
    tim.add_argument("--long-epochs", type=int, default=3)
    tim.add_argument("--device", default="cpu")
    tim.add_argument("--threads", type=int, default=1)
    tim.add_argument("--data", default=DEFAULT_DATA)
    tim.add_argument("--fmnist-dir")
    tim.add_argument("--out", help="JSON file to write (default: print)")
    prb = sub.add_parser("probe", help="context-free baselines per task (pooled features, tile counts)")
    prb.add_argument("--tasks", default="core,variants")
    prb.add_argument("--data", default=DEFAULT_DATA)
    prb.add_argument("--fmnist-dir")
    prb.add_argument("--out", help="JSON file to write")
    rep = sub.add_parser("report", help="Markdown tables (stdout or --md) and the figure (--plot)")
    rep.add_argument("results", nargs="+")
    rep.add_argument("--md")
    rep.add_argument("--plot")
    a = ap.parse_args(argv)

    if a.cmd == "build":
        build(Path(a.data).expanduser(), pick_tasks(a.tasks), fmnist_dir=a.fmnist_dir)
        return 0
    if a.cmd == "timing":
        from mamba2d.io import write_json

        out = timing(a)
        if a.out:
            write_json(a.out, out)
        print(json.dumps(out, indent=1))
        return 0
    if a.cmd == "probe":
        from mamba2d.io import write_json

        rows = probe(a)
        if a.out:
            write_json(a.out, {"date": _dt.date.today().isoformat(), "rows": rows})
        return 0
    if a.cmd == "report":
        from mamba2d.bench.sweep import plot_sensitivity, read_results, report_markdown
        from mamba2d.io import write_text

        records = read_results(a.results)
        text = report_markdown(records, model_order=MODELS)
        if a.md:
            write_text(a.md, text)
        else:
            print(text)
        if a.plot:
            plot_sensitivity(records, a.plot, title="sensitivity study: " + ", ".join(a.results))
        return 0

    from mamba2d.bench.sweep import read_results

    jobs = _jobs(a)
    done = {r["key"] for r in read_results([a.results]) if r.get("status") == "ok"}
    pending = [j for j in jobs if j.key not in done]
    if a.cmd == "list":
        by_model: dict[str, int] = {}
        for j in pending:
            by_model[j.model] = by_model.get(j.model, 0) + 1
        print(f"{len(jobs)} jobs selected, {len(jobs) - len(pending)} done, {len(pending)} pending: "
              + ", ".join(f"{m} {n}" for m, n in by_model.items()))
        return 0

    import torch

    from mamba2d.bench.sweep import run_pool

    data_root = Path(a.data).expanduser()
    work = Path(a.work).expanduser() if a.work else data_root / "work"
    if a.device == "cpu":
        devices = ["cpu"] * a.workers
    else:
        n = torch.cuda.device_count()
        if n == 0:
            raise SystemExit("--device cuda: no GPU is visible")
        devices = [f"cuda:{i}" for i in range(n) for _ in range(a.workers_per_gpu)] + ["cpu"] * a.cpu_workers
    t0 = time.perf_counter()
    data = build(data_root, sorted({j.task for j in pending}), fmnist_dir=a.fmnist_dir)
    spent = (time.perf_counter() - t0) / 60
    print(f"{len(jobs)} jobs selected, {len(jobs) - len(pending)} already done; {len(devices)} workers on "
          f"{a.device} ({a.threads} thread(s) each); data ready in {60 * spent:.1f} s", flush=True)
    summary = run_pool(pending, data, a.results, work=work, devices=devices, threads=a.threads,
                       max_minutes=a.max_minutes - spent,
                       hard_minutes=None if a.hard_minutes is None else a.hard_minutes - spent,
                       keep_runs=a.keep_runs, retry_failed=a.retry_failed,
                       gpu_only=[m for m in a.gpu_only.split(",") if m] if a.cpu_workers else (),
                       log=lambda m: print(m, flush=True))
    summary["date"] = _dt.date.today().isoformat()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
