"""CPU time and peak memory of one slide through a MIL model (each model's defaults), by size.

Each (model, size, pass) runs in a fresh process, so the peak resident memory (ru_maxrss) is its
own. Features are random (in_dim 1024) on a square grid about 70 % covered by tissue.

    python benchmarks/mil_memory.py --patches 1000,10000,100000 --out benchmarks/results/mil_memory_cpu.json
    python benchmarks/mil_memory.py --models all --patches 1000,10000 \
        --out benchmarks/results/mil_models_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(name: str, n_patches: int, backward: bool) -> dict:
    import torch

    from mamba2d.mil import build_model

    torch.manual_seed(0)
    side = math.ceil(math.sqrt(n_patches / 0.7))  # about 70 % tissue on a square grid
    g = torch.Generator().manual_seed(0)
    cells = torch.randperm(side * side, generator=g)[:n_patches]
    coords = torch.stack([cells % side, cells // side], dim=1).float() * 256
    feats = torch.randn(n_patches, 1024, generator=g)
    model = build_model(name, 1024, 2, **({"backend": "torch"} if "mamba" in name else {}))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if backward:
        model(feats, coords, 256).logits.sum().backward()
    else:
        with torch.no_grad():
            model.eval()(feats, coords, 256)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        model=name,
        patches=n_patches,
        grid=f"{side}x{side}",
        backward=backward,
        seconds=round(seconds, 2),
        peak_rss_mib=round(peak_kib / 1024, 1),
        rss_before_mib=round(rss0 / 1024, 1),
        threads=torch.get_num_threads(),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", default="1000,10000")
    ap.add_argument("--models", default="2dmambamil", help="comma-separated registry names, or 'all'")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        name, n, bwd = a.one.split(":")
        print(json.dumps(one(name, int(n), bwd == "1")))
        return 0
    from mamba2d.mil import MODELS

    names = sorted(MODELS) if a.models == "all" else a.models.split(",")
    rows = []
    for name in names:
        for n in [int(v) for v in a.patches.split(",")]:
            for bwd in ("0", "1"):
                res = subprocess.run(
                    [sys.executable, __file__, "--one", f"{name}:{n}:{bwd}"],
                    capture_output=True,
                    text=True,
                    env=os.environ,
                )
                if res.returncode != 0:
                    rows.append(dict(model=name, patches=n, backward=bwd == "1",
                                     error=res.stderr.strip()[-300:]))
                else:
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        out = dict(
            device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            date=_dt.date.today().isoformat(),
            models="each registry model's defaults, in_dim 1024, 2 classes; Mamba models on torch backend",
            rows=rows,
        )
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
