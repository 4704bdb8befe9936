"""Training-step time and peak memory of MIL models by bag size, side by side in one process, and the
1D and 2D scan operators alone.

Models: 2dmambamil, mambamil, abmil, transmil (each registry default, in_dim 1024, 2 classes).
Bags: random 1024-d features on a tissue-like patch layout (a few smooth blobs cut from a random
field, raster order, 512-px patches). One step = forward, cross-entropy, backward, AdamW step.
Time: median wall time of whole steps (synchronised), after warm-up. Peak memory: the most
allocated during one step minus what was allocated before it (model, optimizer state, bag), the
same for every model. GPU: fp32, and bf16 autocast around the forward and the loss (as
``mamba2d train --precision bf16``). CPU: fp32 on ``--threads`` threads.

Sections (CUDA): ``sweep`` (chunk length and warps of the 1D kernel; the fastest is kept for the
rest of the run), ``check`` (the 1D kernel against the float64 PyTorch path on long sequences),
``ops`` (the 1D and 2D operators alone: ns per state cell; the 2D operator at equal L; the old
one-row 2D kernel), ``models``, ``profile`` (the top GPU kernels of one step), ``ab`` (2DMambaMIL
in bf16 with the 2D scan fed float32). CPU: ``models`` only.

    python benchmarks/mil_step.py                                   # CUDA, every section
    python benchmarks/mil_step.py --devices cpu --threads 2         # CPU, 2,875 and 11,464 patches
    python benchmarks/mil_step.py --sections ops,models --sizes 2875,11464

Writes JSON (default benchmarks/results/mil_step_<device>.json, rewritten after every row) and a
PNG plot beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

GPU_SIZES = (2875, 11464, 45850, 103324)
CPU_SIZES = (2875, 11464)
MODELS = ("2dmambamil", "mambamil", "abmil", "transmil")
PATCH = 512
SECTIONS = ("check", "models", "ops", "profile", "ab", "sweep")
SWEEP = ((64, 4), (256, 4), (128, 8))  # (chunk length, warps) of the 1D kernel, besides the default
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DEADLINE = float("inf")  # perf_counter time after which rows are skipped (--budget-s)
SMOKE = False  # --smoke: every section on tiny shapes (checks this script on a CPU, Triton interpreted)


# --------------------------------------------------------------------------------------------------
# Inputs


def tissue_coords(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 2) level-0 (x, y) pixel coordinates of ``n`` patches in raster order: the n highest
    cells of a smooth random field (a few Gaussian blobs plus smoothed noise) on a grid about 1.3x
    wider than tall, so tissue covers about 55 % of its bounding box, in irregular pieces."""
    g = torch.Generator().manual_seed(seed)
    h = max(1, round(math.sqrt(n / 0.55 / 1.3)))
    w = max(1, math.ceil(n / 0.55 / h))
    ys = torch.arange(h, dtype=torch.float64)[:, None] / h
    xs = torch.arange(w, dtype=torch.float64)[None, :] / h
    field = torch.zeros(h, w, dtype=torch.float64)
    for _ in range(5):
        cy, cx = torch.rand(2, generator=g, dtype=torch.float64) * torch.tensor([1.0, w / h])
        sy, sx = 0.12 + 0.25 * torch.rand(2, generator=g, dtype=torch.float64)
        field += torch.exp(-(((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2))
    noise = torch.rand(1, 1, h, w, generator=g, dtype=torch.float64)
    k = max(1, h // 20)
    field += 0.4 * F.avg_pool2d(noise, 2 * k + 1, stride=1, padding=k, count_include_pad=False)[0, 0]
    cells = torch.topk(field.flatten(), n).indices.sort().values
    return torch.stack([cells % w, cells // w], dim=1).double() * PATCH


def make_bag(n: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 1024, generator=g)
    return feats.to(device), tissue_coords(n, seed).float().to(device)


def scan_inputs(batch: int, dim: int, dstate: int, L: int, dtype, device: str, seed: int = 0) -> dict:
    """Leaf tensors for one scan, with Mamba-like magnitudes (Δ = softplus(delta + bias) ~ 0.01-0.3)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g) * scale + shift

    t = dict(
        u=rnd(batch, dim, L),
        delta=rnd(batch, dim, L, scale=0.5, shift=-1.0),
        A=-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
        * (0.5 + torch.rand(dim, 1, generator=g)),
        B=rnd(batch, dstate, L),
        C=rnd(batch, dstate, L),
        D=rnd(dim),
        z=rnd(batch, dim, L),
        delta_bias=rnd(dim, scale=0.5, shift=-2.5),
    )
    return {
        k: v.to(
            device=device, dtype=dtype if k in ("u", "delta", "z", "B", "C") else torch.float32
        ).requires_grad_()
        for k, v in t.items()
    }


# --------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(
    fn, device: str, min_reps: int = 3, max_reps: int = 15, min_s: float = 1.0
) -> tuple[float, int]:
    """Median wall time (ms) of whole calls of ``fn``, synchronised; reps until ``min_s`` has passed."""
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_s):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def op_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    return median_ms(fn, device, min_reps=2, max_reps=3, min_s=0.0)[0]


def peak_mib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double().to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# Sections


def scan_1d(t, reverse=False, backend="triton"):
    from mamba2d import selective_scan_1d

    return selective_scan_1d(
        t["u"],
        t["delta"],
        t["A"],
        t["B"],
        t["C"],
        t["D"],
        t["z"],
        t["delta_bias"],
        True,
        reverse=reverse,
        backend=backend,
    )


def scan_2d(t, H, W, backend="triton"):
    from mamba2d import selective_scan_2d

    return selective_scan_2d(
        t["u"],
        t["delta"],
        t["A"],
        t["B"],
        t["C"],
        t["D"],
        t["z"],
        t["delta_bias"],
        True,
        height=H,
        width=W,
        backend=backend,
    )


def fwd_bwd(call, t, dout):
    out = call(t)
    return out, torch.autograd.grad(out, [t[k] for k in ORDER], dout)


def out_of_time() -> bool:
    return time.perf_counter() > DEADLINE


def time_op(call, t: dict, device: str) -> dict:
    """Median forward and forward+backward ms of ``call(t)``, and the forward+backward peak (MiB)."""
    dout = torch.randn_like(t["u"])

    def fwd():
        with torch.no_grad():
            return call(t)

    def both():
        return fwd_bwd(call, t, dout)

    return dict(
        fwd_ms=op_ms(fwd, device), fwdbwd_ms=op_ms(both, device), fwdbwd_peak_mib=peak_mib(both, device)
    )


def sweep(device: str, record) -> None:
    """Chunk length and warps of the 1D kernel at MambaMIL's scan shape; keeps the fastest."""
    from mamba2d.ops import scan1d_triton as s1

    shape = (1, 8, 4, 40) if SMOKE else (1, 1024, 16, 103324)
    best = None
    t = scan_inputs(*shape, torch.float32, device)
    for T, warps in ((s1.CHUNK, s1.NUM_WARPS), *SWEEP[: 1 if SMOKE else None]):
        if out_of_time():
            break
        s1.CHUNK_OVERRIDE, s1.NUM_WARPS_OVERRIDE = T, warps
        try:
            res = time_op(scan_1d, t, device)
        except Exception as e:  # a configuration that does not compile or fit is skipped
            record(dict(section="sweep", chunk=T, warps=warps, error=repr(e)[:300]))
            continue
        record(dict(section="sweep", shape=shape, dtype="fp32", chunk=T, warps=warps, **res))
        if best is None or res["fwdbwd_ms"] < best[0]:
            best = (res["fwdbwd_ms"], T, warps)
    s1.CHUNK_OVERRIDE, s1.NUM_WARPS_OVERRIDE = (best[1], best[2]) if best else (None, None)
    if best:
        record(dict(section="sweep", chosen_chunk=best[1], chosen_warps=best[2]))


def check(device: str, record) -> None:
    """The 1D kernel (every output buffer poisoned with NaN) against the float64 PyTorch path:
    relative error of the output and of all eight gradients."""
    from mamba2d.ops import scan1d_triton as s1

    cases = [
        ((2, 64, 16, 5003), torch.float32, True, 2),
        ((1, 32, 16, 103324), torch.float32, False, None),
        ((1, 64, 16, 20011), torch.bfloat16, False, None),
    ]
    if SMOKE:
        cases = [((1, 4, 3, 37), torch.float32, True, 2), ((1, 2, 3, 37), torch.float16, False, None)]
    s1.POISON_OUTPUTS = True
    try:
        for shape, dtype, reverse, groups in cases:
            t = scan_inputs(*shape, dtype, device, seed=7)
            if groups:
                b, _, n, L = shape
                for k in ("B", "C"):
                    t[k] = (
                        torch.randn(b, groups, n, L, generator=torch.Generator().manual_seed(len(k)))
                        .to(device, dtype)
                        .requires_grad_()
                    )
            dout = torch.randn(t["u"].shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
            out, grads = fwd_bwd(partial(scan_1d, reverse=reverse), t, dout)
            t64 = {k: v.detach().double().requires_grad_() for k, v in t.items()}
            ref, rgrads = fwd_bwd(partial(scan_1d, reverse=reverse, backend="torch"), t64, dout.double())
            errs = {
                "out": _rel(out, ref),
                **{k: _rel(a, b) for k, a, b in zip(ORDER, grads, rgrads, strict=True)},
            }
            finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
            record(
                dict(
                    section="check",
                    shape=shape,
                    dtype=str(dtype).replace("torch.", ""),
                    reverse=reverse,
                    groups=groups or 1,
                    finite=finite,
                    max_rel_err=max(errs.values()),
                    errors=errs,
                )
            )
            del t, t64, out, ref, grads, rgrads
    finally:
        s1.POISON_OUTPUTS = False


def ops(device: str, record, sizes) -> None:
    """ns per state cell (batch * dim * dstate * L) of the operators alone, fwd and fwd+bwd."""
    wide, narrow, sides = (8, 4, (4, 8)) if SMOKE else (1024, 256, (128, 384))
    dtypes = (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16)
    cases = []
    for L in sizes:  # MambaMIL's scans
        for dtype in dtypes:
            cases.append(("1d", (1, wide, 16, L), dtype, None))
    for side in sides:  # 2D vs 1D at equal L (2DMambaMIL's width)
        for dtype in dtypes:
            cases.append(("2d", (1, narrow, 16, side * side), dtype, (side, side)))
            cases.append(("1d", (1, narrow, 16, side * side), dtype, None))
    for L in sizes[:2]:  # the one-row 2D kernel MambaMIL ran before the 1D kernel existed
        cases.append(("2d-one-row", (1, wide, 16, L), torch.float32, (1, L)))
    for kind, shape, dtype, grid in cases:
        if out_of_time():
            record(dict(section="ops", op=kind, shape=shape, skipped="time budget"))
            continue
        call = scan_1d if kind == "1d" else partial(scan_2d, H=grid[0], W=grid[1])
        res = time_op(call, scan_inputs(*shape, dtype, device), device)
        cells = math.prod(shape)
        record(
            dict(
                section="ops",
                op=kind,
                shape=shape,
                grid=grid,
                dtype=str(dtype).replace("torch.", ""),
                fwd_ns_per_cell=res["fwd_ms"] * 1e6 / cells,
                fwdbwd_ns_per_cell=res["fwdbwd_ms"] * 1e6 / cells,
                **res,
            )
        )


def _autocast(device: str, bf16: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def trainer(name: str, n: int, device: str, bf16: bool, **model_kwargs):
    """One training step of ``name`` on an n-patch bag, as a function of no arguments."""
    from mamba2d.mil import build_model

    torch.manual_seed(0)
    model = build_model(name, 1024, 2, **model_kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    feats, coords = make_bag(n, device)
    target = torch.tensor([1], device=device)

    def step():
        with _autocast(device, bf16):
            out = model(feats, coords, PATCH)
            loss = F.cross_entropy(out.logits.float()[None], target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def model_step(name: str, n: int, device: str, bf16: bool, warmup: int = 2, **model_kwargs) -> dict:
    """Median step time and step peak memory of ``name`` on an n-patch bag."""
    step = trainer(name, n, device, bf16, **model_kwargs)
    for _ in range(warmup):
        step()
    peak = peak_mib(step, device)
    cpu = device == "cpu"
    ms, reps = median_ms(
        step, device, min_reps=2 if cpu else 3, max_reps=3 if cpu else 15, min_s=0.0 if cpu else 0.5
    )
    return dict(step_ms=ms, reps=reps, peak_mib=peak)


def models(device: str, record, sizes, names, dtypes, budget_left) -> None:
    for n in sizes:
        for name in names:
            for dt in dtypes:
                if budget_left() <= 0:
                    record(dict(section="models", model=name, patches=n, dtype=dt, skipped="time budget"))
                    continue
                row = dict(section="models", model=name, patches=n, dtype=dt)
                try:
                    row.update(model_step(name, n, device, dt == "bf16"))
                except torch.cuda.OutOfMemoryError as e:
                    row["error"] = "out of memory: " + str(e)[:200]
                record(row)
                if device == "cuda":
                    torch.cuda.empty_cache()


def profile(device: str, record, n: int = 45850) -> None:
    """Top GPU kernels (self device time) of one training step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in ("2dmambamil", "mambamil"):
        for dt in ("fp32", "bf16"):
            if out_of_time():
                continue
            step = trainer(name, n, device, dt == "bf16")
            step()
            step()
            sync(device)
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                sync(device)
            rows = []
            for ev in prof.key_averages():
                dev_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
                if dev_us > 0:
                    rows.append((dev_us, ev.key, ev.count))
            rows.sort(reverse=True)
            total = sum(r[0] for r in rows)
            events = prof.events()
            launches = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            copies = sum(1 for e in events if e.name == "aten::copy_")
            record(
                dict(
                    section="profile",
                    model=name,
                    patches=n,
                    dtype=dt,
                    gpu_kernel_ms=total / 1e3,
                    kernel_launches=launches,
                    aten_copies=copies,
                    top=[dict(kernel=k[:90], ms=us / 1e3, calls=c) for us, k, c in rows[:14]],
                )
            )


def ab_upcast(device: str, record, sizes) -> None:
    """2DMambaMIL in bf16 with the scan's bf16 inputs cast to float32 first (the 2D kernels run
    slower on bf16 inputs), next to the plain bf16 step."""
    import mamba2d.nn.mamba2d as nm

    real = nm.selective_scan_2d

    def upcast(u, delta, A, B, C, D, z, delta_bias, softplus, **kw):
        if u.dtype == torch.bfloat16:
            f = torch.float32
            return real(u.to(f), delta.to(f), A, B.to(f), C.to(f), D, z.to(f), delta_bias, softplus, **kw).to(
                u.dtype
            )
        return real(u, delta, A, B, C, D, z, delta_bias, softplus, **kw)

    for n in sizes:
        for label in ("bf16", "bf16-scan-fp32"):
            if out_of_time():
                continue
            nm.selective_scan_2d = upcast if label != "bf16" else real
            try:
                record(
                    dict(
                        section="ab",
                        model="2dmambamil",
                        patches=n,
                        variant=label,
                        **model_step("2dmambamil", n, device, True),
                    )
                )
            finally:
                nm.selective_scan_2d = real


# --------------------------------------------------------------------------------------------------
# Output


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in rows if r.get("section") == "models" and "step_ms" in r]
    if not runs:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax, label in (("step_ms", axes[0], "step time (ms)"), ("peak_mib", axes[1], "step peak (MiB)")):
        for name in dict.fromkeys(r["model"] for r in runs):
            for dt in dict.fromkeys(r["dtype"] for r in runs):
                pts = sorted(
                    (r["patches"], r[key])
                    for r in runs
                    if r["model"] == name and r["dtype"] == dt and r.get(key) is not None
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        ls="-" if dt == "fp32" else "--",
                        label=f"{name} {dt}",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patches")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--devices",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="comma-separated: cuda, cpu (default: cuda if available)",
    )
    ap.add_argument(
        "--sections",
        default=None,
        help=f"comma-separated subset of {','.join(SECTIONS)} (CPU runs models only); default all",
    )
    ap.add_argument(
        "--sizes",
        default=None,
        help="bag sizes in patches (default GPU "
        f"{','.join(map(str, GPU_SIZES))}; CPU {','.join(map(str, CPU_SIZES))})",
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument(
        "--budget-s", type=float, default=1e9, help="skip remaining model rows after this many seconds"
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/mil_step_<device>.json)"
    )
    ap.add_argument("--profile-size", type=int, default=None, help="bag size of the profile section")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global SMOKE, DEADLINE
    SMOKE = a.smoke
    t_start = time.perf_counter()
    DEADLINE = t_start + a.budget_s
    for device in a.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: skipping cuda", file=sys.stderr)
            continue
        sizes = (
            tuple(int(s) for s in a.sizes.split(","))
            if a.sizes
            else (GPU_SIZES if device == "cuda" else CPU_SIZES)
        )
        sections = (
            a.sections.split(",")
            if a.sections
            else list(SECTIONS if device == "cuda" or SMOKE else ("models",))
        )
        if device == "cpu":
            torch.set_num_threads(a.threads)
        import triton

        name = (
            torch.cuda.get_device_name(0)
            if device == "cuda"
            else f"CPU ({platform.machine()}, {a.threads} threads)"
        )
        words = name.lower().split()
        tag = (
            (words[1] if len(words) > 1 else words[0]) if device == "cuda" else "cpu"
        )  # "NVIDIA H200" -> h200
        out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"mil_step_{tag}.json"
        data = dict(
            date=_dt.date.today().isoformat(),
            device=name,
            torch=torch.__version__,
            triton=triton.__version__,
            features=1024,
            patch_px=PATCH,
            sizes=list(sizes),
            rows=[],
        )

        def record(row, data=data, out=out):
            data["rows"].append(row)
            print(json.dumps(row), flush=True)
            write_json(out, data)

        def budget_left():
            return a.budget_s - (time.perf_counter() - t_start)

        dtypes = ("fp32", "bf16") if device == "cuda" else ("fp32",)
        for section in sections:
            if section == "models":
                models(device, record, sizes, a.models.split(","), dtypes, budget_left)
                plot(out.with_suffix(".png"), data["rows"])
            elif device != "cuda" and not SMOKE:
                continue
            elif budget_left() <= 0:
                record(dict(section=section, skipped="time budget"))
            elif section == "sweep":
                sweep(device, record)
            elif section == "check":
                check(device, record)
            elif section == "ops":
                ops(device, record, sizes)
            elif section == "profile":
                profile(device, record, a.profile_size or sizes[min(2, len(sizes) - 1)])
            elif section == "ab":
                ab_upcast(device, record, (sizes[1 if len(sizes) > 1 else 0], sizes[-1]))
        from mamba2d.ops import scan1d_triton as s1

        data["chunk"] = s1.CHUNK_OVERRIDE or s1.CHUNK
        data["num_warps"] = s1.NUM_WARPS_OVERRIDE or s1.NUM_WARPS
        data["seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
