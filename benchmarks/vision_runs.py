"""The short real runs of 2DVMamba-T against its 1D cross-scan twin, over several seeds: Fashion-MNIST
classification and Fashion-MNIST mosaic segmentation, each run a `mamba2d vision-train` process.
Runs are spread over the visible GPUs (one at a time per GPU) or run one after another on the CPU.

    python benchmarks/vision_runs.py --out runs/vision --json benchmarks/results/vision_runs.json

The summary JSON holds every run's metrics and the mean ± std (sample std) per task and model.
A run whose metrics.json exists is not repeated, so a stopped study continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2d.train.metrics import summarise  # noqa: E402

TASKS = {
    # Fashion-MNIST at 32 x 32 (28 x 28 resized), 60k training / 10k test images.
    "classification": ["--task", "classification", "--img-size", "32", "--batch-size", "256",
                       "--lr", "1e-3", "--warmup-epochs", "1", "--scale-min", "0.6", "--color-jitter", "0",
                       "--smoothing", "0.1", "--drop-path", "0.1"],
    # 64 x 64 mosaics: 10k training (from the training images), 2k validation (from the test images).
    "segmentation": ["--task", "segmentation", "--img-size", "64", "--batch-size", "64", "--lr", "1e-3",
                     "--warmup-epochs", "1", "--mosaics", "10000", "--head-channels", "128",
                     "--drop-path", "0.1"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the run directories")
    ap.add_argument("--json", required=True, help="summary JSON to write")
    ap.add_argument("--models", default="vmamba2d_tiny,vmamba1d_tiny")
    ap.add_argument("--tasks", default="classification,segmentation")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", default="classification=10,segmentation=15",
                    help="epochs per task, e.g. classification=10,segmentation=15")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--slots-per-gpu", type=int, default=1,
                    help="runs sharing one GPU at a time (small images leave a GPU mostly idle between "
                         "kernel launches; per-epoch seconds are then not comparable across studies)")
    ap.add_argument("--skip", default="", help="runs done elsewhere, e.g. classification/vmamba2d_tiny/0,...")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no run after this many seconds")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more vision-train flags, for all runs")
    args = ap.parse_args()
    epochs = dict(kv.split("=") for kv in args.epochs.split(","))
    jobs = [(task, model, int(seed)) for task in args.tasks.split(",") for seed in args.seeds.split(",")
            for model in args.models.split(",") if f"{task}/{model}/{seed}" not in args.skip.split(",")]
    # Each run sees one GPU; ids are this process's visible ones, as CUDA_VISIBLE_DEVICES names them.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else list(range(torch.cuda.device_count()))) or [None]
    n_gpus = len(gpus) if gpus != [None] else 0
    slots = [(gpu, k) for k in range(args.slots_per_gpu) for gpu in gpus]
    started = time.monotonic()
    running: dict = {}  # gpu -> (job, process)
    pending = list(jobs)
    skipped = []
    while pending or running:
        for slot in slots:
            gpu = slot[0]
            if slot in running or not pending:
                continue
            task, model, seed = job = pending.pop(0)
            run_dir = Path(args.out) / f"{task}_{model}_seed{seed}"
            if (run_dir / "metrics.json").is_file():
                continue
            if args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
                skipped.append(job)
                continue
            cmd = [sys.executable, "-m", "mamba2d", "vision-train", "--out", str(run_dir), "--model", model,
                   "--seed", str(seed), "--epochs", epochs[task], "--workers", str(args.workers),
                   "--no-progress", *TASKS[task], *args.extra]
            if (run_dir / "config.yaml").is_file():
                cmd = [sys.executable, "-m", "mamba2d", "vision-train", "--resume", "--out", str(run_dir),
                       "--no-progress"]
            env = dict(os.environ, OMP_NUM_THREADS="2")
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(Path(args.out) / f"{task}_{model}_seed{seed}.log", "w")  # noqa: SIM115
            print(f"[{time.monotonic() - started:6.0f} s] gpu {gpu}: {task} {model} seed {seed}", flush=True)
            running[slot] = (job, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for slot, (job, proc) in list(running.items()):
            if proc.poll() is not None:
                print(f"[{time.monotonic() - started:6.0f} s] done (rc {proc.returncode}): {job}", flush=True)
                del running[slot]
        time.sleep(1.0)

    runs = []
    for task, model, seed in jobs:
        path = Path(args.out) / f"{task}_{model}_seed{seed}" / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            hist = (path.parent / "history.csv").read_text().splitlines()
            m["seconds_per_epoch"] = sum(float(r.split(",")[5]) for r in hist[1:]) / max(len(hist) - 1, 1)
            runs.append(m)
    summary = {}
    for task in args.tasks.split(","):
        key = "top1" if task == "classification" else "miou"
        for model in args.models.split(","):
            mine = [r for r in runs if r["task"] == task and r["model"] == model]
            if mine:
                s = summarise([{k: r[k] for k in (f"final_val_{key}", f"best_val_{key}", "seconds_per_epoch")}
                               for r in mine])
                summary[f"{task}/{model}"] = {k: {"mean": v["mean"], "std": v["std"], "n": v["n"],
                                                  "values": v["values"]} for k, v in s.items()}
    out = {"date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "gpus": n_gpus, "slots_per_gpu": args.slots_per_gpu, "tasks": TASKS, "epochs": epochs,
           "summary": summary, "runs": runs, "skipped": [list(j) for j in skipped]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
