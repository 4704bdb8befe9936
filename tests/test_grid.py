"""Placing patch coordinates on a grid: one tiling, CLAM's per-contour tilings, TRIDENT's overlap,
collisions, and the guards against grids no slide needs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mamba2d.mil.grid import CELLS_PER_PATCH, MIN_CELL_ALLOWANCE, GridError, patch_grid

PS = 256


def _contour(rng, origin, shape, keep=0.8):
    """A CLAM-style tiling of one contour: its bounding box's corner is the lattice origin."""
    h, w = shape
    rows, cols = np.nonzero(rng.random((h, w)) < keep)
    return np.stack([origin[0] + cols * PS, origin[1] + rows * PS], 1), np.stack([cols, rows], 1)


def test_one_tiling_is_exact_division():
    rng = np.random.default_rng(0)
    cells = rng.choice(20 * 30, 200, replace=False)
    xy = np.stack([cells % 30, cells // 30], 1) * PS + np.array([512, 4096])
    g = patch_grid(torch.from_numpy(xy), PS)
    want = (xy - xy.min(0)) // PS
    assert g.cols.tolist() == want[:, 0].tolist() and g.rows.tolist() == want[:, 1].tolist()
    assert g.tilings == 1 and g.moved == 0
    assert (g.width, g.height) == (int(want[:, 0].max()) + 1, int(want[:, 1].max()) + 1)


def test_clam_contours_keep_their_layout_and_land_within_half_a_cell():
    rng = np.random.default_rng(1)
    parts, local = [], []
    # Three contours far apart, each tiled from its own (arbitrary) bounding-box corner.
    for origin in ((1000 + 37, 2000 + 101), (9000 + 200, 2500 + 3), (4000 + 128, 9000 + 250)):
        xy, cr = _contour(rng, origin, (8, 10))
        parts.append(xy)
        local.append(cr)
    xy = np.concatenate(parts)
    g = patch_grid(xy, PS)
    assert g.tilings == 3 and g.moved == 0
    cells = np.stack([g.cols.numpy(), g.rows.numpy()], 1)
    start = 0
    for xy_c, cr in zip(parts, local, strict=True):
        mine = cells[start:start + len(xy_c)]
        # Each contour moves as a whole: its cells are its own lattice indices plus one offset.
        offset = mine - cr
        assert (offset == offset[0]).all()
        start += len(xy_c)
    # And every patch lands within half a cell of where its pixels are (relative to the first).
    exact = (xy - xy.min(0)) / PS
    assert np.abs(cells - (exact - (exact - cells).mean(0))).max() <= 1.0


def test_a_phase_of_exactly_half_a_step_moves_the_tiling_whole():
    a = np.array([[0, 0], [PS, 0], [2 * PS, 0]])
    b = a + np.array([PS * 10 + PS // 2, PS * 3 + PS // 2])  # phase (128, 128): a tie for rounding
    g = patch_grid(np.concatenate([a, b]), PS)
    cols, rows = g.cols.numpy(), g.rows.numpy()
    assert (np.diff(cols[3:]) == 1).all() and len(set(rows[3:].tolist())) == 1
    assert g.moved == 0


def test_overlapping_contours_are_separated_and_counted():
    rng = np.random.default_rng(2)
    a, _ = _contour(rng, (0, 0), (10, 10), keep=1.0)
    # A second contour whose lattice is 60 px off and which overlaps the first's edge by one patch.
    b, _ = _contour(rng, (9 * PS + 60, 2 * PS + 60), (1, 6), keep=1.0)
    xy = np.concatenate([a, b])
    g = patch_grid(xy, PS)
    assert g.tilings == 2
    flat = g.flat.numpy()
    assert len(np.unique(flat)) == len(flat)  # one patch per cell
    assert 1 <= g.moved <= 2
    # Moved patches stay next to where they were on the slide.
    exact = xy / PS - (xy / PS).min(0)
    cells = np.stack([g.cols.numpy(), g.rows.numpy()], 1)
    assert np.abs(cells - exact).max() < 2.0


def test_a_wrong_patch_size_is_refused_not_snapped():
    rng = np.random.default_rng(3)
    xy, _ = _contour(rng, (0, 0), (12, 12), keep=0.9)  # a 256-px tiling, read as 512-px patches
    with pytest.raises(GridError, match="slide_9.h5.*patch size is probably wrong"):
        patch_grid(xy, 2 * PS, name="slide_9.h5")


def test_coordinates_that_are_no_tiling_are_refused():
    xy = np.random.default_rng(4).integers(0, 50_000, size=(100, 2))
    with pytest.raises(GridError, match="not tilings of 256-pixel patches"):
        patch_grid(xy, PS, name="s.h5")


def test_strict_and_round_modes():
    off = torch.tensor([[0.0, 0.0], [300.0, 0.0]])
    with pytest.raises(GridError, match="slide_7.h5.*patch 1 .* not on the 256-pixel lattice"):
        patch_grid(off, PS, snap="error", name="slide_7.h5")
    assert patch_grid(off, PS, snap="round").cols.tolist() == [0, 1]
    with pytest.raises(GridError, match="more than one patch"):
        patch_grid(torch.tensor([[0.0, 0.0], [100.0, 0.0]]), PS, snap="round")


def test_trident_overlap_is_honoured():
    # TRIDENT: column 0 at x = 0, column k >= 1 at k * P - (k - 1) * overlap (level-0 pixels).
    P, o = 512, 128
    def pos(k):
        return k * P - max(k - 1, 0) * o
    cols, rows = np.meshgrid(np.arange(6), np.arange(4))
    cols, rows = cols.ravel(), rows.ravel()
    xy = np.stack([[pos(c) for c in cols], [pos(r) for r in rows]], 1)
    g = patch_grid(xy, P - o, overlap=o)
    assert g.cols.tolist() == cols.tolist() and g.rows.tolist() == rows.tolist()
    assert g.moved == 0 and g.tilings == 1


def test_a_stray_coordinate_is_refused_before_any_allocation():
    rng = np.random.default_rng(5)
    cells = rng.choice(50 * 60, 2900, replace=False)
    xy = np.stack([cells % 60, cells // 60], 1) * PS
    for stray in (1_024_000, 10**9):
        bad = xy.copy()
        bad[17] = (stray, 512)
        started = time.perf_counter()
        pattern = f"slide_003.h5: .*patch 17 at x={stray}, y=512.*--max-grid-cells"
        with pytest.raises(GridError, match=pattern):
            patch_grid(bad, PS, name="slide_003.h5")
        assert time.perf_counter() - started < 5  # refused from the extent, nothing grid-sized built
    # The same slide is fine without the stray patch, and a limit given explicitly is obeyed.
    assert patch_grid(xy, PS).cells == 3000
    with pytest.raises(GridError, match="limit of 2,000"):
        patch_grid(xy, PS, max_cells=2000)
    bad = xy.copy()
    bad[17] = (1_024_000, 512)
    assert patch_grid(bad, PS, max_cells=10**6).width == 1_024_000 // PS + 1


def test_sparse_but_real_slides_pass_the_default_allowance():
    # Three needle cores far apart: 3 x (5 x 200) cells of tissue in a 200 x 400 box.
    cores = [np.stack(np.meshgrid(np.arange(x0, x0 + 5), np.arange(200)), -1).reshape(-1, 2)
             for x0 in (0, 150, 395)]
    xy = np.concatenate(cores) * PS
    g = patch_grid(xy, PS)
    assert g.cells == 200 * 400 and g.cells <= max(MIN_CELL_ALLOWANCE, CELLS_PER_PATCH * len(xy))


@pytest.mark.parametrize("coords, step, pattern", [
    (torch.tensor([[0.0, float("nan")]]), PS, "non-finite coordinate at patch 0"),
    (torch.zeros(4, 3), PS, r"\(N, 2\)"),
    (torch.zeros(0, 2), PS, "empty"),
    (torch.zeros(1, 2), 0, "positive number"),
])
def test_bad_input_is_named(coords, step, pattern):
    with pytest.raises(GridError, match=f"bag.h5: .*{pattern}"):
        patch_grid(coords, step, name="bag.h5")
