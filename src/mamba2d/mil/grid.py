"""Patch coordinates to a tight 2D grid: the layout 2DMambaMIL scans.

Tilers put patches on a lattice of one step (the patch side minus any overlap), but not always on
one lattice per slide:

- CLAM tiles every tissue contour from that contour's own bounding-box corner, so each contour's
  patches sit on a lattice of its own phase (x mod step, y mod step);
- TRIDENT with ``overlap`` puts column 0 at x = 0 and column k >= 1 at k * step + overlap.

``patch_grid`` places every tiling on one grid: each group of patches sharing a phase is shifted
as a whole to the nearest global lattice position, so a contour keeps its internal layout. Where
two tilings then claim the same cell (contours whose patches overlapped on the slide), the patch
farther from the cell's centre moves to the nearest free cell and is counted in ``moved``. Grids
that would hold far more cells than the slide could need are refused before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Snap = Literal["auto", "error", "round"]
SNAP_MODES: tuple[str, ...] = ("auto", "error", "round")

#: Grids up to this many cells are always accepted (a 256 x 256 grid).
MIN_CELL_ALLOWANCE = 2**16
#: Beyond it, a grid may hold at most this many cells per patch unless a limit is given: tissue
#: fills far more than 1/32 of its bounding box on real slides, and every cell costs the scan as
#: much as a patch.
CELLS_PER_PATCH = 32
#: More phase groups than this fraction of the patches means the coordinates are not tilings.
_MAX_GROUP_FRACTION = 0.25
#: More moved patches than this fraction means the step is wrong, not that contours touch.
_MAX_MOVED_FRACTION = 0.05


class GridError(ValueError):
    """Patch coordinates cannot be placed on a grid (named by the ``name`` given)."""


@dataclass(frozen=True)
class PatchGrid:
    """Where each patch sits on its slide's tight grid.

    ``rows``, ``cols``: (N,) int64 grid indices of the patches, in input order.
    ``height``, ``width``: the grid's size in cells (the bounding box of the patches).
    ``tilings``: how many lattices of different phase the patches came on (1 for one tiling).
    ``moved``: patches placed in a neighbouring cell because two tilings claimed theirs.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    height: int
    width: int
    tilings: int = 1
    moved: int = 0

    @property
    def flat(self) -> torch.Tensor:
        """(N,) row-major cell index of each patch: ``row * width + col``."""
        return self.rows * self.width + self.cols

    @property
    def cells(self) -> int:
        return self.height * self.width

    def to(self, device: torch.device | str) -> PatchGrid:
        return PatchGrid(self.rows.to(device), self.cols.to(device), self.height, self.width, self.tilings,
                         self.moved)


def cell_allowance(n_patches: int, max_cells: int | None = None) -> int:
    """The most cells a grid of ``n_patches`` may have: ``max_cells`` when given, else the larger of
    :data:`MIN_CELL_ALLOWANCE` and :data:`CELLS_PER_PATCH` per patch."""
    if max_cells is not None:
        return int(max_cells)
    return max(MIN_CELL_ALLOWANCE, CELLS_PER_PATCH * int(n_patches))


