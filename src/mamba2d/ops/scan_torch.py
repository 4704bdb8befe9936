"""PyTorch backend: vectorised passes with a hand-written backward; runs on any device.

Working layout: every state-sized tensor is (H, W, batch, groups, per_group, dstate), grid axes
first. A pass along H then steps over contiguous slabs, and a pass along W over H blocks of
contiguous inner rows, so each step of a recurrence is one in-place fused multiply-add on
all other dimensions at once, and no state-sized tensor is ever transposed.

Memory: the forward holds about 3 and the backward about 7 tensors of batch·dim·dstate·H·W
elements in the working dtype (float32, or float64 for float64 inputs). Nothing of that size is
kept between forward and backward: the backward recomputes the states. The backward builds no
autograd graph, whatever H and W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba2d.ops.layout import ScanLayout

_H, _W = 0, 1  # grid axes of the working layout


def scan_inplace(s: torch.Tensor, a: torch.Tensor, dim: int, reverse: bool, successor: bool = False) -> None:
    """Turn ``s`` (holding x) into the recurrence s[t] = d[t] * s[prev] + x[t] along ``dim``, in place.

    ``prev`` is t - 1 (t + 1 when ``reverse``). The decay d[t] is a[t], or a[prev] when
    ``successor``: the adjoint of a recurrence runs backwards with its successor's decay.
    """
    length = s.shape[dim]
    order = range(length - 2, -1, -1) if reverse else range(1, length)
    for t in order:
        prev = t + 1 if reverse else t - 1
        decay = a.select(dim, prev if successor else t)
        s.select(dim, t).addcmul_(decay, s.select(dim, prev))


def _passes(layout: ScanLayout) -> tuple[tuple[int, bool], tuple[int, bool]]:
    """(axis, reverse) of the first and of the second pass."""
    horizontal = (_W, layout.flip_h)
    vertical = (_H, layout.flip_v)
    return (vertical, horizontal) if layout.transpose else (horizontal, vertical)


def _times_predecessor(a: torch.Tensor, s: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    """a[t] * s[prev] along ``dim`` (zero where t has no predecessor)."""
    out = torch.empty_like(s)
    n = s.shape[dim]
    first = n - 1 if reverse else 0  # the cell with no predecessor
    out.select(dim, first).zero_()
    if n > 1:
        here, before = (slice(0, n - 1), slice(1, n)) if reverse else (slice(1, n), slice(0, n - 1))
        idx_here = [slice(None)] * s.dim()
        idx_prev = [slice(None)] * s.dim()
        idx_here[dim], idx_prev[dim] = here, before
        torch.mul(a[tuple(idx_here)], s[tuple(idx_prev)], out=out[tuple(idx_here)])
    return out


class _Views:
    """The inputs as broadcastable views of the working layout (H, W, batch, groups, per, dstate)."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus, layout: ScanLayout):
        batch, dim, _ = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        per = dim // groups
        H, W = layout.height, layout.width
        wd = torch.float64 if u.dtype == torch.float64 else torch.float32
        self.wd = wd
        self.shape = (batch, dim, H * W)

        def chan(t):  # (batch, dim, L) -> (H, W, batch, groups, per, 1)
            return t.to(wd).permute(2, 0, 1).reshape(H, W, batch, groups, per, 1)

        def state(t):  # (batch, groups, dstate, L) -> (H, W, batch, groups, 1, dstate)
            return t.to(wd).permute(3, 0, 1, 2).reshape(H, W, batch, groups, 1, dstate)

        self.chan = chan
        dt_raw = delta.to(wd)
        if delta_bias is not None:
            dt_raw = dt_raw + delta_bias.to(wd)[None, :, None]
        self.dt_raw = dt_raw
        self.dt = chan(F.softplus(dt_raw) if delta_softplus else dt_raw)
        self.u = chan(u)
        self.A = A.to(wd).reshape(groups, per, dstate)
        self.B = state(B)
        self.C = state(C)

    def back(self, t: torch.Tensor) -> torch.Tensor:
        """(H, W, batch, groups, per) -> (batch, dim, L)."""
        H, W, batch, groups, per = t.shape
        return t.reshape(H * W, batch, groups * per).permute(1, 2, 0)

    def states(self, layout: ScanLayout, keep_g: bool):
        """Decays a, and the states h of the second pass (and g of the first when ``keep_g``)."""
        a = torch.exp(self.dt * self.A)
        g = self.dt * self.u * self.B
        (ax1, rev1), (ax2, rev2) = _passes(layout)
        scan_inplace(g, a, ax1, rev1)
        h = g.clone() if keep_g else g
        scan_inplace(h, a, ax2, rev2)
        return a, g, h


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, layout):
        v = _Views(u, delta, A, B, C, delta_bias, delta_softplus, layout)
        _, _, h = v.states(layout, keep_g=False)
        y = v.back((h * v.C).sum(dim=-1))
        del h
        if D is not None:
            y = y + D.to(v.wd)[None, :, None] * u.to(v.wd)
        out = y * F.silu(z.to(v.wd)) if z is not None else y
        # y (batch, dim, L) is kept for dz: cheaper than recomputing it from the states.
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y if z is not None else None)
        ctx.delta_softplus = delta_softplus
        ctx.layout = layout
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        layout: ScanLayout = ctx.layout
        v = _Views(u, delta, A, B, C, delta_bias, ctx.delta_softplus, layout)
        wd = v.wd
        (ax1, rev1), (ax2, rev2) = _passes(layout)

        a, g, h = v.states(layout, keep_g=True)
        dout = dout.to(wd)
        dz = None
        if z is not None:
            zf = z.to(wd)
            sig = torch.sigmoid(zf)
            dz = dout * y * sig * (1 + zf * (1 - sig))
            dy = dout * zf * sig
        else:
            dy = dout
        dy_w = v.chan(dy)

        # Adjoints: the second pass backwards, then the first, each with the successor's decay.
        lam_h = v.C * dy_w
        scan_inplace(lam_h, a, ax2, not rev2, successor=True)
        lam_g = lam_h.clone()
        scan_inplace(lam_g, a, ax1, not rev1, successor=True)
        # d loss / d log(a) = a h_prev lam_h + a g_prev lam_g.
        dlog_a = _times_predecessor(a, h, ax2, rev2).mul_(lam_h)
        del lam_h
        dlog_a.addcmul_(_times_predecessor(a, g, ax1, rev1), lam_g)
        del a, g

        dA = (dlog_a * v.dt).sum(dim=(0, 1, 2)).reshape(A.shape)
        lam_b = (lam_g * v.B).sum(dim=-1)  # Σ_n λ_g B: (H, W, batch, groups, per)
        ddt = (dlog_a * v.A).sum(dim=-1).addcmul_(lam_b, v.u.squeeze(-1))
        del dlog_a
        du = v.back(lam_b * v.dt.squeeze(-1))
        if D is not None:
            du = du + D.to(wd)[None, :, None] * dy
        dB = (lam_g * (v.dt * v.u)).sum(dim=-2)  # (H, W, batch, groups, dstate)
        del lam_g
        dC = (h * dy_w).sum(dim=-2)
        H, W, batch, groups, dstate = dB.shape
        dB = dB.reshape(H * W, batch, groups, dstate).permute(1, 2, 3, 0)
        dC = dC.reshape(H * W, batch, groups, dstate).permute(1, 2, 3, 0)
        ddt = v.back(ddt)
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
