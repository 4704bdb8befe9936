"""``mamba2d selfcheck``: the 2D scan (backend 'auto') against its float64 reference."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mamba2d import __version__
from mamba2d.cli.common import Subparsers

if TYPE_CHECKING:
    import torch

#: The largest relative error (output and every gradient) the check accepts.
TOLERANCE = 1e-4
BATCH, DIM, DSTATE, HEIGHT, WIDTH = 2, 8, 4, 12, 16


def add_parser(sub: Subparsers) -> None:
    check = sub.add_parser(
        "selfcheck",
        help="run the 2D scan on small random inputs and check it against the reference",
        description=(
            "Run selective_scan_2d (backend='auto') forward and backward on random inputs "
            f"(batch {BATCH}, dim {DIM}, dstate {DSTATE}, {HEIGHT}x{WIDTH} grid, seed 0) and compare the "
            "output and every gradient with the float64 reference backend. Exits 1 if a relative error "
            f"exceeds {TOLERANCE:.0e}."
        ),
    )
    check.set_defaults(func=run)


def _random_inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The scan's float64 inputs (u, delta, A, B, C, D, z, delta_bias; sequences of HEIGHT * WIDTH)
    and the output gradient, from seed 0."""
    import torch

    length = HEIGHT * WIDTH
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = {
        "u": rand(BATCH, DIM, length),
        "delta": rand(BATCH, DIM, length, scale=0.5),
        "A": -torch.rand(DIM, DSTATE, generator=gen, dtype=torch.float64) - 0.5,
        "B": rand(BATCH, DSTATE, length),
        "C": rand(BATCH, DSTATE, length),
        "D": rand(DIM),
        "z": rand(BATCH, DIM, length),
        "delta_bias": rand(DIM, scale=0.1),
    }
    return inputs, rand(BATCH, DIM, length)


def run(args: argparse.Namespace) -> int:
    import torch

    from mamba2d import selective_scan_2d
    from mamba2d.ops.api import cpu_available

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs, grad_out = _random_inputs()

    def scan(dtype: torch.dtype, dev: torch.device, backend: str) -> list[torch.Tensor]:
        leaves = {k: v.to(dev, dtype).requires_grad_() for k, v in inputs.items()}
        out = selective_scan_2d(**leaves, delta_softplus=True, height=HEIGHT, width=WIDTH, backend=backend)
        out.backward(grad_out.to(dev, dtype))
        return [out.detach()] + [leaves[k].grad for k in inputs]

    used = "triton" if device.type == "cuda" else "cpu" if cpu_available(torch.empty(0))[0] else "torch"
    print(f"mamba2d {__version__} selfcheck: batch={BATCH} dim={DIM} dstate={DSTATE} grid={HEIGHT}x{WIDTH}")
    print(f"device: {device}, backend='auto' resolves to '{used}'")
    got = scan(torch.float32, device, "auto")
    want = scan(torch.float64, torch.device("cpu"), "reference")

    worst = 0.0
    for name, g, w in zip(["output"] + [f"grad {k}" for k in inputs], got, want, strict=True):
        err = ((g.double().cpu() - w).norm() / w.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"  {name:<16} relative error {err:.2e}")
    ok = worst <= TOLERANCE
    verdict = "OK" if ok else "FAILED"
    print(f"{verdict}: worst relative error {worst:.2e} (tolerance {TOLERANCE:.0e}) vs float64 reference")
    return 0 if ok else 1
