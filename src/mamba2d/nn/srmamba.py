"""Sequence-reordering Mamba (SR-Mamba, from MambaMIL) over 1D token sequences.

Shapes: input and output are (batch, L, d_model). Both branches run the scan on a one-row grid,
which on CUDA is the chunked 1D kernel (``mamba2d.ops.scan1d_triton``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from mamba2d.nn.mamba2d import SSMCore, in_projection


def stride_order(length: int, rate: int) -> torch.Tensor:
    """Visiting order of SR-Mamba's reordered branch, as indices into the sequence padded to a
    multiple of ``rate``: 0, rate, 2 * rate, ..., then 1, rate + 1, ... Indices >= ``length`` are
    padding. This is the column-major walk over the sequence laid out as rows of ``rate`` tokens,
    so tokens ``rate`` apart in the input become neighbours. Returns int64 (ceil(L / rate) * rate,).
    """
    rows = math.ceil(length / rate)
    return torch.arange(rows * rate).reshape(rows, rate).t().reshape(-1)


class SRMamba(nn.Module):
    """Mamba layer with a second, reordered branch (Yang et al., MambaMIL, MICCAI 2024).

    One in_proj gives x and z. Branch 1 is a causal Mamba scan over the sequence as given. Branch
    2 has its own conv, x_proj, dt_proj, A and D and scans the tokens in :func:`stride_order`
    (stride ``rate``, default 10 as in MambaMIL); its outputs are put back in input order. The
    gated outputs of both branches are summed and go through one out_proj.

    Unlike the reference implementation, which feeds zero tokens through the scan where the
    sequence is padded to a multiple of ``rate``, padding cells here are masked (transparent): they
    neither add to the state nor decay it, so the result does not depend on how much padding the
    length needs.
    """

    def __init__(self, d_model: int, rate: int = 10, d_state: int = 16, expand: int = 2,
                 dt_rank: int | Literal["auto"] = "auto", d_conv: int = 4, bias: bool = False,
                 conv_bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if rate < 1:
            raise ValueError(f"rate must be >= 1, got {rate}")
        self.d_model, self.rate = d_model, rate
        self.d_inner = expand * d_model
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        core = dict(d_inner=self.d_inner, d_state=d_state, dt_rank=rank, conv="1d", d_conv=d_conv,
                    conv_bias=conv_bias, backend=backend)
        self.core = SSMCore(**core)
        self.reordered_core = SSMCore(**core)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, L, d_model). Returns (batch, L, d_model)."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, L, d_model={self.d_model}), got {tuple(x.shape)}")
        batch, L, _ = x.shape
        xs, z = in_projection(self.in_proj, x).chunk(2, dim=1)  # (batch, d_inner, L)
        y = self.core(xs, z, 1, L)  # (batch, d_inner, L)

        order = stride_order(L, self.rate).to(x.device)
        back = torch.argsort(order)[:L]  # where each input token sits in the reordered sequence
        padded = order.numel()
        mask = None
        if padded > L:
            # Padding cells are masked (transparent), so any token can stand in for them: the
            # last one, which saves padding copies of xs and z.
            mask = (order < L).reshape(1, 1, padded).expand(batch, 1, padded)
            order = order.clamp(max=L - 1)
        y_r = self.reordered_core(xs.index_select(2, order), z.index_select(2, order), 1, padded, mask)
        return self.out_proj((y + y_r.index_select(2, back)).transpose(1, 2))


class SRMambaBlock(nn.Module):
    """Pre-norm residual block x + SRMamba(LayerNorm(x)), as in MambaMIL. Shapes as :class:`SRMamba`."""

    def __init__(self, d_model: int, eps: float = 1e-5, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.mixer = SRMamba(d_model, **mixer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))
