"""CPU benchmark of the 2D selective scan: the numba kernels (backend "cpu") against the PyTorch
path (backend "torch"), forward and forward+backward, in nanoseconds per state-cell
(state-cell = batch * dim * dstate * H * W), plus the kernels' JIT compile time.

Each (backend, grid) runs in a fresh process, so its peak resident memory is its own. Each first
checks its output and all eight gradients against the float64 PyTorch path on a 4-channel slice
of the same grid, then times forward (no_grad) and forward+backward: median wall time, and the
process CPU time (all threads) per state-cell, which says more than wall time on a loaded machine.
The JIT time is measured in fresh processes with an empty numba cache, then with the filled one.

    python benchmarks/scan_cpu.py                     # grids 32..256, d 256, n 16, batch 1, fp32, 2 threads
    python benchmarks/scan_cpu.py --sides 32,64 --impls cpu --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
_ROOT = Path(__file__).resolve().parents[1]


def make_inputs(batch, dim, dstate, side, dtype, seed=0):
    import torch

    L = side * side
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g) * scale + shift

    t = dict(u=rnd(batch, dim, L), delta=rnd(batch, dim, L, scale=0.5, shift=-1.0),
             A=-(torch.rand(dim, dstate, generator=g) * 2 + 0.1), B=rnd(batch, dstate, L),
             C=rnd(batch, dstate, L), D=rnd(dim), z=rnd(batch, dim, L), delta_bias=rnd(dim, scale=0.3))
    return {k: v.to(dtype).requires_grad_(True) for k, v in t.items()}


def call(backend, t, side):
    from mamba2d import selective_scan_2d

    return selective_scan_2d(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                             True, height=side, width=side, backend=backend)


def fwd_bwd(backend, t, side, dout):
    import torch

    out = call(backend, t, side)
    return out, torch.autograd.grad(out, [t[k] for k in ORDER], dout)


def max_rel_err(backend, dstate, side, dtype) -> float:
    """Worst relative error (output and the eight gradients) against the float64 torch path."""
    import torch

    t = make_inputs(1, 4, dstate, side, dtype, seed=1)
    dout = torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = fwd_bwd(backend, t, side, dout)
    t64 = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    ref = fwd_bwd("torch", t64, side, dout.double())
    pairs = [(got[0], ref[0])] + list(zip(got[1], ref[1], strict=True))
    return max(float((a.double() - b).norm() / b.norm()) for a, b in pairs)


def timed(fn, min_reps: int, min_seconds: float) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of repeated calls, after a warm-up."""
    fn()
    walls, cpus = [], []
    start = time.perf_counter()
    while len(walls) < min_reps or time.perf_counter() - start < min_seconds:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def one(backend: str, batch: int, dim: int, dstate: int, side: int, dtype_name: str, threads: int,
        min_reps: int, min_seconds: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[dtype_name]
    err = max_rel_err(backend, dstate, side, dtype)
    t = make_inputs(batch, dim, dstate, side, dtype)
    dout = torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def fwd():
        with torch.no_grad():
            call(backend, t, side)

    fwd_wall, fwd_cpu = timed(fwd, min_reps, min_seconds)
    all_wall, all_cpu = timed(lambda: fwd_bwd(backend, t, side, dout), min_reps, min_seconds)
    cells = batch * dim * dstate * side * side
    return dict(
        impl=backend, dtype=dtype_name, batch=batch, dim=dim, dstate=dstate, height=side, width=side,
        threads=threads, max_rel_err=err, fwd_ms=fwd_wall * 1e3, fwdbwd_ms=all_wall * 1e3,
        fwd_ns_per_cell=fwd_wall * 1e9 / cells, fwdbwd_ns_per_cell=all_wall * 1e9 / cells,
        fwd_cpu_ns_per_cell=fwd_cpu * 1e9 / cells, fwdbwd_cpu_ns_per_cell=all_cpu * 1e9 / cells,
        peak_extra_rss_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
    )


def jit_times() -> dict:
    """Seconds of the first forward and first backward per working dtype: compile, then cache load."""
    import torch

    from mamba2d.ops import scan_cpu  # noqa: F401  (import time is not compile time)

    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        t = make_inputs(1, 2, 3, 4, dtype)
        t0 = time.perf_counter()
        y = call("cpu", t, 4)
        t1 = time.perf_counter()
        y.sum().backward()
        out[name] = dict(fwd_s=t1 - t0, bwd_s=time.perf_counter() - t1)
    return out


def _child(args: list[str], env: dict | None = None) -> dict:
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(_ROOT / "src")}
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                         check=False)
    if res.returncode != 0:
        return dict(error=(res.stderr or res.stdout).strip().splitlines()[-1:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ from it), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="32,64,128,256", help="square grid sides")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the cpu backend uses it)")
    ap.add_argument("--impls", default="torch,cpu")
    ap.add_argument("--torch-max-side", type=int, default=256,
                    help="largest side timed for the torch backend (it holds ~7 state-sized tensors)")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--no-jit", action="store_true", help="skip the JIT compile-time measurement")
    ap.add_argument("--note", default="", help="free text for the JSON (e.g. that the machine was shared)")
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "scan_cpu_v2.json"))
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--jit-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.jit_child:
        print(json.dumps(jit_times()))
        return 0
    if a.one:
        print(json.dumps(one(a.one[0], a.batch, a.dim, a.dstate, int(a.one[1]), a.dtype, a.threads,
                             a.min_reps, a.min_seconds)))
        return 0

    import numba
    import torch

    load_before = os.getloadavg()
    jit = None
    if not a.no_jit:
        with tempfile.TemporaryDirectory() as cache:
            env = {"NUMBA_CACHE_DIR": cache}
            jit = dict(cold_cache=_child(["--jit-child"], env), warm_cache=_child(["--jit-child"], env))
        print(json.dumps(dict(jit=jit)), flush=True)
    rows = []
    for side in (int(s) for s in a.sides.split(",")):
        for impl in a.impls.split(","):
            if impl == "torch" and side > a.torch_max_side:
                continue
            row = _child(["--one", impl, str(side), "--batch", str(a.batch), "--dim", str(a.dim), "--dstate",
                          str(a.dstate), "--dtype", a.dtype, "--threads", str(a.threads), "--min-reps",
                          str(a.min_reps), "--min-seconds", str(a.min_seconds)])
            row.setdefault("impl", impl)
            row.setdefault("height", side)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(
        device=f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        date=_dt.date.today().isoformat(),
        threads=a.threads,
        dtype=a.dtype,
        shapes=dict(batch=a.batch, dim=a.dim, dstate=a.dstate, sides=[int(s) for s in a.sides.split(",")]),
        software=dict(torch=torch.__version__, numba=numba.__version__, python=platform.python_version()),
        commit=_commit(),
        note=a.note,
        timing="median over repeated calls after one warm-up; *_cpu_ns_per_cell is process CPU time (all "
               "threads) per state-cell, state-cell = batch*dim*dstate*H*W",
        load=dict(before=load_before, after=os.getloadavg()),
        jit_seconds=jit,
        rows=rows,
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{'impl':6} {'side':>5} {'fwd ns':>8} {'fwd+bwd ns':>11} {'cpu-ns fwd+bwd':>15} {'max err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:6} {r['height']:>5} error: {r['error']}")
            continue
        print(f"{r['impl']:6} {r['height']:>5} {r['fwd_ns_per_cell']:8.2f} {r['fwdbwd_ns_per_cell']:11.2f} "
              f"{r['fwdbwd_cpu_ns_per_cell']:15.2f} {r['max_rel_err']:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
