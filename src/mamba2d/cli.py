"""The ``mamba2d`` command line."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from mamba2d import __version__

BENCH_SCRIPT = os.path.join("benchmarks", "scan.py")
TOLERANCE = 1e-4

DESCRIPTION = """\
2DMamba: 2D selective state-space scans for whole-slide images and vision.

The core of this package is selective_scan_2d, 2DMamba's 2D selective scan as a
differentiable PyTorch operator with Triton kernels for CUDA and a PyTorch
fallback for every other device.
"""

EPILOG = """\
examples:
  mamba2d demo                 run the operator once and check it against the reference
  mamba2d bench -- --help      show the benchmark script's options
"""


def _demo(args: argparse.Namespace) -> int:
    import torch

    from mamba2d import selective_scan_2d

    batch, dim, dstate, height, width = 2, 8, 4, 12, 16
    length = height * width
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, dstate, generator=gen, dtype=torch.float64) - 0.5,
        "B": rand(batch, dstate, length),
        "C": rand(batch, dstate, length),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim, scale=0.1),
    }
    grad_out = rand(batch, dim, length)
    kwargs = dict(delta_softplus=True, height=height, width=width)

    def run(dtype: torch.dtype, dev: torch.device, backend: str) -> list[torch.Tensor]:
        leaves = {k: v.to(dev, dtype).requires_grad_() for k, v in inputs.items()}
        out = selective_scan_2d(**leaves, **kwargs, backend=backend)
        out.backward(grad_out.to(dev, dtype))
        return [out.detach()] + [leaves[k].grad for k in inputs]

    used = "triton" if device.type == "cuda" else "torch"
    print(f"mamba2d {__version__} demo: batch={batch} dim={dim} dstate={dstate} grid={height}x{width}")
    print(f"device: {device}, backend='auto' resolves to '{used}'")
    got = run(torch.float32, device, "auto")
    want = run(torch.float64, torch.device("cpu"), "reference")

    worst = 0.0
    for name, g, w in zip(["output"] + [f"grad {k}" for k in inputs], got, want, strict=True):
        err = ((g.double().cpu() - w).norm() / w.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"  {name:<16} relative error {err:.2e}")
    ok = worst <= TOLERANCE
    verdict = "OK" if ok else "FAILED"
    print(f"{verdict}: worst relative error {worst:.2e} (tolerance {TOLERANCE:.0e}) vs float64 reference")
    return 0 if ok else 1


def _bench(args: argparse.Namespace) -> int:
    print(f"The scan benchmark is a script; see `python {BENCH_SCRIPT} --help` for its options.")
    if not os.path.isfile(BENCH_SCRIPT):
        print(
            f"{BENCH_SCRIPT} was not found under {os.getcwd()}; it lives in the mamba2d source "
            "repository, so run this command from a checkout's root."
        )
        return 1
    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    saved = sys.argv
    sys.argv = [BENCH_SCRIPT, *extra]
    try:
        runpy.run_path(BENCH_SCRIPT, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba2d",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mamba2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the 2D scan on small random inputs and check it against the reference",
        description=(
            "Run selective_scan_2d (backend='auto') forward and backward on random inputs "
            "(batch 2, dim 8, dstate 4, 12x16 grid, seed 0) and compare the output and every "
            f"gradient with the float64 reference backend. Exits 1 if a relative error exceeds "
            f"{TOLERANCE:.0e}."
        ),
    )
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench",
        help=f"run the scan benchmark ({BENCH_SCRIPT}, from a source checkout)",
        description=(
            f"Run {BENCH_SCRIPT} from the current directory, passing on any further arguments. "
            f"Put them after '--', e.g. `mamba2d bench -- --help`."
        ),
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
