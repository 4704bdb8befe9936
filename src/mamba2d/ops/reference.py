"""Plain float64 reference of the 2D selective scan: the ground truth for tests.

Every cell is visited by an explicit loop in scan order, exactly as the definition reads.
Nothing here is fast; everything here is obvious.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba2d.ops.layout import ScanLayout


def _pass(a: torch.Tensor, x: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """One first-order recurrence s[t] = a[t] * s[t-1] + x[t] along ``dim`` (a Python loop)."""
    length = x.shape[dim]
    order = range(length - 1, -1, -1) if reverse else range(length)
    state = torch.zeros_like(x.select(dim, 0))
    out = []
    for t in order:
        state = a.select(dim, t) * state + x.select(dim, t)
        out.append(state)
    if reverse:
        out.reverse()
    return torch.stack(out, dim=dim)


def selective_scan_2d_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    layout: ScanLayout,
) -> torch.Tensor:
    """The definition, evaluated in float64 and differentiable by autograd.

    Shapes as in :func:`mamba2d.selective_scan_2d`; B and C are already (batch, groups, dstate, L).
    Returns a tensor of ``u``'s dtype and shape (batch, dim, L).
    """
    f64 = torch.float64
    batch, dim, length = u.shape
    H, W = layout.height, layout.width
    groups, dstate = B.shape[1], B.shape[2]
    per_group = dim // groups

    dt = delta.to(f64)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f64)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    # Broadcast B and C from their group to every channel of it: (batch, dim, dstate, H, W).
    Bc = B.to(f64).repeat_interleave(per_group, dim=1).reshape(batch, dim, dstate, H, W)
    Cc = C.to(f64).repeat_interleave(per_group, dim=1).reshape(batch, dim, dstate, H, W)
    dt5 = dt.reshape(batch, dim, 1, H, W)
    u5 = u.to(f64).reshape(batch, dim, 1, H, W)

    a = torch.exp(dt5 * A.to(f64)[None, :, :, None, None])
    x = dt5 * Bc * u5
    horizontal = (-1, layout.flip_h)  # the W axis of (batch, dim, dstate, H, W)
    vertical = (-2, layout.flip_v)
    first, second = (vertical, horizontal) if layout.transpose else (horizontal, vertical)
    g = _pass(a, x, *first)
    h = _pass(a, g, *second)

    y = (Cc * h).sum(dim=2).reshape(batch, dim, length)
    if D is not None:
        y = y + D.to(f64)[None, :, None] * u.to(f64)
    if z is not None:
        y = y * F.silu(z.to(f64))
    return y.to(u.dtype)
