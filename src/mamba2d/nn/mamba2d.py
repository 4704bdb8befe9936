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


class Mamba2D(nn.Module):
    """Mamba block with a 2D selective scan (2DMamba), for (batch, H, W, d_model) grids.

    Steps: in_proj to x and z (2 * d_inner); a short depthwise convolution on x (``conv="1d"``:
    kernel ``d_conv``, causal along the row-major raster, as in the paper; ``conv="2d"``: 3 x 3 on
    the grid); SiLU; x_proj to (Δ rank, B, C); dt_proj; the 2D scan with the z gate and D skip;
    out_proj.

    ``directions``: 1 scans from the top-left origin (the paper's); 2 adds the bottom-right
    origin; 4 uses all four corners. All directions share the layer's parameters; their outputs
    are summed (``merge="sum"``) or averaged (``"mean"``).

    Masked cells (mask False) are transparent: their Δ is 0, so they add nothing to the state and
    do not decay it, their conv input is 0, and their output is 0. Grids of different sizes can
    then share a padded batch. With ``conv="2d"`` a grid's outputs do not depend on the padding;
    with ``conv="1d"`` they do when the padding widens the rows, because the raster order wraps at
    the padded width.

    Initialisation follows Mamba: A = -[1..d_state] stored as A_log, D = 1, and dt_proj's bias is
    the inverse softplus of dt drawn log-uniformly in [dt_min, dt_max].
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
        if conv not in ("1d", "2d"):
            raise ValueError(f"conv must be '1d' or '2d', got {conv!r}")
        if directions not in (1, 2, 4):
            raise ValueError(f"directions must be 1, 2 or 4, got {directions!r}")
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.conv, self.directions, self.merge, self.backend = conv, directions, merge, backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        if conv == "1d":
            self.conv_layer = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                        padding=d_conv - 1, bias=conv_bias)
        else:
            self.conv_layer = nn.Conv2d(self.d_inner, self.d_inner, 3, groups=self.d_inner, padding=1,
                                        bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        states = torch.arange(1, d_state + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(states).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self._init_dt(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, H, W, d_model); mask: (batch, H, W) bool or None. Returns (batch, H, W, d_model)."""
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, H, W, d_model={self.d_model}), got {tuple(x.shape)}")
        batch, H, W, _ = x.shape
        L = H * W
        if mask is not None:
            if mask.shape != (batch, H, W):
                raise ValueError(f"mask must be (batch, H, W) = {(batch, H, W)}, got {tuple(mask.shape)}")
            keep = mask.to(x.dtype).reshape(batch, L, 1)
        xz = self.in_proj(x.reshape(batch, L, self.d_model))
        xs, z = xz.chunk(2, dim=-1)  # (batch, L, d_inner) each
        if mask is not None:
            xs = xs * keep
        xs = self._conv(xs, batch, H, W)
        if mask is not None:
            xs = xs * keep
        xs = F.silu(xs)
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (batch, d_inner, L); bias goes in the scan
        if mask is not None:
            delta = delta.masked_fill(~mask.reshape(batch, 1, L), _MASKED_DELTA)
        u = xs.transpose(1, 2)
        zt = z.transpose(1, 2)
        Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)  # (batch, d_state, L)
        A = -torch.exp(self.A_log.float())
        y = None
        for flip_h, flip_v in _ORIGINS[: self.directions]:
            yk = selective_scan_2d(u, delta, A, Bt, Ct, self.D.float(), zt, self.dt_proj.bias.float(), True,
                                   height=H, width=W, flip_h=flip_h, flip_v=flip_v, backend=self.backend)
            y = yk if y is None else y + yk
        if self.merge == "mean" and self.directions > 1:
            y = y / self.directions
        out = self.out_proj(y.transpose(1, 2))
        if mask is not None:
            out = out * keep
        return out.reshape(batch, H, W, self.d_model)

    def _conv(self, xs: torch.Tensor, batch: int, H: int, W: int) -> torch.Tensor:
        """Depthwise convolution of (batch, L, d_inner), causal along the raster or 3 x 3 on the grid."""
        if self.conv == "1d":
            L = H * W
            return self.conv_layer(xs.transpose(1, 2))[..., :L].transpose(1, 2)
        grid = xs.reshape(batch, H, W, self.d_inner).permute(0, 3, 1, 2)
        return self.conv_layer(grid).permute(0, 2, 3, 1).reshape(batch, H * W, self.d_inner)


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
        self.norm = nn.RMSNorm(d_model, eps=eps) if norm == "rms" else nn.LayerNorm(d_model, eps=eps)
        self.mixer = Mamba2D(d_model, **mixer_kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), mask)
