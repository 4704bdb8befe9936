"""What every MIL model returns, and the input checks they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class MILOutput:
    """What a MIL model returns for one slide.

    ``logits``: (n_outputs,). Classification: ``probs`` = softmax(logits). Survival (discrete
    time, n_bins outputs): ``hazards`` = sigmoid(logits), ``survival`` = cumprod(1 - hazards),
    ``risk`` = -sum(survival) (higher means shorter survival).
    ``attention``: (N,) pooling weight of each input patch, in input order (pads excluded).
    ``embedding``: (d_model,) pooled slide embedding, when asked for.
    ``aux_loss``: a model's own auxiliary loss (CLAM's instance clustering), when it has one and
    was given the slide's label; training adds it to the task loss.
    """

    logits: torch.Tensor
    attention: torch.Tensor
    probs: torch.Tensor | None = None
    hazards: torch.Tensor | None = None
    survival: torch.Tensor | None = None
    risk: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def heads_output(logits: torch.Tensor, task: str, attention: torch.Tensor,
                 embedding: torch.Tensor | None) -> MILOutput:
    """Fill a :class:`MILOutput` from head logits for ``task`` ("classification" or "survival").

    Outputs are float32 even under bf16/fp16 autocast: probabilities, survival curves and attention
    maps are results that losses, metrics and heatmaps read, and low precision would round them.
    """
    logits, attention = logits.float(), attention.float()
    if embedding is not None:
        embedding = embedding.float()
    if task == "classification":
        return MILOutput(logits, attention, probs=logits.softmax(-1), embedding=embedding)
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1 - hazards, dim=-1)
    return MILOutput(logits, attention, hazards=hazards, survival=survival, risk=-survival.sum(-1),
                     embedding=embedding)


def check_bag(features: torch.Tensor, coords: torch.Tensor | None, in_dim: int) -> None:
    """Raise a ValueError naming the problem with one slide's (N, in_dim) features and (N, 2) coords."""
    if features.dim() != 2 or features.shape[1] != in_dim:
        raise ValueError(f"features must be (N, in_dim={in_dim}), got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features is empty: a slide needs at least one patch")
    if coords is not None and coords.shape[0] != features.shape[0]:
        raise ValueError(f"coords has {coords.shape[0]} rows but features has {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")


def float32_head(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for a model's pooling head on ``x``'s device.

    The heads (norm, attention MLP, softmax, weighted sum, classifier) are small; in float32 they
    need none of the dozen weight and activation casts autocast would add per step, which on
    small bags cost more time than their bf16 arithmetic saves (and the attention weights are a
    result users read)."""
    return torch.autocast(x.device.type, enabled=False)
