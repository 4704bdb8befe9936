"""This project's Triton scan against the official 2DMamba CUDA kernel, side by side in one process.

The official extension is not part of this repository and is never built by it: pass the folder
that holds an already-built module (``--official-build DIR``, module ``--official-module NAME``).
Both run the same inputs (B and C input-dependent, z gate, D skip, delta_bias with softplus, all
eight gradients), the default scan order. For every (shape, dtype) the script

1. checks both against the float64 PyTorch path (this project's vectorised definition, itself
   tested against the loop-by-loop float64 reference) on fresh inputs of the same grid and dstate
   with batch <= 4 and dim <= 64, reporting ||got - ref|| / ||ref|| for the output and each
   gradient;
2. times forward+backward (and forward alone) with ``triton.testing.do_bench`` (median, CUDA
   events), rotating among input sets so that together they exceed the L2 cache;
3. measures the forward+backward peak the same way for both: max allocated minus allocated
   before the call (inputs and the upstream gradient exist before it).

The official kernel supports fp32 and fp16 only; bf16 rows record it as unsupported and time it
on fp16 inputs of the same values instead (``official_dtype``).

    python benchmarks/scan_vs_official.py --official-build /path/to/build \\
        --out benchmarks/results/scan_vs_official_h200.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import platform
import sys

import torch
from scan import GPU_SHAPES, _version

from mamba2d import ScanLayout
from mamba2d.io import write_json
from mamba2d.ops import scan_triton
from mamba2d.ops.scan_torch import selective_scan_2d_torch

# (batch, dim, dstate, H, W): the WSI grids of benchmarks/scan.py and a 378 x 378 slide, then the
# vision-backbone stages.
SHAPES = GPU_SHAPES[:4] + [(1, 512, 16, 378, 378)] + GPU_SHAPES[4:]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CHECK_BATCH, CHECK_DIM = 4, 64


def make_inputs(shape, dtype, seed):
    """Leaf tensors on CUDA: u, delta, z, B, C in ``dtype``; A, D, delta_bias in float32."""
    batch, dim, dstate, H, W = shape
    L = H * W
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device="cuda") * scale + shift

    t = dict(
        u=rnd(batch, dim, L),
        delta=rnd(batch, dim, L, scale=0.5, shift=-1.0),
        A=-(torch.rand(dim, dstate, generator=g, device="cuda") * 2 + 0.1),
        B=rnd(batch, 1, dstate, L),
        C=rnd(batch, 1, dstate, L),
        D=rnd(dim),
        z=rnd(batch, dim, L),
        delta_bias=rnd(dim, scale=0.3),
    )
    return {k: v.to(dtype if k in ("u", "delta", "z", "B", "C") else torch.float32).requires_grad_(True)
            for k, v in t.items()}


def ours(t, H, W):
    return scan_triton.selective_scan_2d_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                                t["delta_bias"], True, ScanLayout(H, W))


def reference64(t, H, W):
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    out = selective_scan_2d_torch(t64["u"], t64["delta"], t64["A"], t64["B"], t64["C"], t64["D"], t64["z"],
                                  t64["delta_bias"], True, ScanLayout(H, W))
    return out, t64


class _Official(torch.autograd.Function):
    """Autograd around the official extension's fwd/bwd entry points (mamba_ssm-style API)."""

    @staticmethod
    def forward(ctx, mod, u, delta, A, B, C, D, z, delta_bias, H, W):
        out, x, *rest = mod.fwd(u, delta, A, B, C, D, z, delta_bias, True, H, W, False)
        ctx.mod, ctx.H, ctx.W = mod, H, W
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        return rest[0]

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dbias, *rest = ctx.mod.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out, None, True, False, ctx.H, ctx.W)
        return None, du, ddelta, dA, dB, dC, dD, rest[0], dbias, None, None


def official(mod):
    def call(t, H, W):
        return _Official.apply(mod, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                               t["delta_bias"], H, W)
    return call


def fwd_bwd(call, t, dout, H, W):
    out = call(t, H, W)
    return out, torch.autograd.grad(out, [t[k] for k in ORDER], dout)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(call, shape, dtype, seed):
    batch, dim, dstate, H, W = shape
    small = (min(batch, CHECK_BATCH), min(dim, CHECK_DIM), dstate, H, W)
    t = make_inputs(small, dtype, seed)
    dout = torch.randn(t["u"].shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1))
    dout = dout.to(dtype)
    out, grads = fwd_bwd(call, t, dout, H, W)
    ref, t64 = reference64(t, H, W)
    rgrads = torch.autograd.grad(ref, [t64[k] for k in ORDER], dout.double())
    errs = {"out": rel(out, ref)}
    errs.update({k: rel(a, b) for k, a, b in zip(ORDER, grads, rgrads, strict=True)})
    bad = [k for k, g in [("out", out), *zip(ORDER, grads, strict=True)] if not torch.isfinite(g).all()]
    if bad:
        errs["non_finite"] = bad
    return errs


