"""Per-kernel CUDA time, registers and spills of the Triton scan for a few shapes and tile budgets.

python benchmarks/profile_scan.py --shapes "1,256,16,256,256;32,384,16,28,28" --tile-elems 2048,4096
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import fwd_bwd, make_inputs, runner  # noqa: E402

from mamba2d.ops import scan_triton  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--tile-elems", default="2048")
    ap.add_argument("--tiles", default="", help="semicolon list of THxTW overrides (default: the planner's)")
    ap.add_argument("--warps", default="", help="comma list of num_warps overrides")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    report = []
    for spec in a.shapes.split(";"):
        shape = tuple(int(v) for v in spec.split(","))
        configs = [(te, None, None) for te in [int(v) for v in a.tile_elems.split(",")]]
        tiles = [tuple(int(v) for v in t.split("x")) for t in a.tiles.split(";") if t]
        warps = [int(v) for v in a.warps.split(",") if v] or [None]
        configs += [(None, t, w) for t in tiles for w in warps]
        for te, tile, nw in configs:
            scan_triton.TILE_OVERRIDE, scan_triton.NUM_WARPS_OVERRIDE = tile, nw
            call = runner("triton", shape, te)
            t = make_inputs(shape, torch.float32, "cuda")
            dout = torch.randn_like(t["u"])
            scan_triton.LAUNCH_LOG = []
            fwd_bwd(call, t, dout)
            launches = scan_triton.LAUNCH_LOG
            scan_triton.LAUNCH_LOG = None
            for _ in range(3):
                fwd_bwd(call, t, dout)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fwd_bwd(call, t, dout)
                torch.cuda.synchronize()
            per = defaultdict(float)
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per[e.name] += e.device_time / 5 / 1e3
            row = dict(
                shape=shape,
                tile_elems=te,
                warps=nw,
                plan=str(scan_triton.plan_tiles(shape[2], shape[3], shape[4], te)),
                launches=launches,
                kernel_ms={k: round(v, 4) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            )
            report.append(row)
            print(json.dumps(row, default=str), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
