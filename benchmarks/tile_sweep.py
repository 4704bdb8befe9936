"""Time the Triton scan over explicit tile shapes and options (an experiment driver, not a result).

python benchmarks/tile_sweep.py --shape 1,256,16,256,256 --tiles "8x16;1x128;4x32" --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import check, fwd_bwd, make_inputs, measure, runner  # noqa: E402

from mamba2d.ops import scan_triton  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", action="append", required=True)
    ap.add_argument("--tiles", required=True, help="semicolon list of THxTW")
    ap.add_argument("--reload", default="0", help="comma list of RELOAD_BC values to try (0/1)")
    ap.add_argument("--warps", default="", help="comma list of num_warps overrides (default: planner's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rows = []
    for spec in a.shape:
        shape = tuple(int(v) for v in spec.split(","))
        for tile in a.tiles.split(";"):
            th, tw = (int(v) for v in tile.split("x"))
            warps = [int(v) for v in a.warps.split(",") if v] or [None]
            for reload, nw in [(bool(int(r)), w) for r in a.reload.split(",") for w in warps]:
                scan_triton.TILE_OVERRIDE = (th, tw)
                scan_triton.NUM_WARPS_OVERRIDE = nw
                scan_triton.RELOAD_BC = reload
                call = runner("triton", shape)
                row = dict(shape=shape, tile=(th, tw), reload_bc=reload, num_warps=nw)
                try:
                    row["max_rel_err"] = max(check(call, shape, torch.float32, "cuda").values())
                    row.update(measure(call, shape, torch.float32, "cuda", 200))
                    t = make_inputs(shape, torch.float32, "cuda")
                    scan_triton.LAUNCH_LOG = []
                    fwd_bwd(call, t, torch.randn_like(t["u"]))
                    row["launches"] = scan_triton.LAUNCH_LOG
                    scan_triton.LAUNCH_LOG = None
                except Exception as e:  # an experiment: record and go on
                    row["error"] = repr(e)[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
