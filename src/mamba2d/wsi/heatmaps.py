"""Attention heatmaps: per-patch scores placed on the slide's grid and drawn over its image.

The pieces are plain arrays so they serve both whole-slide thumbnails and the benchmark's mosaics:
:func:`score_grid` puts N patch scores on an (H, W) grid (NaN where there is no patch),
:func:`to_display` turns them into percentiles in [0, 1] (the field's convention, so one very
high score does not wash out the rest), and :func:`overlay` blends a colour map of the grid onto
an RGB image of any size.

On whole slides, :func:`paint_scores` paints patch scores onto a canvas of any downsample (a
thumbnail or a pyramid level), :func:`blur_scores` smooths them inside the tissue only,
:func:`slide_heatmap` does both from an open slide, :func:`save_slide_heatmap_png` draws the
result, and :func:`export_scores_csv` / :func:`export_scores_geojson` write the per-patch scores
for other tools (QuPath reads the GeoJSON).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mamba2d.mil.grid import patch_grid


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
                     alpha: float = 0.5, scale_label: str = "attention (percentile)",
                     cmap: str = "jet") -> Path:
    """Write the image beside its attention overlay (with a colour bar) as one PNG, atomically.

    ``grid``: (H, W) display values in [0, 1] (see :func:`to_display`); ``scale_label`` titles the
    overlay panel; a long ``title`` is wrapped; ``cmap``: a matplotlib colour map name.
    """
    import textwrap

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    from mamba2d.io import atomic_write

    blended = overlay(image, grid, alpha=alpha, cmap=cmap)
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
    fig.colorbar(ScalarMappable(cmap=colormaps[cmap]), ax=right, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


# --------------------------------------------------------------------------------------------------
# Whole slides: scores painted on a thumbnail or pyramid level

# Canvas positions are level-0 pixels / downsample; this absorbs float noise such as 127.99999999
# for a patch edge that lies exactly on a canvas pixel edge, without moving any real fraction.
_EDGE_EPS = 1e-9
# A pyramid level read whole is held as RGB uint8 plus float64 grids (~35 bytes a pixel); refuse
# levels so large that this would exhaust a workstation's memory.
MAX_CANVAS_PIXELS = 64_000_000


def _as_numpy(values: np.ndarray | torch.Tensor, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def paint_scores(scores: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor,
                 patch_size_level0: float, canvas_shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Paint (N,) patch scores onto a canvas of ``canvas_shape`` = (H, W) pixels.

    ``coords``: (N, 2) level-0 (x, y) of each patch's top-left corner; ``patch_size_level0``: the
    patch side in level-0 pixels; ``downsample``: level-0 pixels per canvas pixel (1 for level 0,
    a thumbnail's ratio otherwise; need not be an integer). The level-0 square [x, x + ps) x
    [y, y + ps) covers canvas columns [floor(x / ds), ceil((x + ps) / ds)) and the same for rows,
    clipped to the canvas, so a patch is never drawn smaller than it is; at non-integer downsamples
    neighbours may then share a pixel, which the later patch takes. Every patch inside the canvas
    covers at least one pixel.

    Returns (H, W) float64, NaN where no patch lies.
    """
    s = _as_numpy(scores, np.float64).reshape(-1)
    xy = _as_numpy(coords, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != s.shape[0]:
        raise ValueError(f"need (N, 2) coords for {s.shape[0]} scores, got {tuple(xy.shape)}")
    ps, ds = float(patch_size_level0), float(downsample)
    if not (np.isfinite(ps) and ps > 0):
        raise ValueError(f"patch_size_level0 must be a positive number of level-0 pixels, "
                         f"got {patch_size_level0}")
    if not (np.isfinite(ds) and ds > 0):
        raise ValueError(f"downsample must be a positive number, got {downsample}")
    height, width = (int(v) for v in canvas_shape)
    out = np.full((height, width), np.nan)
    c0 = np.floor(xy[:, 0] / ds + _EDGE_EPS).astype(np.int64)
    r0 = np.floor(xy[:, 1] / ds + _EDGE_EPS).astype(np.int64)
    c1 = np.maximum(np.ceil((xy[:, 0] + ps) / ds - _EDGE_EPS).astype(np.int64), c0 + 1)
    r1 = np.maximum(np.ceil((xy[:, 1] + ps) / ds - _EDGE_EPS).astype(np.int64), r0 + 1)
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    r0, r1 = np.clip(r0, 0, height), np.clip(r1, 0, height)
    # In input order, so a later patch overwrites an earlier one where they share a pixel.
    for i in np.flatnonzero((c1 > c0) & (r1 > r0)):
        out[r0[i]:r1[i], c0[i]:c1[i]] = s[i]
    return out


def blur_scores(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W) score canvas that ignores NaN (pixels without a patch).

    Normalised convolution: blur(values * mask) / blur(mask), so tissue edges are not pulled
    towards zero by the empty background, and a constant field stays constant. ``sigma``: standard
    deviation in canvas pixels (0 returns a copy). Returns (H, W) float64; pixels that were NaN
    stay NaN, so the blur never paints outside the tissue.
    """
    from scipy.ndimage import gaussian_filter

    grid = np.asarray(grid, dtype=np.float64)
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a non-negative number of canvas pixels, got {sigma}")
    if sigma == 0:
        return grid.copy()
    mask = ~np.isnan(grid)
    num = gaussian_filter(np.where(mask, grid, 0.0), sigma, mode="constant", cval=0.0)
    den = gaussian_filter(mask.astype(np.float64), sigma, mode="constant", cval=0.0)
    out = np.full(grid.shape, np.nan)
    # A patch pixel always weighs itself, so den > 0 wherever mask holds.
    out[mask] = num[mask] / den[mask]
    return out


def patches_outside(coords: np.ndarray | torch.Tensor, patch_size_level0: float,
                    dimensions: tuple[int, int]) -> np.ndarray:
    """(N,) bool: patches whose level-0 square does not overlap the slide's ``dimensions`` (w, h).

    Edge patches that run past the border are kept (extractors pad them); a patch entirely off
    the slide means the features belong to another slide or another coordinate frame.
    """
    xy = _as_numpy(coords, np.float64)
    w0, h0 = dimensions
    ps = float(patch_size_level0)
    return (xy[:, 0] >= w0) | (xy[:, 1] >= h0) | (xy[:, 0] + ps <= 0) | (xy[:, 1] + ps <= 0)


def parse_level(level: str | int) -> str | int:
    """"auto" or a pyramid level index (int >= 0) from a command-line string or an int."""
    if isinstance(level, str):
        text = level.strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit():
            raise ValueError(f"level must be 'auto' or a pyramid level number (0, 1, ...), got {level!r}")
        return int(text)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be 'auto' or a pyramid level number (0, 1, ...), got {level!r}")
    return level


def slide_heatmap(slide, scores: np.ndarray | torch.Tensor, coords: np.ndarray | torch.Tensor,
                  patch_size_level0: float, level: str | int = "auto", max_side: int = 2048,
                  scale: str = "percentile",
                  blur: bool | float = False) -> tuple[np.ndarray, np.ndarray, float]:
    """A slide image and its heatmap on the same pixels.

    ``slide``: an open :class:`mamba2d.wsi.slides.Slide`. ``scores``: (N,) per patch (e.g.
    attention); ``coords``: (N, 2) level-0 top-left (x, y); ``patch_size_level0``: level-0 pixels.
    ``level``: "auto" draws on ``slide.thumbnail(max_side)`` (at most ``max_side`` pixels on the
    long side); an int reads that pyramid level whole. ``scale``: see :func:`to_display`; it is
    applied to the patch scores before painting, so percentiles are over patches, not pixels.
    ``blur``: False; True for a Gaussian of sigma = half a patch width (in canvas pixels); or a
    sigma in canvas pixels. The blur is applied to the display values and never leaves the tissue.

    Returns (rgb, display, downsample): rgb (H, W, 3) uint8 image; display (H, W) float64 in
    [0, 1], NaN where no patch lies; downsample: level-0 pixels per canvas pixel (level-0 width /
    canvas width, the actual ratio rather than the file's rounded value).
    """
    level = parse_level(level)
    s = _as_numpy(scores, np.float64).reshape(-1)
    xy = _as_numpy(coords, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != s.shape[0]:
        raise ValueError(f"need (N, 2) coords for {s.shape[0]} scores, got {tuple(xy.shape)}")
    outside = patches_outside(xy, patch_size_level0, slide.dimensions)
    if outside.any():
        x, y = (int(v) for v in xy[np.flatnonzero(outside)[0]])
        raise ValueError(f"{slide.path}: {int(outside.sum())} of {len(s)} patches lie outside the slide "
                         f"({slide.dimensions[0]} x {slide.dimensions[1]} level-0 pixels), first at "
                         f"x={x}, y={y}")
    w0 = slide.dimensions[0]
    if level == "auto":
        if int(max_side) < 1:
            raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
        image, _ = slide.thumbnail(int(max_side))
    else:
        if level >= slide.level_count:
            raise ValueError(f"{slide.path}: level {level} does not exist "
                             f"(levels 0..{slide.level_count - 1})")
        lw, lh = slide.level_dimensions[level]
        if lw * lh > MAX_CANVAS_PIXELS:
            raise ValueError(f"{slide.path}: level {level} is {lw} x {lh} pixels, too large to draw whole; "
                             f"use a coarser level or level 'auto' with a max side")
        image = slide.read_level(level)
    downsample = w0 / image.shape[1]
    display = paint_scores(to_display(s, scale=scale), xy, patch_size_level0, image.shape[:2], downsample)
    if blur is not False and blur is not None:
        sigma = float(patch_size_level0) / downsample / 2 if blur is True else float(blur)
        display = blur_scores(display, sigma)
    return image, display, downsample


def _nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``limit`` (> 0)."""
    k = 10.0 ** np.floor(np.log10(limit))
    return float(max(m * k for m in (1, 2, 5) if m * k <= limit))


def save_slide_heatmap_png(path: str | Path, image: np.ndarray, grid: np.ndarray, title: str | None = None,
                           alpha: float = 0.5, cmap: str = "jet", scale_label: str = "attention (percentile)",
                           microns_per_pixel: float | None = None) -> Path:
    """Write a slide image beside its heatmap overlay, with a colour bar and a title, atomically.

    ``image``: (H, W, 3) RGB uint8 (from :func:`slide_heatmap`); ``grid``: (H, W) display values
    in [0, 1], NaN where no patch lies. The panels are drawn at the image's own pixel size (so
    ``max_side`` or the level chosen sets the PNG's resolution; small images are enlarged to stay
    legible). ``microns_per_pixel``: of the image, when known, for a scale bar. Returns ``path``.
    """
    import textwrap

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    from mamba2d.io import atomic_write

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != np.asarray(grid).shape:
        raise ValueError(f"need an (H, W, 3) image and an (H, W) grid, got {img.shape} and {np.shape(grid)}")
    blended = overlay(img, grid, alpha=alpha, cmap=cmap)
    h, w = img.shape[:2]
    zoom = max(1.0, 320.0 / max(h, w))  # tiny canvases are enlarged so the text fits around them
    pw, ph = w * zoom, h * zoom
    # Layout in pixels (dpi 100): margins, panel titles, a colour bar with its tick labels.
    dpi, margin, gap, bar_w, bar_space = 100, 12, 12, 18, 55
    title_h = 0
    wrapped = None
    if title:
        fig_w_px = margin + pw + gap + pw + gap + bar_w + bar_space + margin
        wrapped = textwrap.fill(title, max(40, int(fig_w_px / 8)))
        title_h = 22 * (wrapped.count("\n") + 1) + 8
    head = 26  # panel titles
    fig_w = margin + pw + gap + pw + gap + bar_w + bar_space + margin
    fig_h = margin + title_h + head + ph + margin
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)

    def box(left: float, top: float, width: float, height: float) -> list[float]:
        # Pixel box from the top-left corner to matplotlib's fractions from the bottom-left.
        return [left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h]

    top = margin + title_h + head
    left_ax = fig.add_axes(box(margin, top, pw, ph))
    right_ax = fig.add_axes(box(margin + pw + gap, top, pw, ph))
    bar_ax = fig.add_axes(box(margin + 2 * pw + 2 * gap, top, bar_w, ph))
    left_ax.imshow(img, interpolation="nearest")
    left_ax.set_title("slide", fontsize=11)
    right_ax.imshow(blended, interpolation="nearest")
    right_ax.set_title(scale_label, fontsize=11)
    for ax in (left_ax, right_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(cmap=colormaps[cmap]), cax=bar_ax)
    if microns_per_pixel:
        length_um = _nice_length(0.25 * w * microns_per_pixel)
        bar_px = length_um / microns_per_pixel
        x0, y0 = 0.04 * w, 0.96 * h
        left_ax.plot([x0, x0 + bar_px], [y0, y0], color="black", linewidth=3, solid_capstyle="butt")
        text = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
        left_ax.text(x0 + bar_px / 2, y0 - 0.012 * h, text, ha="center", va="bottom", fontsize=9)
        left_ax.set_xlim(-0.5, w - 0.5)
        left_ax.set_ylim(h - 0.5, -0.5)
    if wrapped:
        fig.text(0.5, 1 - (margin / fig_h), wrapped, ha="center", va="top", fontsize=12)
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


def export_scores_csv(path: str | Path, coords: np.ndarray | torch.Tensor, patch_size_level0: float,
                      scores: np.ndarray | torch.Tensor) -> Path:
    """Write one row per patch: ``x,y,width,height,score`` (level-0 pixels; x, y top-left), atomically.

    Scores are written with full float precision, in the bag's patch order. Returns ``path``.
    """
    from mamba2d.io import write_text

    xy, s, ps = _tiles(coords, patch_size_level0, scores)
    lines = ["x,y,width,height,score"]
    lines += [f"{x},{y},{ps},{ps},{float(v)!r}" for (x, y), v in zip(xy.tolist(), s.tolist(), strict=True)]
    return write_text(path, "\n".join(lines) + "\n")


def export_scores_geojson(path: str | Path, coords: np.ndarray | torch.Tensor, patch_size_level0: float,
                          scores: np.ndarray | torch.Tensor, name: str = "attention") -> Path:
    """Write the patches as a GeoJSON FeatureCollection of square tiles, atomically.

    Each Feature is a Polygon in level-0 pixel coordinates (x right, y down: the frame QuPath uses
    when importing onto the same slide) with one closed ring of 5 points, and properties
    ``{"objectType": "tile", "score": s, "measurements": {name: s}}``; QuPath shows the
    measurement in its tables and can colour tiles by it. Non-finite scores become null.
    Returns ``path``.
    """
    import json
    import math

    from mamba2d.io import write_text

    xy, s, ps = _tiles(coords, patch_size_level0, scores)
    features = []
    for (x, y), v in zip(xy.tolist(), s.tolist(), strict=True):
        value = float(v) if math.isfinite(v) else None
        ring = [[x, y], [x + ps, y], [x + ps, y + ps], [x, y + ps], [x, y]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "tile", "score": value, "measurements": {name: value}}})
    return write_text(path, json.dumps({"type": "FeatureCollection", "features": features}) + "\n")


def _tiles(coords: np.ndarray | torch.Tensor, patch_size_level0: float,
           scores: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, int | float]:
    """(N, 2) coords as int64 when whole (floats otherwise), (N,) float64 scores, the patch side."""
    xy = _as_numpy(coords, np.float64)
    s = _as_numpy(scores, np.float64).reshape(-1)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != s.shape[0]:
        raise ValueError(f"need (N, 2) coords for {s.shape[0]} scores, got {tuple(xy.shape)}")
    if np.all(xy == np.round(xy)):
        xy = xy.astype(np.int64)
    ps = float(patch_size_level0)
    return xy, s, int(ps) if ps.is_integer() else ps
