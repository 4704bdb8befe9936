"""2DMamba: 2D selective state-space scans for whole-slide images and vision."""

from mamba2d.ops import ScanLayout, selective_scan_2d

__version__ = "0.1.0"

__all__ = ["ScanLayout", "__version__", "selective_scan_2d"]
