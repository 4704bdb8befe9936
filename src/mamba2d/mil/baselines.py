"""MIL baselines with 2DMambaMIL's interface: ``forward(features, coords, patch_size) -> MILOutput``.

Models that do not use the grid accept coords and patch_size and ignore them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from mamba2d.mil.common import MILOutput, check_bag, float32_head, heads_output
from mamba2d.nn import Mamba2DBlock, SRMambaBlock

Task = Literal["classification", "survival"]


class _Embed(nn.Sequential):
    """Linear(in_dim, d_model) + GELU + Dropout, the input projection all models share."""

    def __init__(self, in_dim: int, d_model: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))


class _PooledMIL(nn.Module):
    """Embedding and linear head around a fixed pooling (mean or max) of the patches."""

    def __init__(self, in_dim: int, n_classes: int, task: Task = "classification", d_model: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.task = in_dim, task
        self.embed = _Embed(in_dim, d_model, dropout)
        self.head = nn.Linear(d_model, n_classes)

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, d) -> slide embedding (d,) and per-patch weights (N,)."""
        raise NotImplementedError

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        emb, weights = self.pool(self.embed(features))
        return heads_output(self.head(emb), self.task, weights, emb if return_embedding else None)


class MeanMIL(_PooledMIL):
    """Mean of the embedded patches, then a linear head. Attention is uniform."""

    def pool(self, h):
        return h.mean(dim=0), torch.full((h.shape[0],), 1.0 / h.shape[0], device=h.device, dtype=h.dtype)


