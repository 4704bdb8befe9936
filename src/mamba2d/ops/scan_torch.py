"""PyTorch backend: vectorised passes with a hand-written backward; runs on any device.

Each pass is a first-order linear recurrence along one grid axis, evaluated by a two-level
chunked scan: the axis is cut into chunks of about sqrt(length) cells, every chunk is scanned
at once by a short loop, and a second short loop carries the chunk ends across. That is
2·sqrt(length) vectorised steps per pass instead of `length`, with O(length) work.

Memory: the forward holds about 4 and the backward about 8 tensors of shape
(batch, dim, dstate, H, W) in the working dtype (float32, or float64 for float64 inputs).
Nothing of that size is saved between forward and backward: the backward recomputes the states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba2d.ops.layout import ScanLayout

_W_AXIS = -1  # of the 6D working view (batch, groups, per_group, dstate, H, W)
_H_AXIS = -2


def linear_scan(a: torch.Tensor, x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """s[t] = a[t] * s[t-1] + x[t] along ``dim`` with s[-1] = 0 (``reverse``: from the far end).

    ``a`` and ``x`` broadcast to a common shape; the result has that shape.
    """
    a, x = torch.broadcast_tensors(a, x)
    a = a.movedim(dim, -1)
    x = x.movedim(dim, -1)
    length = x.shape[-1]
    chunk = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        # Identity elements (a = 1, x = 0) pass the state through unchanged.
        a = F.pad(a, (0, pad), value=1.0)
        x = F.pad(x, (0, pad), value=0.0)
    a = a.reshape(*a.shape[:-1], n_chunks, chunk)
    x = x.reshape(*x.shape[:-1], n_chunks, chunk)

    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    s = torch.empty_like(x)
    p = torch.empty_like(a)  # product of the decays from the chunk's start to t
    prev = None
    for t in steps:
        if prev is None:
            s[..., t] = x[..., t]
            p[..., t] = a[..., t]
        else:
            s[..., t] = torch.addcmul(x[..., t], a[..., t], s[..., prev])
            p[..., t] = a[..., t] * p[..., prev]
        prev = t
    last = steps[-1]  # the chunk's final cell in scan order
    # Carry the chunk ends across chunks: the state entering chunk k.
    order = range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)
    carry = torch.zeros_like(s[..., 0, 0])
    carries = torch.empty_like(s[..., 0])
    for k in order:
        carries[..., k] = carry
        carry = torch.addcmul(s[..., k, last], p[..., k, last], carry)
    s = torch.addcmul(s, p, carries.unsqueeze(-1))
    s = s.reshape(*s.shape[:-2], n_chunks * chunk)[..., :length]
    return s.movedim(-1, dim)


def _shift(t: torch.Tensor, dim: int, toward_end: bool, fill: float) -> torch.Tensor:
    """Move ``t`` one cell along ``dim``: out[i] = t[i-1] (``toward_end``) or t[i+1], edge = fill."""
    n = t.shape[dim]
    edge = torch.full_like(t.narrow(dim, 0, 1), fill)
    if toward_end:
        return torch.cat([edge, t.narrow(dim, 0, n - 1)], dim=dim)
    return torch.cat([t.narrow(dim, 1, n - 1), edge], dim=dim)


def _passes(layout: ScanLayout) -> tuple[tuple[int, bool], tuple[int, bool]]:
    """(axis, reverse) of the first and of the second pass."""
    horizontal = (_W_AXIS, layout.flip_h)
    vertical = (_H_AXIS, layout.flip_v)
    return (vertical, horizontal) if layout.transpose else (horizontal, vertical)


class _Views:
    """The inputs reshaped to broadcast over (batch, groups, per_group, dstate, H, W)."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, layout: ScanLayout):
        batch, dim, _ = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        per = dim // groups
        H, W = layout.height, layout.width
        wd = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.wd = wd
        dt_raw = delta.to(wd)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(wd)[None, :, None]
        self.dt_raw = dt_raw
        self.dt = F.softplus(dt_raw) if delta_softplus else dt_raw
        self.dt6 = self.dt.reshape(batch, groups, per, 1, H, W)
        self.u6 = u.to(wd).reshape(batch, groups, per, 1, H, W)
        self.A6 = A.to(wd).reshape(1, groups, per, dstate, 1, 1)
        self.B6 = B.to(wd).reshape(batch, groups, 1, dstate, H, W)
        self.C6 = C.to(wd).reshape(batch, groups, 1, dstate, H, W)

    def states(self, layout: ScanLayout):
        """Decays a, inputs X, first-pass states g and second-pass states h (all 6D)."""
        a = torch.exp(self.dt6 * self.A6)
        x = self.dt6 * self.B6 * self.u6
        (ax1, rev1), (ax2, rev2) = _passes(layout)
        g = linear_scan(a, x, ax1, rev1)
        h = linear_scan(a, g, ax2, rev2)
        return a, x, g, h


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout):
        v = _Views(u, delta, A, B, C, delta_bias, delta_softplus, layout)
        _, _, _, h = v.states(layout)
        y = (v.C6 * h).sum(dim=3).reshape(u.shape)
        del h
        if D is not None:
            y = y + D.to(v.wd)[None, :, None] * u.to(v.wd)
        out = y * F.silu(z.to(v.wd)) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.layout = layout
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        layout: ScanLayout = ctx.layout
        v = _Views(u, delta, A, B, C, delta_bias, ctx.delta_softplus, layout)
        wd = v.wd
        batch, dim, length = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        H, W = layout.height, layout.width
        (ax1, rev1), (ax2, rev2) = _passes(layout)

        a, x, g, h = v.states(layout)
        dout = dout.to(wd)
        dz = None
        if z is not None:
            zf = z.to(wd)
            sig = torch.sigmoid(zf)
            y = (v.C6 * h).sum(dim=3).reshape(u.shape)
            if D is not None:
                y = y + D.to(wd)[None, :, None] * u.to(wd)
            dz = dout * y * sig * (1 + zf * (1 - sig))
            dy = dout * zf * sig
        else:
            dy = dout
        dy6 = dy.reshape(batch, groups, dim // groups, 1, H, W)

        # Adjoints run the passes backwards; the decay that links cell t to its successor is the
        # successor's own decay, hence the shifted copies of a.
        a2 = _shift(a, ax2, toward_end=rev2, fill=0.0)
        lam_h = linear_scan(a2, v.C6 * dy6, ax2, reverse=not rev2)
        del a2
        a1 = _shift(a, ax1, toward_end=rev1, fill=0.0)
        lam_g = linear_scan(a1, lam_h, ax1, reverse=not rev1)
        del a1
        # d loss / d log(a) from both passes: a·h_prev·λ_h + a·g_prev·λ_g.
        dlog_a = a * (_shift(h, ax2, toward_end=not rev2, fill=0.0) * lam_h
                      + _shift(g, ax1, toward_end=not rev1, fill=0.0) * lam_g)
        del a, x, lam_h

        dA = (dlog_a * v.dt6).sum(dim=(0, 4, 5)).reshape(dim, dstate)
        lam_b = (lam_g * v.B6).sum(dim=3)  # Σ_n λ_g B: (batch, groups, per, H, W)
        ddt = (dlog_a * v.A6).sum(dim=3) + lam_b * v.u6.squeeze(3)
        del dlog_a
        du = (lam_b * v.dt6.squeeze(3)).reshape(u.shape)
        if D is not None:
            du = du + D.to(wd)[None, :, None] * dy
        dB = (lam_g * (v.dt6 * v.u6)).sum(dim=2).reshape(batch, groups, dstate, length)
        del lam_g
        dC = (dy6 * h).sum(dim=2).reshape(batch, groups, dstate, length)
        ddt = ddt.reshape(u.shape)
        if ctx.delta_softplus:
            ddt = ddt * torch.sigmoid(v.dt_raw)
        dD = (dy * u.to(wd)).sum(dim=(0, 2)) if D is not None else None
        dbias = ddt.sum(dim=(0, 2)) if delta_bias is not None else None

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (cast(du, u), cast(ddt, delta), cast(dA, A), cast(dB, B), cast(dC, C),
                cast(dD, D), cast(dz, z), cast(dbias, delta_bias), None, None)


def selective_scan_2d_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout: ScanLayout):
    """Torch backend; B and C arrive as (batch, groups, dstate, L). See ``selective_scan_2d``."""
    return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), layout)
