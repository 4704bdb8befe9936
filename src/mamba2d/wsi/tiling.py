"""Patches on a regular level-0 lattice at a target magnification, kept where there is tissue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mamba2d.wsi.slides import Slide, SlideError

__all__ = ["TilePlan", "plan_tiles"]


@dataclass(frozen=True)
class TilePlan:
    """Where one slide's patches are and how to read them.

    ``coords``: (N, 2) int64 level-0 (x, y) of each patch's top-left corner, multiples of
    ``patch_size_level0`` (so patch (i, j) is grid cell (row y / ps0, column x / ps0), exactly).
    ``tissue_fraction``: (N,) share of each patch covered by the tissue mask. Patches are read at
    pyramid level ``read_level`` as ``read_size`` pixels square, then resized to ``patch_size``.
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    patch_size: int
    patch_size_level0: int
    level0_magnification: float
    target_magnification: float
    read_level: int
    read_size: int


def plan_tiles(slide: Slide, mask: np.ndarray, mask_downsample: float, magnification: float,
               patch_size: int, min_tissue: float = 0.5) -> TilePlan:
    """Tile ``slide`` into non-overlapping ``patch_size`` patches at ``magnification``.

    ``mask``: (h, w) bool tissue mask of the slide at ``mask_downsample`` level-0 pixels per mask
    pixel. A patch is kept when at least ``min_tissue`` of its area is tissue. Only whole patches
    inside the slide are made.
    """
    if patch_size < 8:
        raise ValueError(f"patch_size must be at least 8 pixels, got {patch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    base = slide.magnification()
    if magnification <= 0 or magnification > base * 1.01:
        raise SlideError(f"{slide.path}: target magnification {magnification:g}x must be positive and at "
                         f"most the slide's {base:g}x")
    ps0 = int(round(patch_size * base / magnification))
    w0, h0 = slide.dimensions
    nx, ny = w0 // ps0, h0 // ps0
    xs, ys = np.meshgrid(np.arange(nx, dtype=np.int64) * ps0, np.arange(ny, dtype=np.int64) * ps0)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # raster order: row by row
    fraction = _coverage(mask, mask_downsample, coords, ps0)
    keep = fraction >= min_tissue if min_tissue > 0 else fraction > 0
    level = slide.best_level_for_downsample(base / magnification)
    read_size = int(round(ps0 / slide.level_downsamples[level]))
    return TilePlan(coords=coords[keep], tissue_fraction=fraction[keep], patch_size=int(patch_size),
                    patch_size_level0=ps0, level0_magnification=float(base),
                    target_magnification=float(magnification), read_level=level, read_size=read_size)


def _coverage(mask: np.ndarray, ds: float, coords: np.ndarray, ps0: int) -> np.ndarray:
    """Fraction of each level-0 square [x, x + ps0) x [y, y + ps0) that the mask covers, from a
    summed-area table over the mask's pixels (each mask pixel counts wholly or not at all)."""
    if coords.size == 0:
        return np.zeros(0)
    m = np.asarray(mask, dtype=np.float64)
    table = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    table[1:, 1:] = m.cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(coords[:, 0] / ds).astype(np.int64), 0, m.shape[1])
    y0 = np.clip(np.floor(coords[:, 1] / ds).astype(np.int64), 0, m.shape[0])
    x1 = np.clip(np.ceil((coords[:, 0] + ps0) / ds).astype(np.int64), 0, m.shape[1])
    y1 = np.clip(np.ceil((coords[:, 1] + ps0) / ds).astype(np.int64), 0, m.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    covered = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return covered / area
