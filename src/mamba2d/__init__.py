"""2DMamba: 2D selective state-space scans for whole-slide images and vision."""

from mamba2d.data import PatchGrid, patch_grid
from mamba2d.mil import MILOutput, TwoDMambaMIL, build_model
from mamba2d.nn import Mamba2D, Mamba2DBlock, SRMamba
from mamba2d.ops import ScanLayout, selective_scan_2d
from mamba2d.train import nll_survival_loss
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

__version__ = "0.1.0"

__all__ = [
    "EfficientNetLite0Encoder", "MILOutput", "Mamba2D", "Mamba2DBlock", "PatchGrid", "SRMamba", "ScanLayout",
    "TwoDMambaMIL", "__version__",
    "build_model", "nll_survival_loss", "patch_grid", "selective_scan_2d",
]
