"""A built benchmark read back: a slide as the mosaic image it stands for, and its lesion tiles."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from mamba2d.bench import sources
from mamba2d.bench.config import BenchmarkError, read_benchmark_json

__all__ = ["lesion_cells", "render_mosaic"]

_NON_TISSUE_GREY = 255  # non-tissue cells render as white "glass" next to the dark FMNIST tiles


def _slide_file(out_dir: str | Path, slide_id: str) -> Path:
    path = Path(out_dir) / "features" / f"{slide_id}.h5"
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such slide in this benchmark")
    return path


def lesion_cells(out_dir: str | Path, slide_id: str) -> np.ndarray:
    """(N,) bool: which of the slide's patches (in the h5's row order) are lesion tiles."""
    with h5py.File(_slide_file(out_dir, slide_id), "r") as f:
        return np.asarray(f["is_lesion"][()], dtype=bool)


def render_mosaic(out_dir: str | Path, slide_id: str, scale: int = 1) -> np.ndarray:
    """The slide as an image: (H * t * scale, W * t * scale) uint8, t the tile side (28 for
    Fashion-MNIST, 8 for the digits fallback); non-tissue cells are white (255).

    Tiles are the source images the features were computed from (nearest-neighbour upscaled by the
    integer ``scale``), placed at their grid cells.
    """
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    out_dir = Path(out_dir)
    info = read_benchmark_json(out_dir / "benchmark.json")
    with h5py.File(_slide_file(out_dir, slide_id), "r") as f:
        coords = f["coords"][()]
        size = int(f["coords"].attrs["patch_size_level0"])
        index = f["image_index"][()]
        split = str(f.attrs["image_split"])
        h, w = (int(v) for v in f.attrs["grid_shape"])
    src = info["image_source"]
    if src["fallback"]:
        key, folder = "digits", None
    else:
        key = "fmnist"
        found = sources.find_fashion_mnist(src.get("folder"))
        if found is None:
            raise BenchmarkError(f"Fashion-MNIST (built from {src.get('folder')}) is not found any more")
        folder = str(found)
    images, _ = sources.load_split(key, folder, split)
    t = images.shape[1]
    canvas = np.full((h * t, w * t), _NON_TISSUE_GREY, dtype=np.uint8)
    cols, rows = coords[:, 0] // size, coords[:, 1] // size
    for r, c, i in zip(rows, cols, index, strict=True):
        canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = images[i]
    if scale > 1:
        canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    return canvas
