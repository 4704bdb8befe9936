"""Attention heatmaps: per-patch scores placed on the slide's grid and drawn over its image.

The pieces are plain arrays so they serve both whole-slide thumbnails and the benchmark's mosaics:
:func:`score_grid` puts N patch scores on an (H, W) grid (NaN where there is no patch),
:func:`to_display` turns them into percentiles in [0, 1] (the field's convention, so one very
high score does not wash out the rest), and :func:`overlay` blends a colour map of the grid onto
an RGB image of any size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mamba2d.data.grid import patch_grid


def score_grid(scores: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor, patch_size: float,
               origin: tuple[float, float] | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Place (N,) patch scores on the patches' grid. Returns (H, W) float64, NaN where no patch is.

    ``coords``: (N, 2) level-0 (x, y) of each patch's top-left corner; ``patch_size``: level-0
    pixels. By default the grid is tight around the patches (as 2DMambaMIL builds it); ``origin``
    (x0, y0) and ``shape`` (H, W) place it on a fixed canvas instead, e.g. a whole slide.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).reshape(-1)
    xy = torch.as_tensor(np.asarray(torch.as_tensor(coords).cpu()), dtype=torch.float64)
    if xy.dim() != 2 or xy.shape[0] != s.shape[0]:
        raise ValueError(f"need (N, 2) coords for {s.shape[0]} scores, got {tuple(xy.shape)}")
    if origin is None:
        grid = patch_grid(xy, float(patch_size), snap="round", name="heatmap coords")
        rows, cols = grid.rows.numpy(), grid.cols.numpy()
        height, width = grid.height, grid.width
    else:
        cols = np.floor((xy[:, 0].numpy() - origin[0]) / patch_size).astype(np.int64)
        rows = np.floor((xy[:, 1].numpy() - origin[1]) / patch_size).astype(np.int64)
        if shape is None:
            raise ValueError("shape (H, W) is needed with origin")
        height, width = shape
        if rows.min() < 0 or cols.min() < 0 or rows.max() >= height or cols.max() >= width:
            raise ValueError(f"patches fall outside the {height} x {width} canvas at origin {origin}")
    out = np.full((height, width), np.nan)
    out[rows, cols] = s
    return out


def to_display(grid: np.ndarray, scale: str = "percentile") -> np.ndarray:
    """Scores to [0, 1] over the cells that have a patch; NaN stays NaN.

    ``scale="percentile"`` (CLAM's convention): each cell's rank among the cells (ties share a
    rank), which spreads the colours evenly but also colours the order of near-zero scores.
    ``scale="max"``: score / max score, linear, which shows how concentrated attention is.
    """
    if scale not in ("percentile", "max"):
        raise ValueError(f"scale must be 'percentile' or 'max', got {scale!r}")
    out = np.full(grid.shape, np.nan)
    ok = ~np.isnan(grid)
    values = grid[ok]
    if values.size == 0:
        return out
    if scale == "max":
        top = values.max()
        out[ok] = values / top if top > 0 else 0.0
        return out
    if values.size == 1:
        out[ok] = 1.0
        return out
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):  # average rank within ties
        ranks[order[start:start + count]] = start + (count - 1) / 2
    out[ok] = ranks / (values.size - 1)
    return out


def overlay(image: np.ndarray, grid: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a colour map of ``grid`` (H, W, values in [0, 1], NaN = no patch) over ``image``.

    ``image``: (Y, X) grey or (Y, X, 3) RGB uint8 of the same region, any size; each grid cell
    covers an equal block of it (nearest-neighbour upsampling, so cell edges stay visible).
    Returns (Y, X, 3) uint8; cells without a patch show the image unchanged.
    """
    from matplotlib import colormaps

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (Y, X) or (Y, X, 3), got {img.shape}")
    Y, X = img.shape[:2]
    H, W = grid.shape
    rows = np.minimum((np.arange(Y) * H) // Y, H - 1)
    cols = np.minimum((np.arange(X) * W) // X, W - 1)
    up = grid[rows][:, cols]
    colours = colormaps[cmap](np.nan_to_num(up, nan=0.0))[..., :3] * 255.0
    blend = np.where(np.isnan(up)[..., None], img, (1 - alpha) * img + alpha * colours)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def save_overlay_png(path: str | Path, image: np.ndarray, grid: np.ndarray, title: str | None = None,
                     alpha: float = 0.5, scale_label: str = "attention (percentile)") -> Path:
    """Write the image beside its attention overlay (with a colour bar) as one PNG, atomically.

    ``grid``: (H, W) display values in [0, 1] (see :func:`to_display`); ``scale_label`` titles the
    overlay panel; a long ``title`` is wrapped.
    """
    import textwrap

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    from mamba2d.train.checkpoint import atomic_write

    blended = overlay(image, grid, alpha=alpha)
    fig = Figure(figsize=(8, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(image, cmap="gray", vmin=0, vmax=255)  # the colour map applies to grey images only
    left.set_title("slide")
    right.imshow(blended)
    right.set_title(scale_label)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(cmap=colormaps["jet"]), ax=right, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))
