"""The training pipeline on GPUs: one GPU in fp32 and bf16, then DDP on every visible GPU (NCCL).

Builds a synthetic cohort of CLAM-style h5 bags (in_dim 1024, 2 classes, a learnable signal in
one feature), trains 2DMambaMIL through the ``mamba2d train`` CLI and records wall time per
epoch, the metrics, and the DDP output into a JSON file.

    python benchmarks/pipeline_gpu.py --out-json benchmarks/results/pipeline_gpu.json
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


def make_cohort(root: Path, n_slides: int, min_patches: int, max_patches: int, dim: int = 1024) -> None:
    import h5py
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    (root / "feats").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_slides):
        y = i % 2
        n = int(rng.integers(min_patches, max_patches + 1))
        side = int(np.ceil(np.sqrt(n / 0.7)))
        cells = rng.choice(side * side, n, replace=False)
        coords = np.stack([cells % side, cells // side], 1).astype(np.int64) * 256
        feats = rng.normal(size=(n, dim)).astype(np.float32)
        feats[:, 0] += 0.5 * y
        with h5py.File(root / "feats" / f"s{i:03d}.h5", "w") as f:
            f["features"] = feats
            d = f.create_dataset("coords", data=coords)
            d.attrs["patch_size_level0"] = 256
        rows.append({"slide_id": f"s{i:03d}", "case_id": f"c{i:03d}", "label": f"class{y}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def run(cmd: list[str], env: dict, run_dir: Path) -> dict:
    import pandas as pd

    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = {"cmd": " ".join(cmd[2:]), "rc": res.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "stdout": res.stdout[-3000:], "stderr_tail": res.stderr[-1500:]}
    histories = [pd.read_csv(p) for p in sorted(run_dir.glob("fold*_seed*/history.csv"))]
    if histories:
        # The first epoch includes reading the bags into the cache (and kernel compilation).
        later = [h["train_seconds"].iloc[1:].mean() for h in histories if len(h) > 1]
        out["train_seconds_first_epoch"] = round(float(histories[0]["train_seconds"].iloc[0]), 2)
        out["train_seconds_per_epoch_after_first"] = (round(float(sum(later) / len(later)), 2)
                                                      if later else None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--slides", type=int, default=48)
    ap.add_argument("--min-patches", type=int, default=2000)
    ap.add_argument("--max-patches", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    n_gpus = torch.cuda.device_count()
    out: dict = {"date": _dt.date.today().isoformat(), "torch": torch.__version__, "gpus": n_gpus,
                 "device": torch.cuda.get_device_name(0) if n_gpus else "cpu",
                 "cohort": {"slides": a.slides, "patches": [a.min_patches, a.max_patches], "in_dim": 1024},
                 "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        make_cohort(root, a.slides, a.min_patches, a.max_patches)
        out["cohort"]["build_seconds"] = round(time.perf_counter() - t0, 1)
        common = ["--features", str(root / "feats"), "--labels", str(root / "labels.csv"), "--folds", "4",
                  "--epochs", str(a.epochs), "--model", "2dmambamil", "--cache", "--no-progress",
                  "--val-fraction", "0.2", "--lr", "2e-4"]
        for precision in ("fp32", "bf16"):
            res = run([sys.executable, "-m", "mamba2d", "train", *common, "--precision", precision,
                       "--out", str(root / f"one_{precision}")], env, root / f"one_{precision}")
            res["label"] = f"1 GPU, {precision}"
            out["runs"].append(res)
            print(json.dumps(res)[:800], flush=True)
        if n_gpus >= 2:
            res = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={n_gpus}", "-m", "mamba2d", "train", *common, "--precision", "bf16",
                       "--out", str(root / "ddp")], env, root / "ddp")
            res["label"] = f"DDP {n_gpus} GPUs (NCCL), bf16"
            out["runs"].append(res)
            print(json.dumps(res)[:800], flush=True)
    Path(a.out_json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
