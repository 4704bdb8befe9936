"""TransMIL (Shao et al., NeurIPS 2021): Nystrom-attention transformer with a positional
encoding from convolutions (PPEG) on the patch sequence folded into a square."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba2d.mil.common import MILOutput, check_bag, heads_output


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Iterative Moore-Penrose pseudo-inverse of a batch of square matrices (..., m, m)."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).amax() * abs_x.sum(-2).amax())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (Xiong et al., AAAI 2021).

    ``landmarks`` segment means stand for the n keys and queries, so memory grows with n, not n^2.
    A depthwise convolution over the sequence adds a residual on the values. (1, n, dim) -> same.
    """

    def __init__(self, dim: int, heads: int = 8, landmarks: int | None = None, pinv_iters: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.d_head = heads, dim // heads
        self.landmarks = landmarks or dim // 2
        self.pinv_iters = pinv_iters
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        m = self.landmarks
        pad = (-n) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # zeros in front, as many as make n divisible by m
        q, k, v = self.qkv(x).reshape(b, -1, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)
        q = q * self.d_head**-0.5
        seg = q.shape[-2] // m
        q_l = q.reshape(b, self.heads, m, seg, self.d_head).mean(-2)
        k_l = k.reshape(b, self.heads, m, seg, self.d_head).mean(-2)
        a1 = (q @ k_l.transpose(-1, -2)).softmax(-1)
        a2 = (q_l @ k_l.transpose(-1, -2)).softmax(-1)
        a3 = (q_l @ k.transpose(-1, -2)).softmax(-1)
        y = (a1 @ _pinv(a2, self.pinv_iters)) @ (a3 @ v) + self.residual(v)
        y = y.transpose(1, 2).reshape(b, -1, dim)
        return self.out(y)[:, pad:]


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7x7, 5x5 and 3x3 convolutions on the square token map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """TransMIL: patch embedding, class token, Nystrom layer, PPEG, Nystrom layer, LayerNorm, head.

    The patch sequence (input order) is folded into the smallest square, the first patches
    repeated to fill it, as in the paper. TransMIL has no pooling attention of its own;
    ``attention`` reports how much the class token attends to each patch in the last layer
    (exact softmax of its query against the patches' keys, averaged over heads).
    """

    def __init__(self, in_dim: int, n_classes: int, task: str = "classification", d_model: int = 512,
                 heads: int = 8, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.task = in_dim, task
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn1, self.attn2 = NystromAttention(d_model, heads), NystromAttention(d_model, heads)
        self.ppeg = PPEG(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        n = features.shape[0]
        h = self.embed(features)[None]  # (1, n, d)
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1) if side * side > n else h
        while h.shape[1] < side * side:  # fewer patches than the padding needs: repeat again
            h = torch.cat([h, h[:, : side * side - h.shape[1]]], dim=1)
        x = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        x = x + self.attn1(self.norm1(x))
        x = self.ppeg(x, side)
        x_in = self.norm2(x)
        x = x + self.attn2(x_in)
        emb = self.norm(x)[0, 0]
        attention = self._cls_attention(x_in)[:n]
        attention = attention / attention.sum()
        return heads_output(self.head(emb), self.task, attention, emb if return_embedding else None)

    def _cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.attn2
        q, k, _ = layer.qkv(x).reshape(1, -1, 3, layer.heads, layer.d_head).permute(2, 0, 3, 1, 4)
        scores = (q[:, :, :1] * layer.d_head**-0.5) @ k[:, :, 1:].transpose(-1, -2)  # (1, heads, 1, n)
        return scores.softmax(-1).mean(dim=1)[0, 0]
