"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation over pseudo-bags."""

from __future__ import annotations

import torch
from torch import nn

from mamba2d.mil.baselines import GatedAttention
from mamba2d.mil.common import MILOutput, check_bag, heads_output


class DTFDMIL(nn.Module):
    """DTFD-MIL with attention-based feature distillation (AFS, the paper's best variant).

    Tier 1: the patches are split into ``n_groups`` pseudo-bags; each is pooled by gated attention
    and classified on its own. Tier 2: the pooled pseudo-bag features (the distilled features) are
    pooled by a second gated attention and classified: that is the slide's ``logits``.
    With the slide's class ``label`` (classification), ``aux_loss`` is the tier-1 cross-entropy
    averaged over pseudo-bags; the paper trains with tier-1 + tier-2 losses.

    Pseudo-bags: a random split in training mode, as in the paper; in eval mode a fixed split
    by raster position (patches sorted by (y, x), dealt round-robin), so predictions do not depend
    on the order the patches arrive in. ``attention`` is each patch's tier-1 weight times its
    pseudo-bag's tier-2 weight, so it sums to 1 over the slide.
    """

    def __init__(self, in_dim: int, n_classes: int, task: str = "classification", d_model: int = 512,
                 dropout: float = 0.25, n_groups: int = 4) -> None:
        super().__init__()
        self.in_dim, self.task, self.n_groups = in_dim, task, n_groups
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.attention1 = GatedAttention(d_model)
        self.head1 = nn.Linear(d_model, n_classes)
        self.attention2 = GatedAttention(d_model)
        self.head2 = nn.Linear(d_model, n_classes)

    def _groups(self, n: int, coords: torch.Tensor | None, device) -> list[torch.Tensor]:
        if self.training or coords is None:
            order = torch.randperm(n, device=device)
        else:
            # Raster order: by y, then x (two stable sorts).
            xy = coords.to(torch.float64)
            order = torch.argsort(xy[:, 0], stable=True)
            order = order[torch.argsort(xy[order, 1], stable=True)].to(device)
        groups = [order[g:: self.n_groups] for g in range(min(self.n_groups, n))]
        return [g for g in groups if g.numel() > 0]

    def forward(self, features, coords=None, patch_size=None, return_embedding=False,
                label: int | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features)
        groups = self._groups(h.shape[0], coords, h.device)
        pooled, weights1, logits1 = [], [], []
        for idx in groups:
            w = self.attention1(h[idx]).softmax(dim=0)
            f = w @ h[idx]
            pooled.append(f)
            weights1.append(w)
            logits1.append(self.head1(f))
        pooled_t = torch.stack(pooled)  # (groups, d)
        w2 = self.attention2(pooled_t).softmax(dim=0)
        emb = w2 @ pooled_t
        # float32 whatever the autocast dtype: the weights are a result users plot, not an activation.
        attention = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for g, idx in enumerate(groups):
            attention[idx] = (weights1[g] * w2[g]).float()
        out = heads_output(self.head2(emb), self.task, attention, emb if return_embedding else None)
        if label is not None and self.task == "classification":
            target = torch.full((len(groups),), int(label), dtype=torch.long, device=h.device)
            out.aux_loss = nn.functional.cross_entropy(torch.stack(logits1), target)
        return out
