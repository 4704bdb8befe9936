"""2DVMamba throughput on one GPU: correctness of the Triton path first, then images/s and peak
memory of training (forward + backward + AdamW step) and inference, for the 2D model and its 1D
cross-scan twin, plus the scan alone at each stage's shape.

    python benchmarks/vision_throughput.py --out benchmarks/results/vision_h100.json

Steps, in order (the script stops at the first failed check):
1. SS2D (both scans) with the Triton backend against the torch backend run in float64, on fresh
   random inputs: output and input gradient, relative max-norm error below 2e-4 in float32.
2. The whole tiny model, Triton vs torch backend in float32: logits within 1e-3 relative.
3. Timings with CUDA events after warm-up: batch 128 at 224 x 224, bf16 autocast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba2d.ops import selective_scan_2d  # noqa: E402
from mamba2d.vision import BUILDERS, SS2D  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def check_ss2d(device: torch.device) -> list[dict]:
    out = []
    for scan in ("2d", "1d"):
        torch.manual_seed(1)
        layer = SS2D(32, d_state=1, scan=scan).to(device)
        x = torch.randn(2, 12, 20, 32, device=device)
        ref = SS2D(32, d_state=1, scan=scan, backend="torch").to(device).double()
        ref.load_state_dict(layer.state_dict())
        layer.backend = "triton"
        xt, xr = x.clone().requires_grad_(), x.double().clone().requires_grad_()
        yt, yr = layer(xt), ref(xr)
        g = torch.randn_like(yr)
        yt.backward(g.float())
        yr.backward(g)
        row = {"check": f"SS2D scan={scan} triton fp32 vs torch fp64", "out_rel": rel(yt, yr),
               "grad_rel": rel(xt.grad, xr.grad)}
        row["ok"] = row["out_rel"] < 2e-4 and row["grad_rel"] < 2e-4
        out.append(row)
    return out


def check_model(device: torch.device) -> list[dict]:
    out = []
    for name in ("vmamba2d_tiny", "vmamba1d_tiny"):
        torch.manual_seed(2)
        a = BUILDERS[name](num_classes=10).to(device).eval()
        b = BUILDERS[name](num_classes=10, backend="torch").to(device).eval()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 3, 64, 96, device=device)
        with torch.no_grad():
            la, lb = a(x), b(x)
        row = {"check": f"{name} triton vs torch backend fp32 logits", "rel": rel(la, lb)}
        row["ok"] = row["rel"] < 1e-3
        out.append(row)
    return out


def timed(fn, warmup: int, iters: int) -> float:
    """Seconds per call, by CUDA events over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def bench_model(name: str, batch: int, size: int, warmup: int, iters: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = BUILDERS[name]().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    row: dict = {"model": name, "batch": batch, "size": size, "precision": "bf16 autocast",
                 "parameters": sum(p.numel() for p in model.parameters())}

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    torch.cuda.reset_peak_memory_stats()
    t = timed(infer, warmup, iters)
    row.update(infer_s_per_batch=t, infer_images_per_s=batch / t,
               infer_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    t = timed(train, warmup, iters)
    row.update(train_s_per_batch=t, train_images_per_s=batch / t,
               train_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return row


def bench_scans(batch: int, size: int, warmup: int, iters: int, device: torch.device) -> list[dict]:
    """One direction's scan (forward, and forward + backward) at each stage's grid, 2D vs 1D layout."""
    rows = []
    for stage, d in enumerate((96, 192, 384, 768)):
        side = size // 2 ** (stage + 2)
        L = side * side
        g = torch.Generator(device=device).manual_seed(stage)
        u = torch.randn(batch, d, L, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        delta = (0.5 * torch.randn(batch, d, L, device=device, generator=g)).bfloat16().requires_grad_()
        A = -torch.rand(d, 1, device=device, generator=g).add(0.5).requires_grad_()
        B = torch.randn(batch, 1, L, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        C = torch.randn(batch, 1, L, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        D = torch.ones(d, device=device).requires_grad_()
        bias = torch.zeros(d, device=device).requires_grad_()
        tensors = (u, delta, A, B, C, D, None, bias, True)
        for layout, (h, w) in (("2d", (side, side)), ("1d", (1, L))):
            def fwd(h=h, w=w, t=tensors):
                return selective_scan_2d(*t, height=h, width=w)

            def fwd_bwd(h=h, w=w):
                fwd(h, w).sum().backward()

            with torch.no_grad():
                tf = timed(fwd, warmup, iters)
            tb = timed(fwd_bwd, warmup, iters)
            # Bytes the scan must move at least: u, delta, y (bf16), B and C (bf16, once per batch).
            min_bytes = 2 * (3 * batch * d * L + 2 * batch * L)
            rows.append({"stage": stage + 1, "grid": f"{side}x{side}", "dim": d, "layout": layout,
                         "fwd_ms": tf * 1e3, "fwd_bwd_ms": tb * 1e3,
                         "fwd_GBps_min_traffic": min_bytes / tf / 1e9})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--models", default="vmamba2d_tiny,vmamba1d_tiny")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    import triton

    result: dict = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "triton": triton.__version__,
                    "python": platform.python_version(),
                    "checks": check_ss2d(device) + check_model(device)}
    for c in result["checks"]:
        print(json.dumps(c), flush=True)
    if not all(c["ok"] for c in result["checks"]):
        Path(args.out).write_text(json.dumps(result, indent=2))
        print("a correctness check failed; no timings", file=sys.stderr)
        return 1
    result["models"] = []
    for name in args.models.split(","):
        row = bench_model(name, args.batch, args.size, args.warmup, args.iters, device)
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        result["models"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=2))
    result["scans"] = bench_scans(args.batch, args.size, args.warmup, args.iters, device)
    for r in result["scans"]:
        print(json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
