"""Time the row-streaming Triton scan under explicit plans (an experiment driver, not a result).

A case is ``b,d,n,h,w:VARIANT``; VARIANT is ``default`` (the planner's choice) or comma-separated
overrides of it: ``K=16``, ``P=264``, ``two=1`` (two-level forward), ``seq=0`` ((item, segment)
backward units), ``G=2`` (state groups), ``dtype=bf16``.

    python benchmarks/row_sweep.py --case "1,256,16,64,64:default" --case "1,256,16,64,64:seq=1,two=0"
    python benchmarks/row_sweep.py --case ... --warm-only   # compile only (one fwd+bwd)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_vs_official import DTYPES, check, fwd_bwd, input_sets, make_inputs, measure, ours  # noqa: E402

from mamba2d.io import write_json  # noqa: E402
from mamba2d.ops import scan_triton  # noqa: E402


def apply_variant(shape, spec: str) -> dict:
    """Set scan_triton's overrides for ``spec``; returns the parsed fields (and the dtype name)."""
    batch, dim, dstate, H, W = shape
    fields = dict(kv.split("=") for kv in spec.split(",") if kv and kv != "default")
    scan_triton.ROW_OVERRIDE = None
    scan_triton.ROW_GROUPS = int(fields["G"]) if "G" in fields else None
    p = scan_triton.plan_rows(dstate, H, W, batch * dim, torch.device("cuda"))
    if any(k in fields for k in ("K", "P", "two", "seq")):
        two, seq = bool(int(fields.get("two", p.two_level))), bool(int(fields.get("seq", p.seq_bwd)))
        scan_triton.ROW_OVERRIDE = (int(fields.get("K", p.K)), int(fields.get("P", p.P)), two, seq)
    plan = scan_triton.plan_rows(dstate, H, W, batch * dim, torch.device("cuda"))
    return dict(fields=fields, plan=str(plan), dtype=fields.get("dtype", "fp32"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True)
    ap.add_argument("--warm-only", action="store_true")
    ap.add_argument("--reps", type=int, default=80)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    rows = []
    for case in a.case:
        spec_shape, _, spec = case.partition(":")
        shape = tuple(int(v) for v in spec_shape.split(","))
        v = apply_variant(shape, spec or "default")
        dtype = DTYPES[v["dtype"]]
        H, W = shape[3], shape[4]
        row = dict(shape=shape, variant=spec, plan=v["plan"], dtype=v["dtype"])
        try:
            if a.warm_only:  # the same launches as a timed run: the full shape and the check's
                t = make_inputs(shape, dtype, 1)
                fwd_bwd(ours, t, torch.randn_like(t["u"]), H, W)
                check(ours, shape, dtype, 5)
                torch.cuda.synchronize()
                row["warm"] = True
            else:
                errs = check(ours, shape, dtype, 5)
                row["max_rel_err"] = max(e for e in errs.values() if isinstance(e, float))
                row.update(measure(ours, input_sets(shape, dtype, l2), H, W, a.reps))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            row["error"] = str(e).splitlines()[0][:200]
        scan_triton.ROW_OVERRIDE = None
        scan_triton.ROW_GROUPS = None
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        write_json(a.out, rows)


if __name__ == "__main__":
    main()
