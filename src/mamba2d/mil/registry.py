"""One name per MIL model: ``build_model("abmil", in_dim=1024, n_classes=2)``."""

from __future__ import annotations

from torch import nn

from mamba2d.mil.baselines import ABMIL, CLAMSB, DSMIL, MambaMIL, MaxMIL, MeanMIL
from mamba2d.mil.dtfd import DTFDMIL
from mamba2d.mil.mamba2dmil import TwoDMambaMIL
from mamba2d.mil.s4mil import S4MIL
from mamba2d.mil.transmil import TransMIL

MODELS: dict[str, type[nn.Module]] = {
    "2dmambamil": TwoDMambaMIL,
    "mambamil": MambaMIL,
    "abmil": ABMIL,
    "clam_sb": CLAMSB,
    "dsmil": DSMIL,
    "dtfd": DTFDMIL,
    "s4mil": S4MIL,
    "transmil": TransMIL,
    "meanmil": MeanMIL,
    "maxmil": MaxMIL,
}


def build_model(name: str, in_dim: int, n_classes: int, task: str = "classification", **kwargs) -> nn.Module:
    """Build the MIL model registered as ``name`` (see ``MODELS``); extra kwargs go to its class."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](in_dim, n_classes, task=task, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
