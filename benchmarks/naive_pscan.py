"""A straightforward PyTorch parallel scan of the 2D selective scan: the baseline to beat.

Each pass is a Hillis-Steele doubling scan (log2(length) steps of O(length) work) on the full
(batch, dim, dstate, H, W) state, differentiated by autograd. This is what one writes first
in PyTorch; it is here only to be measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _doubling_scan(a: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    length = x.shape[dim]
    offset = 1
    while offset < length:
        keep = length - offset
        a_prev = F.pad(a.narrow(dim, 0, keep), _pad_spec(a.dim(), dim, offset), value=1.0)
        x_prev = F.pad(x.narrow(dim, 0, keep), _pad_spec(x.dim(), dim, offset), value=0.0)
        x = x + a * x_prev
        a = a * a_prev
        offset *= 2
    return x


def _pad_spec(ndim: int, dim: int, offset: int) -> list[int]:
    """F.pad spec that inserts ``offset`` cells at the front of ``dim``."""
    dim = dim % ndim
    spec = [0, 0] * (ndim - dim)
    spec[-2] = offset  # front of ``dim`` (F.pad lists dims from the last one backwards)
    return spec


def naive_selective_scan_2d(u, delta, A, B, C, D, z, delta_bias, delta_softplus, height, width):
    """Same contract as ``selective_scan_2d`` (default directions, B and C ungrouped)."""
    batch, dim, length = u.shape
    dstate = A.shape[1]
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt5 = dt.reshape(batch, dim, 1, height, width)
    a = torch.exp(dt5 * A.float()[None, :, :, None, None])
    x = (
        dt5
        * B.float().reshape(batch, 1, dstate, height, width)
        * u.float().reshape(batch, dim, 1, height, width)
    )
    g = _doubling_scan(a, x, -1)
    h = _doubling_scan(a, g, -2)
    y = (C.float().reshape(batch, 1, dstate, height, width) * h).sum(2).reshape(batch, dim, length)
    if D is not None:
        y = y + D.float()[None, :, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
