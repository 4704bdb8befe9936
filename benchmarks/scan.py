"""Benchmark of the 2D selective scan: forward and forward+backward time, peak memory, and the
ratio to the memory-traffic floor, for this project's Triton kernels, its PyTorch path, and a
straightforward PyTorch parallel scan (benchmarks/naive_pscan.py).

Every row first checks the implementation against the float64 PyTorch path on the same inputs
(relative error of the output and of all eight gradients), then times it.

    python benchmarks/scan.py                       # CUDA if present, else CPU shapes
    python benchmarks/scan.py --device cpu --out benchmarks/results/scan_cpu.json
    python benchmarks/scan.py --tile-elems 2048,4096   # Triton tile variants
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_pscan import naive_selective_scan_2d  # noqa: E402

from mamba2d import ScanLayout  # noqa: E402
from mamba2d.ops.scan_torch import selective_scan_2d_torch  # noqa: E402

GPU_SHAPES = [  # (batch, dim, dstate, H, W): the list
    (1, 256, 16, 64, 64),
    (1, 256, 16, 128, 128),
    (1, 256, 16, 256, 256),
    (1, 256, 16, 200, 300),
    (64, 192, 1, 56, 56),
    (32, 384, 16, 28, 28),
    (64, 768, 16, 14, 14),
]
CPU_SHAPES = [
    (1, 64, 16, 32, 32), (1, 64, 16, 64, 64), (1, 32, 16, 128, 128), (8, 96, 1, 28, 28), (4, 128, 16, 14, 14),
]
_ROOT = Path(__file__).resolve().parents[1]
ANCHORS = _ROOT.parent / "shared" / "anchors" / "official-2dmamba-scan-h100.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(shape, dtype, device, seed=0):
    batch, dim, dstate, H, W = shape
    L = H * W
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g) * scale + shift

    t = dict(
        u=rnd(batch, dim, L),
        delta=rnd(batch, dim, L, scale=0.5, shift=-1.0),
        A=-(torch.rand(dim, dstate, generator=g) * 2 + 0.1),
        B=rnd(batch, dstate, L),
        C=rnd(batch, dstate, L),
        D=rnd(dim),
        z=rnd(batch, dim, L),
        delta_bias=rnd(dim, scale=0.3),
    )
    out = {}
    for k, v in t.items():
        dt = dtype if k in ("u", "delta", "z", "B", "C") else torch.float32
        out[k] = v.to(device=device, dtype=dt).requires_grad_(True)
    return out


def runner(impl, shape, tile_elems=None):
    _, _, _, H, W = shape
    layout = ScanLayout(H, W)

    def call(t):
        if impl == "naive":
            return naive_selective_scan_2d(
                t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, H, W
            )
        B4, C4 = t["B"].unsqueeze(1), t["C"].unsqueeze(1)
        if impl == "torch":
            return selective_scan_2d_torch(
                t["u"], t["delta"], t["A"], B4, C4, t["D"], t["z"], t["delta_bias"], True, layout
            )
        from mamba2d.ops.scan_triton import selective_scan_2d_triton

        return selective_scan_2d_triton(
            t["u"],
            t["delta"],
            t["A"],
            B4,
            C4,
            t["D"],
            t["z"],
            t["delta_bias"],
            True,
            layout,
            tile_elems=tile_elems,
        )

    return call


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def fwd_bwd(call, t, dout):
    out = call(t)
    return out, torch.autograd.grad(out, [t[k] for k in ORDER], dout)


def check(call, shape, dtype, device):
    """Max relative error (output and every gradient) against the float64 PyTorch path."""
    t = make_inputs(shape, dtype, device, seed=1)
    dout = torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    out, grads = fwd_bwd(call, t, dout)
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    ref, rgrads = fwd_bwd(runner("torch", shape), t64, dout.double())
    errs = {"out": _rel(out, ref)}
    errs.update({k: _rel(a, b) for k, a, b in zip(ORDER, grads, rgrads, strict=True)})
    return errs


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def time_ms(fn, device, reps):
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(max(3, reps // 100)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(call, shape, dtype, device, reps):
    """Median forward and forward+backward times (ms) and the forward+backward peak (MiB)."""
    t = make_inputs(shape, dtype, device)
    dout = torch.randn_like(t["u"])

    def fwd():
        with torch.no_grad():
            return call(t)

    def both():
        return fwd_bwd(call, t, dout)

    return dict(
        fwd_ms=time_ms(fwd, device, reps),
        fwdbwd_ms=time_ms(both, device, reps),
        fwdbwd_peak_mib=peak_mib(both, device),
    )


def copy_bandwidth_gbps(device):
    if device != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    import triton.testing

    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def floor_ms(shape, dtype, bw_gbps):
    """Fewest HBM bytes over the copy bandwidth (the anchors' definition)."""
    if bw_gbps is None:
        return None, None
    batch, dim, dstate, H, W = shape
    L = H * W
    e = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    chan, state = batch * dim * L * e, batch * dstate * L * e
    fwd = 4 * chan + 2 * state  # read u, delta, z, B, C; write out
    bwd = 4 * chan + 2 * state + 3 * chan + 2 * state  # read dout, u, delta, z, B, C; write grads
    to_ms = 1e3 / (bw_gbps * 1e9)
    return fwd * to_ms, (fwd + bwd) * to_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--impls", default=None, help="comma list of triton,torch,naive")
    ap.add_argument("--shapes", default=None, help="semicolon list of b,d,n,h,w")
    ap.add_argument("--tile-elems", default="", help="extra Triton tile budgets to time as variants")
    ap.add_argument("--reps", type=int, default=300, help="ms of timing per measurement (CUDA)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--partials-mib", type=int, default=None, help="override the dB/dC partials budget")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)

    device = a.device
    if a.partials_mib is not None:
        from mamba2d.ops import scan_triton

        scan_triton.PARTIALS_BUDGET_BYTES = a.partials_mib * 2**20
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
        if a.shapes
        else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    )
    default_impls = ["triton", "torch", "naive"] if device == "cuda" else ["torch", "naive"]
    impls = a.impls.split(",") if a.impls else default_impls
    variants = [("triton", None)] if "triton" in impls else []
    variants += [("triton", int(v)) for v in a.tile_elems.split(",") if v]
    variants += [(i, None) for i in impls if i != "triton"]
    anchors = {}
    if ANCHORS.exists():
        for r in json.loads(ANCHORS.read_text())["rows"]:
            anchors[(r["batch"], r["dim"], r["dstate"], r["height"], r["width"])] = r
    bw = copy_bandwidth_gbps(device)
    dev_name = (
        torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    )
    rows = []
    for dtype in a.dtypes.split(","):
        for shape in shapes:
            f_fwd, f_all = floor_ms(shape, dtype, bw)
            for impl, te in variants:
                call = runner(impl, shape, te)
                row = dict(
                    impl=impl if te is None else f"{impl}[tile_elems={te}]",
                    dtype=dtype,
                    batch=shape[0],
                    dim=shape[1],
                    dstate=shape[2],
                    height=shape[3],
                    width=shape[4],
                )
                try:
                    if not a.skip_check:
                        errs = check(call, shape, DTYPES[dtype], device)
                        row["max_rel_err"] = max(errs.values())
                    row.update(measure(call, shape, DTYPES[dtype], device, a.reps))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                if device == "cuda":
                    torch.cuda.empty_cache()
                if f_all and "fwdbwd_ms" in row:
                    row["fwd_over_floor"] = row["fwd_ms"] / f_fwd
                    row["fwdbwd_over_floor"] = row["fwdbwd_ms"] / f_all
                anc = anchors.get(shape)
                if anc and dtype == "fp32" and "fwdbwd_ms" in row:
                    row["official_fwd_ms"] = anc["official_cuda_fwd_ms"]
                    row["official_fwdbwd_ms"] = anc["official_cuda_fwdbwd_ms"]
                    row["speedup_fwdbwd_vs_official"] = anc["official_cuda_fwdbwd_ms"] / row["fwdbwd_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = dict(
        device=dev_name,
        date=_dt.date.today().isoformat(),
        software=dict(
            torch=torch.__version__,
            python=platform.python_version(),
            triton=_version("triton"),
            threads=torch.get_num_threads(),
        ),
        timing="triton.testing.do_bench median" if device == "cuda" else "median wall time of repeated calls",
        copy_bandwidth_GBps=bw,
        rows=rows,
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, a.out)
    print_table(rows)
    return 0


def _version(mod):
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def print_table(rows):
    cols = [
        "impl",
        "dtype",
        "batch",
        "dim",
        "dstate",
        "height",
        "width",
        "fwd_ms",
        "fwdbwd_ms",
        "fwdbwd_peak_mib",
        "fwdbwd_over_floor",
        "speedup_fwdbwd_vs_official",
        "max_rel_err",
    ]
    print(" | ".join(cols))
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append(f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "-"))
        print(" | ".join(vals))


if __name__ == "__main__":
    raise SystemExit(main())
