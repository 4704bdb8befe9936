"""The 2D selective scan: a float64 reference, a PyTorch path, fused Triton kernels, dispatch;
and the 1D selective scan (a chunked Triton kernel on CUDA, the 2D operator on one row elsewhere)."""

from mamba2d.ops.api import BACKENDS, selective_scan_2d
from mamba2d.ops.layout import ScanLayout
from mamba2d.ops.scan1d import selective_scan_1d

__all__ = ["BACKENDS", "ScanLayout", "selective_scan_1d", "selective_scan_2d"]
