"""Patch coordinates to a tight 2D grid: the layout 2DMambaMIL scans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class PatchGrid:
    """Where each patch sits on its slide's tight grid.

    ``rows``, ``cols``: (N,) int64 grid indices of the patches, in input order.
    ``height``, ``width``: the grid's size in cells (the bounding box of the patches).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    height: int
    width: int

    @property
    def flat(self) -> torch.Tensor:
        """(N,) row-major cell index of each patch: ``row * width + col``."""
        return self.rows * self.width + self.cols


def patch_grid(coords: torch.Tensor, patch_size: float, snap: Literal["error", "round"] = "error",
               name: str = "coords") -> PatchGrid:
    """Place patches on a grid from their level-0 (x, y) pixel coordinates.

    ``coords``: (N, 2) with x (column direction) first, as CLAM and TRIDENT write them.
    ``patch_size``: the patch's side at level 0, in pixels. The grid is tight: the smallest
    coordinate becomes cell 0 on each axis.
    ``snap``: coordinates off the patch lattice are an error (``"error"``), or are rounded to
    the nearest lattice cell (``"round"``). Two patches on one cell are always an error.
    ``name`` names the input in error messages (e.g. the file it came from).
    """
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 2:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise ValueError(f"{name} must be an (N, 2) tensor of (x, y) pixel coordinates, got {shape}")
    if coords.shape[0] == 0:
        raise ValueError(f"{name} is empty: a slide needs at least one patch")
    if not (isinstance(patch_size, (int, float)) and patch_size > 0 and patch_size == patch_size):
        raise ValueError(f"patch_size must be a positive number of level-0 pixels, got {patch_size!r}")
    if snap not in ("error", "round"):
        raise ValueError(f"snap must be 'error' or 'round', got {snap!r}")
    xy = coords.detach().to(torch.float64)
    if not torch.isfinite(xy).all():
        bad = int((~torch.isfinite(xy).all(dim=1)).nonzero()[0])
        raise ValueError(f"{name} has a non-finite coordinate at patch {bad}: {coords[bad].tolist()}")
    steps = (xy - xy.min(dim=0).values) / float(patch_size)
    cells = steps.round()
    off = (steps - cells).abs() > 1e-6
    if snap == "error" and off.any():
        bad = int(off.any(dim=1).nonzero()[0])
        raise ValueError(
            f"{name}: patch {bad} at {coords[bad].tolist()} is not on the {patch_size}-pixel lattice of "
            f"the other patches; check the patch size, or pass snap='round'")
    cells = cells.to(torch.int64)
    cols, rows = cells[:, 0], cells[:, 1]
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    flat = rows * width + cols
    uniq, counts = torch.unique(flat, return_counts=True)
    if (counts > 1).any():
        cell = int(uniq[counts > 1][0])
        first = (flat == cell).nonzero().flatten()[:2].tolist()
        raise ValueError(
            f"{name}: {int((counts > 1).sum())} grid cell(s) hold more than one patch; patches {first} "
            f"both fall on row {cell // width}, column {cell % width}")
    return PatchGrid(rows.to(coords.device), cols.to(coords.device), height, width)
