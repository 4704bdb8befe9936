"""Heatmaps: scores land on their own cells, percentiles match scipy, overlays keep uncovered cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba2d.wsi.heatmaps import overlay, save_overlay_png, score_grid, to_display


def _slide(seed=0, n=23, side=7, ps=256):
    rng = np.random.default_rng(seed)
    cells = rng.choice(side * side, n, replace=False)
    coords = np.stack([cells % side, cells // side], 1) * ps + 1000  # offset: the grid is tight
    return rng.normal(size=n), coords, cells, side


def test_every_patch_lands_on_its_cell_and_nothing_else_is_written():
    scores, coords, cells, side = _slide()
    grid = score_grid(torch.tensor(scores), torch.tensor(coords), 256)
    rows, cols = cells // side, cells % side
    rows, cols = rows - rows.min(), cols - cols.min()
    assert np.array_equal(grid[rows, cols], scores)
    assert np.isnan(grid).sum() == grid.size - len(scores)  # the NaN poison survives elsewhere


def test_fixed_canvas_and_its_errors():
    scores, coords, cells, side = _slide(1)
    grid = score_grid(scores, coords, 256, origin=(1000, 1000), shape=(side, side))
    assert np.array_equal(grid[cells // side, cells % side], scores)
    with pytest.raises(ValueError, match="outside"):
        score_grid(scores, coords, 256, origin=(2000, 1000), shape=(side, side))
    with pytest.raises(ValueError, match="coords"):
        score_grid(scores[:-1], coords, 256)


def test_percentiles_match_scipy_average_ranks():
    rankdata = pytest.importorskip("scipy.stats").rankdata
    rng = np.random.default_rng(2)
    grid = np.round(rng.normal(size=(6, 9)), 1)  # rounding makes ties
    grid[rng.random(grid.shape) < 0.3] = np.nan
    got = to_display(grid)
    ok = ~np.isnan(grid)
    want = (rankdata(grid[ok], method="average") - 1) / (ok.sum() - 1)
    assert np.allclose(got[ok], want, rtol=0, atol=1e-12)
    assert np.isnan(got[~ok]).all()


def test_max_scale_is_linear_and_rejects_unknown_scales():
    rng = np.random.default_rng(4)
    grid = rng.random((5, 7)) * 0.01
    grid[0, 0] = np.nan
    got = to_display(grid, scale="max")
    ok = ~np.isnan(grid)
    assert np.allclose(got[ok], grid[ok] / np.nanmax(grid), rtol=1e-12) and np.isnan(got[0, 0])
    assert np.nanmax(got) == 1.0
    zeros = np.where(ok, 0.0, np.nan)
    assert (to_display(zeros, scale="max")[ok] == 0).all()
    with pytest.raises(ValueError, match="scale"):
        to_display(grid, scale="log")


def test_overlay_colours_covered_cells_only():
    image = np.random.default_rng(3).integers(0, 256, (40, 60), dtype=np.uint8)
    grid = np.full((4, 6), np.nan)
    grid[1, 2], grid[3, 5] = 0.0, 1.0
    out = overlay(image, grid, alpha=0.6)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    uncovered = np.ones((40, 60), dtype=bool)
    uncovered[10:20, 20:30] = uncovered[30:40, 50:60] = False
    assert np.array_equal(out[uncovered], np.repeat(image[..., None], 3, 2)[uncovered])
    assert not np.array_equal(out[10:20, 20:30, 0], image[10:20, 20:30])
    # Low and high scores get different colours (blue end vs red end of the map).
    assert out[35, 55, 0] > out[15, 25, 0] or out[15, 25, 2] > out[35, 55, 2]


def test_png_is_written_atomically(tmp_path):
    image = np.random.default_rng(4).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    path = save_overlay_png(tmp_path / "h.png", image, to_display(np.arange(16.0).reshape(4, 4)), "slide 1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]