def patch_grid(coords: torch.Tensor | np.ndarray, step: float, snap: Snap = "auto", name: str = "coords",
               overlap: float = 0.0, max_cells: int | None = None) -> PatchGrid:
    """Place patches on a grid from their level-0 (x, y) pixel coordinates.

    ``coords``: (N, 2) with x (column direction) first, as CLAM and TRIDENT write them.
    ``step``: the lattice pitch in level-0 pixels: the patch side, minus ``overlap`` when the tiler
    overlapped patches. ``overlap``: TRIDENT's overlap in level-0 pixels (its column 0 sits at
    x = 0, column k at k * step + overlap; this is undone here).
    ``snap``: ``"auto"`` places each tiling (phase group) on the global lattice as described in
    the module docstring; ``"error"`` refuses any patch off one common lattice; ``"round"`` rounds
    every coordinate on its own and refuses two patches in one cell.
    ``max_cells``: refuse grids of more cells (default: :func:`cell_allowance`).
    ``name`` names the input in error messages (e.g. the file it came from).

    Returns rows and cols on the device of ``coords``. Raises :class:`GridError`.
    """
    if isinstance(coords, np.ndarray):
        coords = torch.from_numpy(coords)
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 2:
        shape = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
        raise GridError(f"{name}: coords must be an (N, 2) array of (x, y) pixel coordinates, got {shape}")
    if coords.shape[0] == 0:
        raise GridError(f"{name}: coords is empty: a slide needs at least one patch")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0 or step != step:
        raise GridError(f"{name}: the lattice step (patch size) must be a positive number of level-0 "
                        f"pixels, got {step!r}")
    if snap not in SNAP_MODES:
        raise GridError(f"{name}: snap must be one of {SNAP_MODES}, got {snap!r}")
    xy = coords.detach().cpu().to(torch.float64).numpy()
    if not np.isfinite(xy).all():
        bad = int(np.flatnonzero(~np.isfinite(xy).all(axis=1))[0])
        raise GridError(f"{name}: coords has a non-finite coordinate at patch {bad}: {xy[bad].tolist()}")
    step = float(step)
    if overlap:
        xy = np.where(xy == 0, float(overlap), xy)
    _check_extent(xy, step, name, max_cells)

    exact = xy / step
    moved = 0
    if snap == "auto":
        cells, tilings = _snap_tilings(xy, step, name)
        cells, moved = _resolve_collisions(cells, exact, name)
    else:
        pos = exact - exact.min(axis=0)
        cells = np.round(pos)
        off = np.abs(pos - cells) > 1e-6
        if snap == "error" and off.any():
            bad = int(np.flatnonzero(off.any(axis=1))[0])
            raise GridError(f"{name}: coords: patch {bad} at {coords[bad].tolist()} is not on the "
                            f"{step:g}-pixel lattice of the other patches; check the patch size")
        cells, tilings = cells.astype(np.int64), 1
        _refuse_collisions(cells - cells.min(axis=0), name, xy)
    cells = cells - cells.min(axis=0)
    cols, rows = cells[:, 0], cells[:, 1]
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    device = coords.device
    return PatchGrid(torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device), height, width,
                     tilings, moved)


def _check_extent(xy: np.ndarray, step: float, name: str, max_cells: int | None) -> None:
    """Refuse a grid larger than the allowance, naming the patch farthest from the others."""
    span = (xy.max(axis=0) - xy.min(axis=0)) / step + 1
    width, height = float(span[0]), float(span[1])
    cells = width * height
    limit = cell_allowance(len(xy), max_cells)
    if cells <= limit:
        return
    far = np.abs(xy - np.median(xy, axis=0)).max(axis=1)
    bad = int(far.argmax())
    x, y = (int(v) if float(v).is_integer() else float(v) for v in xy[bad])
    raise GridError(
        f"{name}: coords span a grid of {width:,.0f} x {height:,.0f} cells ({cells:,.0f}) for {len(xy):,} "
        f"patches, over the limit of {limit:,}; patch {bad} at x={x}, y={y} lies "
        f"{far[bad] / step:,.0f} cells from the others' median (a stray coordinate, or the wrong "
        f"patch size?); raise the limit with --max-grid-cells if the slide is really this sparse")


def _flat_key(cells: np.ndarray) -> np.ndarray:
    """(N, 2) integer cells to one int64 per cell, equal exactly when the cells are (1D sorts are
    much faster than ``np.unique(axis=0)``)."""
    lo = cells.min(axis=0)
    span = cells[:, 1].max() - lo[1] + 1
    return (cells[:, 0] - lo[0]) * span + (cells[:, 1] - lo[1])


