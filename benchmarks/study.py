"""The spatial-benchmark study (``mamba2d demo --full``, parallel): every MIL model and the 2DMambaMIL
ablations, classification and survival, several seeds, spread over every visible GPU.

Each job is one ``mamba2d train`` run; results are collected as they finish, so whatever is done
before ``--max-minutes`` is kept. ``--table`` turns a results JSON into the Markdown table of
docs/benchmark.md.

    python benchmarks/study.py --out-json benchmarks/results/study.json --seeds 0,1,2 --epochs 10
    python benchmarks/study.py --table benchmarks/results/study.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mamba2d.bench.demo import STUDY_SURVIVAL_VARIANTS, STUDY_VARIANTS, variant_slug


def build(root: Path, task: str, preset: str) -> Path:
    from mamba2d.bench import BenchmarkConfig, build_benchmark

    out = root / f"bench-{preset}-{task}"
    build_benchmark(out, BenchmarkConfig.preset(preset, task=task), progress=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-json")
    ap.add_argument("--table", help="print the Markdown table of a results JSON and exit")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--tasks", default="classification,survival")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="start no job after this")
    ap.add_argument("--grace-minutes", type=float, default=0.5,
                    help="then give running jobs this long before killing them")
    ap.add_argument("--skip", nargs="*", default=[], help="results JSONs whose finished jobs are not rerun")
    ap.add_argument("--merge", nargs="+",
                    help="write the union of these results JSONs to --out-json and exit")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--per-gpu", type=int, default=1, help="training processes at a time on each GPU")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return 0
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        merged = {**parts[0], "parts": [{k: v for k, v in p.items() if k != "results"} for p in parts],
                  "results": [r for p in parts for r in p["results"]]}
        merged["seeds"] = sorted({r["seed"] for r in merged["results"]})
        Path(a.out_json).write_text(json.dumps(merged, indent=1))
        return 0
    import torch

    n_gpus = torch.cuda.device_count()
    slots = [f"{i}:{k}" for i in range(n_gpus) for k in range(a.per_gpu)] or ["cpu"]
    root = Path(a.workdir or tempfile.mkdtemp(prefix="study-"))
    t0 = time.perf_counter()
    benches = {task: build(root, task, a.preset) for task in a.tasks.split(",")}
    build_s = round(time.perf_counter() - t0, 1)
    seeds = [int(s) for s in a.seeds.split(",")]
    names = list(STUDY_VARIANTS) if a.variants == "all" else a.variants.split(";")
    done = {(r["task"], r["variant"], r["seed"]) for p in a.skip
            for r in json.loads(Path(p).read_text())["results"] if r["rc"] == 0}
    jobs = [(task, name, seed) for seed in seeds for task in benches for name in names
            if (task == "classification" or name in STUDY_SURVIVAL_VARIANTS)
            and (task, name, seed) not in done]
    # Longest jobs first, so that the last ones to finish are short.
    slow = ("2dmambamil", "transmil", "mambamil")
    jobs.sort(key=lambda j: not j[1].startswith(slow))
    out: dict = {"date": _dt.date.today().isoformat(),
                 "device": torch.cuda.get_device_name(0) if n_gpus else "cpu", "gpus": n_gpus,
                 "torch": torch.__version__, "preset": a.preset, "epochs": a.epochs, "lr": a.lr,
                 "seeds": seeds, "benchmark_build_s": build_s, "results": [], "unfinished": []}
    deadline = time.time() + a.max_minutes * 60
    running: dict[str, tuple[subprocess.Popen, tuple, Path, float]] = {}
    queue = list(jobs)

    def save() -> None:
        if a.out_json:
            Path(a.out_json).write_text(json.dumps(out, indent=1))

    while queue or running:
        for slot in slots:
            if slot not in running and queue and time.time() < deadline:
                task, name, seed = queue.pop(0)
                model, args = STUDY_VARIANTS[name]
                run_dir = root / "runs" / f"{task}-{variant_slug(name)}-s{seed}"
                bench = benches[task]
                cmd = [sys.executable, "-m", "mamba2d", "train", "--features", str(bench / "features"),
                       "--labels", str(bench / "labels.csv"), "--splits", str(bench / "splits.csv"),
                       "--task", task, "--model", model, "--epochs", str(a.epochs), "--lr", str(a.lr),
                       "--seed", str(seed), "--cache", "--no-progress", "--out", str(run_dir)]
                for k, v in args.items():
                    cmd += ["--model-arg", f"{k}={v}"]
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot.split(":")[0] if slot != "cpu" else ""}
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # a file: a full pipe would block
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[slot] = (proc, (task, name, seed), run_dir, time.perf_counter())
        for slot, (proc, job, run_dir, started) in list(running.items()):
            if proc.poll() is None:
                if time.time() > deadline + a.grace_minutes * 60:
                    proc.kill()
                continue
            del running[slot]
            task, name, seed = job
            rec = {"task": task, "variant": name, "seed": seed, "rc": proc.returncode,
                   "seconds": round(time.perf_counter() - started, 1)}
            metrics = run_dir / "metrics.json"
            if proc.returncode == 0 and metrics.is_file():
                run = json.loads(metrics.read_text())["runs"][0]
                rec["test"] = {k: v for k, v in run.get("test", {}).items() if isinstance(v, (int, float))}
                rec["best_epoch"] = run["best_epoch"]
                hist = run_dir / f"fold0_seed{seed}" / "history.csv"
                if hist.is_file():
                    import pandas as pd

                    h = pd.read_csv(hist)
                    later = h["train_seconds"].iloc[1:] if len(h) > 1 else h["train_seconds"]
                    rec["train_seconds_per_epoch"] = round(float(later.mean()), 2)
            else:
                rec["error"] = (run_dir.parent / f"{run_dir.name}.log").read_text()[-800:]
            out["results"].append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "error"}), flush=True)
            save()
        time.sleep(0.5)
    out["unfinished"] = [list(j) for j in queue]
    out["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    return 0


def table(data: dict) -> str:
    """Markdown: one row per variant, mean ± std over seeds of the headline test metrics."""
    import numpy as np

    rows = []
    for task, metrics in (("classification", ("auc", "accuracy", "macro_f1")), ("survival", ("c_index",))):
        by: dict[str, list[dict]] = {}
        for r in data["results"]:
            if r["task"] == task and "test" in r:
                by.setdefault(r["variant"], []).append(r)
        if not by:
            continue
        head = ["model", *metrics, "seeds", "s / epoch"]
        rows += [f"\n**{task}** (test slides; {data['device']}, {data['date']}, {data['epochs']} epochs, "
                 f"lr {data['lr']})\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = [n for n in STUDY_VARIANTS if n in by] + sorted(set(by) - set(STUDY_VARIANTS))
        for name, rs in ((n, by[n]) for n in order):
            cells = [name]
            for m in metrics:
                v = np.array([r["test"].get(m, np.nan) for r in rs], dtype=float)
                std = v.std(ddof=1) if len(v) > 1 else 0.0
                cells.append(f"{np.nanmean(v):.3f} ± {std:.3f}")
            cells.append(str(len(rs)))
            cells.append(f"{np.mean([r.get('train_seconds_per_epoch', np.nan) for r in rs]):.1f}")
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
