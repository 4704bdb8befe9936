"""2DMamba: 2D selective state-space scans for whole-slide images and vision."""

from mamba2d.nn import Mamba2D, Mamba2DBlock
from mamba2d.ops import ScanLayout, selective_scan_2d

__version__ = "0.1.0"

__all__ = ["Mamba2D", "Mamba2DBlock", "ScanLayout", "__version__", "selective_scan_2d"]
