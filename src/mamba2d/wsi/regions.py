"""Reading a slide's patches many at a time: patches grouped into regions, tiles decoded once.

A slide's kept patches (a :class:`~mamba2d.wsi.tiling.TilePlan`) are grouped into regions of
``block x block`` lattice cells; a worker reads one region per call. When the slide is a tiled
TIFF that tifffile understands (SVS, generic tiled TIFF, ...), :class:`PatchReader` fetches the
compressed tiles the region's patches touch straight from the file and decodes each of them once
(with tifffile's decoder, the same code tiffslide runs), then cuts the patches out; otherwise it
reads the region's bounding box through the slide backend (tiffslide or openslide) and cuts the
patches from that. Either way a patch's pixels equal ``Slide.read_region`` of that patch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mamba2d.wsi.slides import Slide, SlideError, open_slide
from mamba2d.wsi.tiling import TilePlan

__all__ = ["PatchReader", "Region", "plan_regions", "region_block"]


@dataclass(frozen=True)
class Region:
    """Patches read together: ``index`` (k,) ascending positions in the plan, ``coords`` (k, 2)
    their level-0 top-left corners (x, y)."""

    index: np.ndarray
    coords: np.ndarray


def region_block(read_size: int, tile: int | None, region_px: int = 2048) -> int:
    """Lattice cells per region side: about ``region_px`` read-level pixels, rounded to a whole
    number of the slide's tiles when that costs at most twice the size (so no tile straddles two
    regions and is decoded twice)."""
    block = max(1, round(region_px / read_size))
    if tile:
        m = math.lcm(read_size, tile) // read_size
        if m <= 2 * block:
            block = max(m, block // m * m)
    return block


def plan_regions(plan: TilePlan, block: int) -> list[Region]:
    """Group the plan's patches into regions of ``block x block`` lattice cells, in raster order
    of the blocks."""
    if len(plan.coords) == 0:
        return []
    cells = plan.coords // plan.patch_size_level0
    key = (cells[:, 1] // block) * (int(cells[:, 0].max()) // block + 1) + cells[:, 0] // block
    order = np.argsort(key, kind="stable")  # the plan is raster-ordered, so each group stays ascending
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    return [Region(index=g, coords=plan.coords[g]) for g in np.split(order, bounds)]


class PatchReader:
    """Reads square patches from one pyramid level of a slide, many per call. Open one per
    process (file handles are not shared across processes). Use as a context manager."""

    def __init__(self, path: str | Path, level: int, size: int, mpp: float | None = None,
                 direct: bool = True) -> None:
        self.path, self.level, self.size = Path(path), int(level), int(size)
        self.slide: Slide = open_slide(self.path, mpp=mpp)
        self.level_dims = self.slide.level_dimensions[self.level]
        self._page: Any = None
        self._fd: int | None = None
        if direct:
            self._open_direct()

    # ----------------------------------------------------------------------------------------------
    @property
    def direct(self) -> bool:
        """True when tiles are read and decoded straight from the file (the fast path)."""
        return self._page is not None

    @property
    def tile_size(self) -> int | None:
        """Tile side of the read level (None when it is not a tiled TIFF page read directly)."""
        return int(self._page.tilewidth) if self._page is not None else None

    def _open_direct(self) -> None:
        """Find the TIFF page of the read level; keep the fallback when anything is unusual."""
        if self.slide.backend != "tiffslide":
            return
        try:
            import tifffile

            tif = tifffile.TiffFile(self.path)
            series = tif.series[0]
            page = series.levels[self.level].keyframe
            usable = (series.axes.endswith("YXS") and len(series.levels) == self.slide.level_count
                      and page.is_tiled and page.tiledepth == 1 and page.planarconfig == 1
                      and page.samplesperpixel == 3 and page.dtype == np.uint8
                      and (page.imagewidth, page.imagelength) == tuple(self.level_dims)
                      and len(series.levels[self.level].pages) == 1)
        except Exception:
            return
        if not usable:
            tif.close()
            return
        self._tif, self._page = tif, page
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, coords: np.ndarray) -> np.ndarray:
        """(k, size, size, 3) uint8 RGB patches whose top-left corners are ``coords`` (k, 2), in
        level-0 pixels, each ``size`` pixels square at the read level: the pixels of
        ``Slide.read_region(coords[i], level, (size, size))`` (white outside the slide)."""
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        if len(coords) == 0:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        # tiffslide (and openslide) map a level-0 location x to int(x / downsample) at the level.
        level_xy = (coords / self.slide.level_downsamples[self.level]).astype(np.int64)
        if self._page is not None:
            return self._read_direct(level_xy)
        return self._read_box(coords, level_xy)

    def _read_box(self, coords: np.ndarray, level_xy: np.ndarray) -> np.ndarray:
        s = self.size
        x0, y0 = level_xy.min(axis=0)
        x1, y1 = level_xy.max(axis=0) + s
        # The smallest level-0 x maps to the smallest level x (the map is monotone).
        loc = (int(coords[:, 0].min()), int(coords[:, 1].min()))
        box = self.slide.read_region(loc, self.level, (int(x1 - x0), int(y1 - y0)))
        out = np.empty((len(level_xy), s, s, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(level_xy - (x0, y0)):
            out[i] = box[y:y + s, x:x + s]
        return out

    def _read_direct(self, level_xy: np.ndarray) -> np.ndarray:
        page, s = self._page, self.size
        tw, th = int(page.tilewidth), int(page.tilelength)
        lw, lh = self.level_dims
        per_row = -(-lw // tw)
        out = np.full((len(level_xy), s, s, 3), 255, dtype=np.uint8)
        decoded: dict[int, np.ndarray] = {}
        for i, (x, y) in enumerate(level_xy):
            # The part of this patch inside the level; the rest stays white.
            px1, py1 = min(x + s, lw), min(y + s, lh)
            for ty in range(max(y, 0) // th, (py1 - 1) // th + 1):
                for tx in range(max(x, 0) // tw, (px1 - 1) // tw + 1):
                    k = ty * per_row + tx
                    tile = decoded.get(k)
                    if tile is None:
                        tile = decoded[k] = self._decode(k)
                    ax0, ay0 = max(x, tx * tw), max(y, ty * th)
                    ax1, ay1 = min(px1, (tx + 1) * tw), min(py1, (ty + 1) * th)
                    out[i, ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[ay0 - ty * th:ay1 - ty * th,
                                                                    ax0 - tx * tw:ax1 - tx * tw]
        return out

    def _decode(self, k: int) -> np.ndarray:
        page = self._page
        offset, count = int(page.dataoffsets[k]), int(page.databytecounts[k])
        try:
            if count == 0:  # a tile the scanner never wrote: empty
                return np.full((page.tilelength, page.tilewidth, 3), 255, dtype=np.uint8)
            assert self._fd is not None
            data = os.pread(self._fd, count, offset)
            segment, _, shape = page.decode(data, k, jpegtables=page.jpegtables)
        except Exception as err:
            raise SlideError(f"{self.path}: cannot decode tile {k} of level {self.level}: "
                             f"{type(err).__name__}: {err}") from err
        if segment is None:
            raise SlideError(f"{self.path}: tile {k} of level {self.level} is empty")
        return np.asarray(segment).reshape(shape[-3:])[..., :3]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._page is not None:
            self._tif.close()
            self._page = None
        self.slide.close()

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