def _snap_tilings(xy: np.ndarray, step: float, name: str) -> tuple[np.ndarray, int]:
    """Integer cells of every patch, each phase group shifted as a whole onto the global lattice."""
    # Phases to a thousandth of a pixel (float coordinates, or a phase a hair under the step).
    resolution = int(round(step * 1000))
    phase = np.round(np.mod(xy, step) * 1000).astype(np.int64) % resolution
    groups, first, inverse = np.unique(phase[:, 0] * resolution + phase[:, 1], return_index=True,
                                       return_inverse=True)
    n_groups = len(groups)
    if n_groups > max(4, _MAX_GROUP_FRACTION * len(xy)):
        raise GridError(f"{name}: coords: {n_groups} of {len(xy)} patches sit on lattices of different "
                        f"offsets, so they are not tilings of {step:g}-pixel patches; check the patch size")
    # One shift per group (not per patch), so a phase of exactly half a step moves a tiling whole.
    shift = (phase[first] >= resolution / 2).astype(np.int64)
    return np.floor(xy / step).astype(np.int64) + shift[inverse.reshape(-1)], n_groups


def _resolve_collisions(cells: np.ndarray, exact: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Move patches off cells that another patch holds to the nearest free cell; return the count.

    ``cells``: (N, 2) snapped integer (x, y) cells; ``exact``: (N, 2) the true positions in cells.
    Of the patches claiming one cell, the one nearest the cell's centre keeps it.
    """
    key = _flat_key(cells)
    if len(np.unique(key)) == len(key):
        return cells, 0
    _refuse_repeats(exact, name)  # two patches at one (x, y) are an error, not overlapping tilings
    centre_dist = np.abs(exact - cells).sum(axis=1)
    taken: set[tuple[int, int]] = set()
    losers = []
    for i in np.argsort(centre_dist, kind="stable"):
        cell = (int(cells[i, 0]), int(cells[i, 1]))
        if cell in taken:
            losers.append(int(i))
        else:
            taken.add(cell)
    if len(losers) > max(2, _MAX_MOVED_FRACTION * len(cells)):
        raise GridError(f"{name}: coords: after snapping, {len(losers)} of {len(cells)} patches fall on a "
                        f"cell another patch holds; the patch size is probably wrong (too large), or the "
                        f"coordinates are not level-0 pixels")
    out = cells.copy()
    for i in sorted(losers):
        out[i] = _nearest_free(exact[i], taken)
        taken.add((int(out[i, 0]), int(out[i, 1])))
    return out, len(losers)


def _nearest_free(target: np.ndarray, taken: set[tuple[int, int]]) -> tuple[int, int]:
    """The free cell nearest ``target`` (x, y in cells), searching rings of growing radius."""
    cx, cy = int(np.round(target[0])), int(np.round(target[1]))
    for radius in range(1, 1 << 20):
        ring = [(cx + dx, cy + dy) for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1)
                if max(abs(dx), abs(dy)) == radius]
        free = [c for c in ring if c not in taken]
        if free:
            return min(free, key=lambda c: ((c[0] - target[0]) ** 2 + (c[1] - target[1]) ** 2, c[1], c[0]))
    raise AssertionError("unreachable: a finite set of taken cells always leaves a free one")


def _refuse_repeats(xy: np.ndarray, name: str) -> None:
    """Two patches at one (x, y) mean a broken extraction, not overlapping tilings."""
    order = np.lexsort((xy[:, 1], xy[:, 0]))
    ordered = xy[order]
    same = (ordered[1:] == ordered[:-1]).all(axis=1)
    if same.any():
        repeats = np.sort(order[1:][same])
        i = int(repeats[0])
        raise GridError(f"{name}: coords: {repeats.size} patch(es) repeat the coordinate of another; first: "
                        f"patch {i} at {xy[i].tolist()}")


def _refuse_collisions(cells: np.ndarray, name: str, xy: np.ndarray) -> None:
    width = int(cells[:, 0].max()) + 1
    flat = cells[:, 1] * width + cells[:, 0]
    uniq, counts = np.unique(flat, return_counts=True)  # cells here are already >= 0
    if (counts > 1).any():
        _refuse_repeats(xy, name)
        cell = int(uniq[counts > 1][0])
        first = np.flatnonzero(flat == cell)[:2].tolist()
        raise GridError(f"{name}: coords: {int((counts > 1).sum())} grid cell(s) hold more than one patch; "
                        f"patches {first} both fall on row {cell // width}, column {cell % width}")
