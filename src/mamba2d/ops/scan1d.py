"""``selective_scan_1d``: Mamba's selective scan over a sequence.

It is :func:`mamba2d.selective_scan_2d` on a grid of one row (height 1, width L, ``flip_h`` =
``reverse``). On CUDA it runs a chunked Triton kernel made for long sequences
(:mod:`mamba2d.ops.scan1d_triton`: linear time and memory in L, parallel over L and channels);
every other backend is the 2D operator's on the one-row grid.
"""

from __future__ import annotations

import torch

from mamba2d.ops.api import check_scan_args, selective_scan_2d


def selective_scan_1d(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    reverse: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """The 1D selective scan (Mamba), differentiable in every tensor argument.

    Shapes:

    - ``u``, ``delta``, ``z``: (batch, dim, L)
    - ``A``: (dim, dstate), real (negative in practice)
    - ``B``, ``C``: (batch, dstate, L), or grouped (batch, groups, dstate, L); channel c uses
      group ``c // (dim // groups)``
    - ``D``, ``delta_bias``: (dim,)

    Per batch b, channel c and state n, with Δ = softplus?(delta + delta_bias):
    ``h[t] = exp(Δ[t] A[c, n]) h[t-1] + Δ[t] B[n, t] u[t]`` (``h[t+1]`` when ``reverse``),
    ``y = Σ_n C[n, t] h[t] + D u``, and ``out = y * silu(z)`` when z is given.

    ``backend``: ``"auto"`` (the Triton kernel for CUDA tensors; elsewhere what
    ``selective_scan_2d``'s ``"auto"`` picks), ``"triton"`` (the 1D Triton kernel), or any other
    backend of ``selective_scan_2d``, run on the grid of one row.

    Returns (batch, dim, L) in ``u``'s dtype; state and accumulation in float32 (float64 for
    float64 inputs off the Triton kernel).
    """
    u, delta, A, B, C, D, z, delta_bias = check_scan_args(u, delta, A, B, C, D, z, delta_bias, backend)
    if backend == "triton" or (backend == "auto" and u.is_cuda):
        from mamba2d.ops.scan1d_triton import selective_scan_1d_triton
        from mamba2d.ops.scan_triton import triton_available

        ok, why = triton_available(u)
        if not ok:
            raise ValueError(f"backend='triton' cannot run here: {why}")
        return selective_scan_1d_triton(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                        bool(reverse))
    return selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, delta_softplus, height=1,
                             width=u.shape[2], flip_h=bool(reverse), backend=backend)


__all__ = ["selective_scan_1d"]