class MaxMIL(_PooledMIL):
    """Per-channel max over the embedded patches, then a linear head.

    Attention: each patch's share of the channels where it is the maximum.
    """

    def pool(self, h):
        emb, arg = h.max(dim=0)
        return emb, torch.bincount(arg, minlength=h.shape[0]).to(h.dtype) / h.shape[1]


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al. 2018): w^T (tanh(V h) * sigmoid(U h)). (N, d) -> (N,)."""

    def __init__(self, d_model: int, d_attn: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(d_model, d_attn), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(d_model, d_attn), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(d_attn, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.V(h) * self.U(h)).squeeze(-1)


class ABMIL(nn.Module):
    """Attention-based MIL with gated attention (Ilse, Tomczak and Welling, ICML 2018)."""

    def __init__(self, in_dim: int, n_classes: int, task: Task = "classification", d_model: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.task = in_dim, task
        self.embed = _Embed(in_dim, d_model, dropout)
        self.attention = GatedAttention(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features)
        weights = self.attention(h).softmax(dim=0)
        emb = weights @ h
        return heads_output(self.head(emb), self.task, weights, emb if return_embedding else None)


class MambaMIL(nn.Module):
    """MambaMIL (Yang et al., MICCAI 2024): Linear(in_dim, 512) + GELU + Dropout, ``n_layers``
    LayerNorm pre-norm residual Mamba layers (d_state 16, conv 4, expand 2) over the patch
    sequence in its input order, LayerNorm, attention pooling Linear-Tanh-Linear, linear head (the
    head in float32 even under autocast).

    ``variant="sr"`` (default, the paper's main model) uses sequence-reordering Mamba layers
    (:class:`~mamba2d.nn.SRMamba`, stride ``rate`` = 10); ``"plain"`` uses one causal scan per
    layer. Every scan runs on a one-row grid, which on CUDA is the chunked 1D kernel.
    """

    def __init__(self, in_dim: int, n_classes: int, task: Task = "classification", d_model: int = 512,
                 n_layers: int = 2, d_state: int = 16, dropout: float = 0.25,
                 variant: Literal["sr", "plain"] = "sr", rate: int = 10, backend: str = "auto") -> None:
        super().__init__()
        if variant not in ("sr", "plain"):
            raise ValueError(f"variant must be 'sr' or 'plain', got {variant!r}")
        self.in_dim, self.task, self.variant = in_dim, task, variant
        self.embed = _Embed(in_dim, d_model, dropout)
        rank = math.ceil(d_model / 16)
        if variant == "sr":
            self.layers = nn.ModuleList(
                SRMambaBlock(d_model, rate=rate, d_state=d_state, dt_rank=rank, backend=backend)
                for _ in range(n_layers))
        else:
            self.layers = nn.ModuleList(
                Mamba2DBlock(d_model, norm="layer", d_state=d_state, dt_rank=rank, conv="1d", backend=backend)
                for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.Sequential(nn.Linear(d_model, 128), nn.Tanh(), nn.Linear(128, 1))
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features)[None]  # (1, N, d_model)
        for layer in self.layers:
            # Plain layers take a one-row grid (1, 1, N, d); SR layers take the sequence (1, N, d).
            h = layer(h) if self.variant == "sr" else layer(h[:, None])[:, 0]
        with float32_head(h):
            h = self.norm(h[0].to(self.norm.weight.dtype))
            weights = self.attention(h).squeeze(-1).softmax(dim=0)
            emb = weights @ h
            logits = self.head(emb)
        return heads_output(logits, self.task, weights, emb if return_embedding else None)


class DSMIL(nn.Module):
    """Dual-stream MIL (Li, Li and Eliceiri, CVPR 2021).

    Stream 1: an instance classifier scores every patch; per class, the top-scoring ("critical")
    patch is kept. Stream 2: every patch is attended against each critical patch,
    softmax(<q(h_i), q(h_crit)> / sqrt(d_q)) over patches, and the attended bag (n_classes, d) is
    classified by a 1D convolution over its features. ``logits`` is the mean of the two streams'
    scores (the paper's prediction); ``attention`` is stream 2's weight averaged over classes.
    """

    def __init__(self, in_dim: int, n_classes: int, task: Task = "classification", d_model: int = 128,
                 dropout: float = 0.25, d_query: int = 128) -> None:
        super().__init__()
        self.in_dim, self.task, self.d_query = in_dim, task, d_query
        self.embed = _Embed(in_dim, d_model, dropout)
        self.instance_head = nn.Linear(d_model, n_classes)
        self.query = nn.Sequential(nn.Linear(d_model, d_query), nn.Tanh())
        self.bag_head = nn.Conv1d(n_classes, n_classes, kernel_size=d_model)

    def forward(self, features, coords=None, patch_size=None, return_embedding=False) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features)  # (N, d)
        scores = self.instance_head(h)  # (N, C)
        critical = h[scores.argmax(dim=0)]  # (C, d)
        q = self.query(h)
        weights = (q @ self.query(critical).t() / self.d_query**0.5).softmax(dim=0)  # (N, C)
        bag = weights.t() @ h  # (C, d)
        bag_logits = self.bag_head(bag[None]).reshape(-1)  # (C,)
        logits = 0.5 * (scores.max(dim=0).values + bag_logits)
        emb = bag.mean(dim=0)
        return heads_output(logits, self.task, weights.mean(dim=1), emb if return_embedding else None)


class CLAMSB(nn.Module):
    """CLAM, single attention branch (Lu et al., Nature Biomedical Engineering 2021).

    Patches go through Linear(in_dim, d_model) + ReLU + Dropout, gated attention pooling and a
    linear head. With the slide's class ``label`` (classification only), the model also returns
    its instance-level clustering loss as ``aux_loss``: the ``k_sample`` most and least attended
    patches are pseudo-labelled in-class and out-of-class for the true class's instance
    classifier, and (``subtyping=True``) the most attended ones as out-of-class for every other
    class. The paper weights it as 0.7 * task loss + 0.3 * aux_loss.
    """

    def __init__(self, in_dim: int, n_classes: int, task: Task = "classification", d_model: int = 512,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False) -> None:
        super().__init__()
        self.in_dim, self.task, self.k_sample, self.subtyping = in_dim, task, k_sample, subtyping
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(d_model, d_attn=d_model // 2, dropout=dropout)
        self.head = nn.Linear(d_model, n_classes)
        self.instance_heads = nn.ModuleList(nn.Linear(d_model, 2) for _ in range(n_classes))

    def forward(self, features, coords=None, patch_size=None, return_embedding=False,
                label: int | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features)
        weights = self.attention(h).softmax(dim=0)
        emb = weights @ h
        out = heads_output(self.head(emb), self.task, weights, emb if return_embedding else None)
        if label is not None and self.task == "classification":
            out.aux_loss = self._instance_loss(h, weights, int(label))
        return out

    def _instance_loss(self, h: torch.Tensor, weights: torch.Tensor, label: int) -> torch.Tensor:
        k = min(self.k_sample, h.shape[0] // 2) or 1
        order = weights.argsort(descending=True)
        top, bottom = h[order[:k]], h[order[-k:]]
        ce = nn.functional.cross_entropy
        ones, zeros = h.new_ones(k, dtype=torch.long), h.new_zeros(k, dtype=torch.long)
        true_head = self.instance_heads[label]
        loss = ce(true_head(torch.cat([top, bottom])), torch.cat([ones, zeros]))
        terms = 1
        if self.subtyping:
            for c, head in enumerate(self.instance_heads):
                if c != label:
                    loss = loss + ce(head(top), zeros)
                    terms += 1
        return loss / terms
