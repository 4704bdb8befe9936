"""Training and evaluation: losses (incl. NLL survival), loops, metrics, checkpoints."""

from mamba2d.train.losses import nll_survival_loss

__all__ = ["nll_survival_loss"]
