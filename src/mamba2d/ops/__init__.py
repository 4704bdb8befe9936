"""The 2D selective scan: a float64 reference, a PyTorch path, fused Triton kernels, dispatch."""

from mamba2d.ops.api import BACKENDS, selective_scan_2d
from mamba2d.ops.layout import ScanLayout

__all__ = ["BACKENDS", "ScanLayout", "selective_scan_2d"]
