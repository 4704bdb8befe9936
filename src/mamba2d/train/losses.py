"""Losses: the discrete-time negative log-likelihood survival loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, censorship: torch.Tensor,
                      alpha: float = 0.0) -> torch.Tensor:
    """Negative log-likelihood of discrete-time survival, as in Patch-GCN and MCAT.

    ``logits``: (batch, n_bins) hazard logits; hazard h_k = sigmoid(logit_k) is the probability of
    the event in bin k given survival to it, and S_k = prod_{j<=k} (1 - h_j).
    ``bins``: (batch,) int64 index of the bin holding each patient's time.
    ``censorship``: (batch,) 1 if censored (alive at last follow-up), 0 if the event was observed.

    An observed event in bin y costs -log S_{y-1} - log h_y (S_{-1} = 1); a censored time costs
    -log S_y. ``alpha`` adds weight to the observed events:
    loss = mean((1 - alpha) * (censored + uncensored) + alpha * uncensored).
    Computed from the logits with log-sigmoids, so it stays finite for saturated hazards.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, n_bins), got {tuple(logits.shape)}")
    batch, n_bins = logits.shape
    bins = bins.reshape(-1).long()
    c = censorship.reshape(-1).to(logits.dtype)
    if bins.shape[0] != batch or c.shape[0] != batch:
        raise ValueError(f"bins and censorship need {batch} entries, got {bins.shape[0]} and {c.shape[0]}")
    if bins.min() < 0 or bins.max() >= n_bins:
        lo, hi = bins.min().item(), bins.max().item()
        raise ValueError(f"bins must lie in [0, {n_bins - 1}], got values {lo}..{hi}")
    log_h = F.logsigmoid(logits)
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # log S_k
    log_s_before = torch.cat([log_s.new_zeros(batch, 1), log_s[:, :-1]], dim=1)  # log S_{k-1}
    idx = bins[:, None]
    uncensored = -(1 - c) * (log_s_before.gather(1, idx) + log_h.gather(1, idx)).squeeze(1)
    censored = -c * log_s.gather(1, idx).squeeze(1)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()
