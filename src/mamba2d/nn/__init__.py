"""Layers built on the 2D scan: the Mamba2D mixer, its pre-norm residual block, the shared SSM
core, and MambaMIL's sequence-reordering Mamba."""

from mamba2d.nn.mamba2d import Mamba2D, Mamba2DBlock, SSMCore
from mamba2d.nn.srmamba import SRMamba, SRMambaBlock, stride_order

__all__ = ["Mamba2D", "Mamba2DBlock", "SRMamba", "SRMambaBlock", "SSMCore", "stride_order"]
