"""2DMambaMIL and the multiple-instance learning baselines it is compared with."""

from mamba2d.mil.mamba2dmil import MILOutput, TwoDMambaMIL

__all__ = ["MILOutput", "TwoDMambaMIL"]
