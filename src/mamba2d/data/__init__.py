"""Feature bags, label and split CSVs, grid building, benchmark datasets."""

from mamba2d.data.grid import PatchGrid, patch_grid

__all__ = ["PatchGrid", "patch_grid"]
