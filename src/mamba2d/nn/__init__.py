"""Layers built on the 2D scan: the Mamba2D mixer and its pre-norm residual block."""

from mamba2d.nn.mamba2d import Mamba2D, Mamba2DBlock

__all__ = ["Mamba2D", "Mamba2DBlock"]
