"""2DMambaMIL and the multiple-instance learning baselines it is compared with, and the patch grid
(level-0 coordinates to the tight 2D grid) that 2DMambaMIL scans."""

from mamba2d.mil.baselines import ABMIL, CLAMSB, DSMIL, MambaMIL, MaxMIL, MeanMIL
from mamba2d.mil.common import MILOutput
from mamba2d.mil.dtfd import DTFDMIL
from mamba2d.mil.grid import PatchGrid, patch_grid
from mamba2d.mil.mamba2dmil import TwoDMambaMIL
from mamba2d.mil.registry import MODELS, build_model, count_parameters
from mamba2d.mil.s4mil import S4MIL
from mamba2d.mil.transmil import TransMIL

__all__ = [
    "ABMIL", "CLAMSB", "DSMIL", "DTFDMIL", "MODELS", "MILOutput", "MambaMIL", "MaxMIL", "MeanMIL",
    "PatchGrid", "S4MIL", "TransMIL", "TwoDMambaMIL", "build_model", "count_parameters", "patch_grid",
]
