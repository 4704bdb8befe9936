"""S4MIL (Fillioux et al., MICCAI 2023): an S4D layer over the patch sequence, then max pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba2d.mil.common import MILOutput, check_bag, heads_output


class S4DLayer(nn.Module):
    """Diagonal structured state space layer (S4D; Gu et al., NeurIPS 2022). (L, d) -> (L, d).

    Per channel, a diagonal complex SSM of ``d_state // 2`` conjugate pairs, initialised S4D-Lin
    (A = -1/2 + i*pi*n), discretised by zero-order hold with a learned step dt (log-uniform in
    [dt_min, dt_max]). Its length-L convolution kernel K[l] = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n
    * exp(dt A_n l)) is applied by FFT (zero-padded to 2L, so the convolution is causal, not
    circular); then a D skip, GELU, dropout, and a pointwise GLU projection.
    """

    def __init__(self, d_model: int, d_state: int = 32, dropout: float = 0.0, dt_min: float = 1e-3,
                 dt_max: float = 1e-1) -> None:
        super().__init__()
        half = d_state // 2
        lo, hi = math.log(dt_min), math.log(dt_max)
        self.log_dt = nn.Parameter(torch.rand(d_model) * (hi - lo) + lo)
        self.log_A_real = nn.Parameter(torch.full((d_model, half), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(half, dtype=torch.float32).repeat(d_model, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(d_model, half, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d_model, 2 * d_model)

    def kernel(self, length: int) -> torch.Tensor:
        """(d_model, length) real convolution kernel."""
        dt = self.log_dt.exp()[:, None]
        A = torch.complex(-self.log_A_real.exp(), self.A_imag)  # (d, half)
        dtA = A * dt
        C = torch.view_as_complex(self.C) * (torch.exp(dtA) - 1) / A
        steps = torch.arange(length, device=A.device, dtype=torch.float32)
        return 2 * torch.einsum("dn,dnl->dl", C, torch.exp(dtA[..., None] * steps)).real

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        length = u.shape[0]
        x = u.t().float()  # (d, L)
        k = self.kernel(length)
        y = torch.fft.irfft(torch.fft.rfft(x, n=2 * length) * torch.fft.rfft(k, n=2 * length), n=2 * length)
        y = y[:, :length] + x * self.D[:, None]
        y = self.dropout(F.gelu(y)).t().to(u.dtype)
        return F.glu(self.output(y), dim=-1)


class S4MIL(nn.Module):
    """S4MIL: Linear(in_dim, d_model) + GELU + Dropout, LayerNorm, one S4D layer over the patch
    sequence in input order, per-channel max pooling, linear head (the configuration of the
    MambaMIL and 2DMamba comparisons: d_model 512, d_state 32).

    ``attention``: each patch's share of the channels where it is the maximum.
    """

    def __init__(self, in_dim: int, n_classes: int, task: str = "classification", d_model: int = 512,
                 d_state: int = 32, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.task = in_dim, task
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_model)
        self.s4 = S4DLayer(d_model, d_state)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.s4(self.norm(self.embed(features)))
        emb, arg = h.max(dim=0)
        weights = torch.bincount(arg, minlength=h.shape[0]).to(h.dtype) / h.shape[1]
        return heads_output(self.head(emb), self.task, weights, emb if return_embedding else None)
