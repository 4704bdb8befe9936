"""The Mamba2D layer: a Mamba block whose token mixer is the 2D selective scan.

Shapes: input and output are (batch, H, W, d_model); the optional mask is (batch, H, W), True on
real cells. Inside, d_inner = expand * d_model channels are scanned over the H x W grid.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mamba2d.ops import selective_scan_2d

# Scan origins, as (flip_h, flip_v): top-left first, then bottom-right, top-right, bottom-left.
_ORIGINS = ((False, False), (True, True), (True, False), (False, True))
# Δ given to masked cells: softplus of it is 0, so the cell adds nothing and does not decay the state.
_MASKED_DELTA = -1e4


def mamba_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's Δ bias initialisation: (n,) values whose softplus is dt, with dt drawn log-uniformly
    in [dt_min, dt_max] and clamped below at ``floor``."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


class SSMCore(nn.Module):
    """The part of a Mamba layer between in_proj and out_proj, over a 2D grid of tokens.

    Takes x and z channel-major, (batch, d_inner, L = H * W), and returns the gated scan output y
    (batch, d_inner, L). Channel-major is the scan's own layout: every token run it reads is
    contiguous, and no transpose is copied on the way (as in Mamba, in_proj is computed
    straight into it). Depthwise convolution of x (``conv="1d"``: kernel ``d_conv``, causal along
    the row-major raster; ``"2d"``: 3 x 3 on the grid), SiLU, x_proj to (Δ rank, B, C), dt_proj,
    then the 2D selective scan with the z gate and the D skip from ``directions`` origins (1: top
    left; 2: adds bottom right; 4: all corners), summed or averaged (``merge``). All directions
    share these parameters.

    Masked cells (mask False) are transparent: their conv input and Δ are 0, so they add nothing to
    the state and do not decay it.

    Initialisation follows Mamba: A = -[1..d_state] stored as A_log, D = 1, and dt_proj's bias is
    the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int,
        dt_rank: int,
        conv: Literal["1d", "2d"] = "1d",
        d_conv: int = 4,
        directions: Literal[1, 2, 4] = 1,
        merge: Literal["sum", "mean"] = "sum",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if conv not in ("1d", "2d"):
            raise ValueError(f"conv must be '1d' or '2d', got {conv!r}")
        if directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {directions!r}")
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.conv, self.directions, self.merge, self.backend = conv, directions, merge, backend
        if conv == "1d":
            self.conv_layer = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                        bias=conv_bias)
        else:
            self.conv_layer = nn.Conv2d(d_inner, d_inner, 3, groups=d_inner, padding=1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        states = torch.arange(1, d_state + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(states).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self._init_dt(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.dt_proj.bias.copy_(mamba_dt_bias(self.d_inner, dt_min, dt_max, floor))

    def forward(self, xs: torch.Tensor, z: torch.Tensor, H: int, W: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """xs, z: (batch, d_inner, H * W); mask: (batch, H, W) bool or None.

        Returns (batch, d_inner, H * W)."""
        batch, _, L = xs.shape
        keep = None if mask is None else mask.to(xs.dtype).reshape(batch, 1, L)
        if keep is not None:
            xs = xs * keep
        xs = self._conv(xs, batch, H, W)
        if keep is not None:
            xs = xs * keep
        u = F.silu(xs)
        # x_proj and dt_proj as W @ u: (Δ rank, B, C) and Δ come out channel-major too.
        sizes = [self.dt_rank, self.d_state, self.d_state]
        dt, B, C = torch.matmul(self.x_proj.weight, u).split(sizes, dim=1)
        delta = torch.matmul(self.dt_proj.weight, dt)  # (batch, d_inner, L); the bias goes in the scan
        if mask is not None:
            delta = delta.masked_fill(~mask.reshape(batch, 1, L), _MASKED_DELTA)
        A = -torch.exp(self.A_log.float())
        y = None
        for flip_h, flip_v in _ORIGINS[: self.directions]:
            yk = selective_scan_2d(u, delta, A, B, C, self.D.float(), z, self.dt_proj.bias.float(), True,
                                   height=H, width=W, flip_h=flip_h, flip_v=flip_v, backend=self.backend)
            y = yk if y is None else y + yk
        if self.merge == "mean" and self.directions > 1:
            y = y / self.directions
        return y

    def _conv(self, xs: torch.Tensor, batch: int, H: int, W: int) -> torch.Tensor:
        """Depthwise convolution of (batch, d_inner, L), causal along the raster or 3 x 3 on the grid."""
        if self.conv == "1d":
            return self.conv_layer(xs)[..., : H * W]
        return self.conv_layer(xs.reshape(batch, self.d_inner, H, W)).reshape(batch, self.d_inner, H * W)


def in_projection(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied to (batch, L, d_in), returned channel-major: (batch, d_out, L) contiguous,
    computed as W @ x^T so that no transpose is copied."""
    out = torch.matmul(linear.weight, x.transpose(1, 2))
    if linear.bias is not None:
        out = out + linear.bias.to(out.dtype)[:, None]
    return out


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype, so that under bf16/fp16 autocast the
    fused kernel runs (with a float32 weight and a bf16 input, PyTorch warns and takes the
    unfused path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class Mamba2D(nn.Module):
    """Mamba block with a 2D selective scan (2DMamba), for (batch, H, W, d_model) grids.

    in_proj to x and z (2 * d_inner), the :class:`SSMCore` (conv, SiLU, x_proj, dt_proj, 2D scan
    with z gate and D skip, from 1, 2 or 4 origins), out_proj. See :class:`SSMCore` for the
    options ``conv``, ``d_conv``, ``directions``, ``merge`` and the initialisation.

    Masked cells (mask False) are transparent, and their output is 0, so grids of different sizes
    can share a padded batch. With ``conv="2d"`` a grid's outputs do not depend on the padding;
    with ``conv="1d"`` they do when the padding widens the rows, because the raster order wraps at
    the padded width.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        conv: Literal["1d", "2d"] = "1d",
        d_conv: int = 4,
        directions: Literal[1, 2, 4] = 1,
        merge: Literal["sum", "mean"] = "sum",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.core = SSMCore(self.d_inner, d_state, self.dt_rank, conv=conv, d_conv=d_conv,
                            directions=directions, merge=merge, dt_min=dt_min, dt_max=dt_max,
                            dt_init_floor=dt_init_floor, conv_bias=conv_bias, backend=backend)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, H, W, d_model); mask: (batch, H, W) bool or None. Returns (batch, H, W, d_model)."""
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, H, W, d_model={self.d_model}), got {tuple(x.shape)}")
        batch, H, W, _ = x.shape
        if mask is not None and mask.shape != (batch, H, W):
            raise ValueError(f"mask must be (batch, H, W) = {(batch, H, W)}, got {tuple(mask.shape)}")
        xs, z = in_projection(self.in_proj, x.reshape(batch, H * W, self.d_model)).chunk(2, dim=1)
        out = self.out_proj(self.core(xs, z, H, W, mask).transpose(1, 2))
        if mask is not None:
            out = out * mask.to(out.dtype).reshape(batch, H * W, 1)
        return out.reshape(batch, H, W, self.d_model)


class Mamba2DBlock(nn.Module):
    """Pre-norm residual block: x + Mamba2D(norm(x)), with RMSNorm (``norm="rms"``, as 2DMamba)
    or LayerNorm (``"layer"``, as MambaMIL). Shapes as :class:`Mamba2D`.

    Masked cells keep their input unchanged (the mixer's output there is 0).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, norm: Literal["rms", "layer"] = "rms",
                 **mixer_kwargs) -> None:
        super().__init__()
        if norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {norm!r}")
        self.norm = RMSNorm(d_model, eps=eps) if norm == "rms" else nn.LayerNorm(d_model, eps=eps)
        self.mixer = Mamba2D(d_model, **mixer_kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), mask)