def input_sets(shape, dtype, l2_bytes):
    """Enough input sets (1 to 8) that cycling through them exceeds the L2 cache twice over."""
    one = make_inputs(shape, dtype, 100)
    size = sum(v.numel() * v.element_size() for v in one.values())
    n = max(1, min(8, -(-2 * l2_bytes // size)))
    return [one] + [make_inputs(shape, dtype, 100 + i) for i in range(1, n)]


def measure(call, sets, H, W, reps):
    import triton.testing

    douts = [torch.randn_like(s["u"]) for s in sets]
    k = [0]

    def both():
        i = k[0] % len(sets)
        k[0] += 1
        return fwd_bwd(call, sets[i], douts[i], H, W)

    def fwd():
        i = k[0] % len(sets)
        k[0] += 1
        with torch.no_grad():
            return call(sets[i], H, W)

    both()
    torch.cuda.synchronize()
    fb = float(triton.testing.do_bench(both, warmup=25, rep=reps, return_mode="median"))
    f = float(triton.testing.do_bench(fwd, warmup=10, rep=max(20, reps // 3), return_mode="median"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = fwd_bwd(call, sets[0], douts[0], H, W)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    del res
    return dict(fwdbwd_ms=fb, fwd_ms=f, peak_mib=peak)


def _recast(inputs, old, new):
    """The same input set with every ``old``-dtype tensor cast to ``new`` (fresh leaves)."""
    return {k: v.detach().to(new if v.dtype == old else v.dtype).requires_grad_(True)
            for k, v in inputs.items()}


def run_impl(name, call, shape, dtype, sets, reps, seed, row):
    H, W = shape[3], shape[4]
    try:
        row[f"{name}_errors"] = check(call, shape, dtype, seed)
        m = measure(call, sets, H, W, reps)
        row[f"{name}_ms"], row[f"{name}_fwd_ms"] = m["fwdbwd_ms"], m["fwd_ms"]
        row[f"{name}_peak_mib"] = m["peak_mib"]
    except (RuntimeError, torch.OutOfMemoryError) as e:
        row[f"{name}_error"] = str(e).splitlines()[0][:200]
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-build", default=None, help="folder holding the built official module")
    ap.add_argument("--official-module", default="official_2dmamba_scan")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default=None, help="semicolon list of b,d,n,h,w (default: the issue's eight)")
    ap.add_argument("--reps", type=int, default=150, help="ms of timing per fwd+bwd measurement")
    ap.add_argument("--with-v1", action="store_true", help="also time the tiled (v1) kernels")
    ap.add_argument("--check-only", action="store_true", help="float64 checks of ours only")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    mod = None
    if a.official_build:
        sys.path.insert(0, a.official_build)
        mod = importlib.import_module(a.official_module)
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")] if a.shapes else SHAPES
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    rows = []
    if a.check_only:
        for dname in a.dtypes.split(","):
            for shape in shapes:
                errs = check(ours, shape, DTYPES[dname], 3)
                print(json.dumps(dict(shape=shape, dtype=dname, errors=errs)), flush=True)
        return 0
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        for shape in shapes:
            row = dict(shape=dict(zip(("batch", "dim", "dstate", "height", "width"), shape, strict=True)),
                       dtype=dname)
            seed = 7 + len(rows)
            sets = input_sets(shape, dtype, l2)
            row["input_sets"] = len(sets)
            if mod is not None:
                odt = dtype if dtype in (torch.float32, torch.float16) else torch.float16
                row["official_dtype"] = str(odt).removeprefix("torch.")
                osets = sets if odt == dtype else [_recast(s, dtype, odt) for s in sets]
                run_impl("official", official(mod), shape, odt, osets, a.reps, seed, row)
                del osets
            scan_triton.ROW_KERNELS = True
            run_impl("ours", ours, shape, dtype, sets, a.reps, seed, row)
            if a.with_v1:
                scan_triton.ROW_KERNELS = False
                run_impl("ours_v1", ours, shape, dtype, sets, a.reps, seed, row)
                scan_triton.ROW_KERNELS = True
            if "official_ms" in row and "ours_ms" in row:
                row["speedup"] = row["official_ms"] / row["ours_ms"]
            del sets
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(
        what="fwd+bwd of selective_scan_2d: this project's Triton kernels vs the official 2DMamba CUDA "
             "kernel, same process, same inputs, same timing and memory accounting",
        device=torch.cuda.get_device_name(),
        date=_dt.date.today().isoformat(),
        software=dict(torch=torch.__version__, python=platform.python_version(), triton=_version("triton"),
                      official_module=a.official_module if mod else None),
        timing="triton.testing.do_bench median of fwd+bwd (and fwd alone) over rotating input sets",
        peak="max_memory_allocated minus memory_allocated before one fwd+bwd call, MiB",
        errors=f"relative to the float64 PyTorch path on batch<={CHECK_BATCH}, dim<={CHECK_DIM}",
        rows=rows,
    )
    if a.out:
        write_json(a.out, result)
    print_table(rows)
    return 0


def _fmt(row, key, fmt="{:.3f}"):
    v = row.get(key)
    return fmt.format(v) if isinstance(v, float) else "-"


def _worst(row, name):
    errs = [v for v in row.get(f"{name}_errors", {}).values() if isinstance(v, float)]
    return max(errs, default=float("nan"))


def print_table(rows):
    print("shape | dtype | official ms | ours ms | speedup | official MiB | ours MiB | v1 ms | "
          "worst err ours/official")
    for r in rows:
        s = r["shape"]
        shape = f"{s['batch']},{s['dim']},{s['dstate']},{s['height']}x{s['width']}"

        def f(key, fmt="{:.3f}", r=r):
            return _fmt(r, key, fmt)

        worst = [_worst(r, n) for n in ("ours", "official")]
        print(f"{shape} | {r['dtype']} | {f('official_ms')} | {f('ours_ms')} | {f('speedup', '{:.2f}')} | "
              f"{f('official_peak_mib', '{:.1f}')} | {f('ours_peak_mib', '{:.1f}')} | {f('ours_v1_ms')} | "
              f"{worst[0]:.1e}/{worst[1]:.1e}")


if __name__ == "__main__":
    raise SystemExit(main())
