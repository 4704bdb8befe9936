"""Whole-slide images: one small interface over tiffslide (default) and openslide.

Coordinates are level-0 pixels (x to the right, y down) unless a name says otherwise. A pyramid
level ``k`` has ``level_downsamples[k]`` level-0 pixels per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mamba2d.extras import require

__all__ = ["Slide", "SlideError", "open_slide", "slide_backends"]


class SlideError(ValueError):
    """A slide that cannot be opened or read, or lacks the metadata a step needs; names the file."""


def slide_backends() -> list[str]:
    """Installed slide readers, in the order ``backend="auto"`` tries them."""
    found = []
    for name in ("tiffslide", "openslide"):
        try:
            __import__(name)
            found.append(name)
        except Exception:  # openslide-python raises OSError when the C library is missing
            continue
    return found


@dataclass
class Slide:
    """An open slide. Build with :func:`open_slide`; use as a context manager or call :meth:`close`.

    ``dimensions``: level-0 (width, height) in pixels. ``level_dimensions`` / ``level_downsamples``:
    per pyramid level. ``mpp``: level-0 microns per pixel (None if unknown). ``objective_power``:
    the scanner's magnification (None if unknown).
    """

    path: Path
    backend: str
    dimensions: tuple[int, int]
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    objective_power: float | None
    _handle: Any = field(repr=False, default=None)

    # ----------------------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def magnification(self) -> float:
        """Level-0 magnification: the objective power, else 10 / mpp (0.25 µm/px ≈ 40×)."""
        if self.objective_power:
            return float(self.objective_power)
        if self.mpp:
            return 10.0 / self.mpp
        raise SlideError(f"{self.path}: the slide records neither its microns per pixel nor its "
                         "objective power; pass --mpp (level-0 microns per pixel)")

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (so reads never upsample)."""
        best = 0
        for k, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = k
        return best

    def tile_size(self, level: int) -> int | None:
        """Side of the stored tiles of ``level`` in pixels (None when the backend does not say)."""
        props = getattr(self._handle, "properties", {}) or {}
        value = props.get(f"{self.backend}.level[{int(level)}].tile-width")
        try:
            return int(value) if value else None
        except (TypeError, ValueError):
            return None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``size`` = (width, height) pixels at ``level``, whose
        top-left corner is ``location`` = (x, y) in level-0 pixels. Outside the slide reads white."""
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (levels 0..{self.level_count - 1})")
        try:
            region = self._handle.read_region((int(location[0]), int(location[1])), int(level),
                                              (int(size[0]), int(size[1])))
        except Exception as err:  # corrupt tiles surface here, deep in the reader
            raise SlideError(f"{self.path}: cannot read {size} pixels at {location} (level {level}): "
                             f"{type(err).__name__}: {err}") from err
        rgb = _to_rgb(np.asarray(region))
        # Readers differ outside the slide (black, transparent, edge pixels): make it white.
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x0, y0 = location[0] / ds, location[1] / ds
        inside_w = int(np.clip(math.floor(lw - x0), 0, size[0]))
        inside_h = int(np.clip(math.floor(lh - y0), 0, size[1]))
        if inside_w < size[0] or inside_h < size[1]:
            rgb = rgb.copy()
            rgb[:, inside_w:] = 255
            rgb[inside_h:, :] = 255
        return rgb

    def read_level(self, level: int) -> np.ndarray:
        """A whole pyramid level as RGB uint8 (height, width, 3)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The slide at most ``max_side`` pixels on its longer side, read from the closest level
        at or above that resolution and resized. Returns (RGB uint8 image, level-0 pixels per
        thumbnail pixel along x and y, as one float: the aspect ratio is kept)."""
        Image = require("PIL.Image", "wsi")

        w0, h0 = self.dimensions
        target_ds = max(max(w0, h0) / max_side, 1.0)
        level = self.best_level_for_downsample(target_ds)
        image = self.read_level(level)
        out_w, out_h = max(1, round(w0 / target_ds)), max(1, round(h0 / target_ds))
        if (image.shape[1], image.shape[0]) != (out_w, out_h):
            image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR))
        return image, w0 / out_w

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_rgb(region: np.ndarray) -> np.ndarray:
    """RGBA (as both readers return) to RGB over white; transparent pixels are outside the slide."""
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2).astype(np.uint8)
    if region.shape[2] == 4:
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        rgb = region[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(region[..., :3]).astype(np.uint8)


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image (.svs, .tif/.tiff, .ndpi, .mrxs, ... as the backend supports).

    ``mpp``: level-0 microns per pixel, overriding (or supplying) the file's value.
    ``backend``: "auto" (tiffslide, then openslide), "tiffslide" or "openslide".
    Raises :class:`SlideError` naming the file when it is missing, unreadable or not a slide.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such slide file")
    names = slide_backends() if backend == "auto" else [backend]
    if not names:
        raise SlideError("no slide reader is installed: install mamba2d[wsi] (pip install 'mamba2d[wsi]'), "
                         "or openslide-python openslide-bin")
    errors = []
    for name in names:
        try:
            handle = _open_with(name, path)
        except SlideError:
            raise
        except Exception as err:
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        try:
            return _describe(handle, name, path, mpp)
        except SlideError:
            handle.close()
            raise
        except Exception as err:
            handle.close()
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise SlideError(f"{path}: not a readable slide ({'; '.join(errors)})")


def _open_with(name: str, path: Path) -> Any:
    if name == "tiffslide":
        tiffslide = require("tiffslide", "wsi")

        return tiffslide.TiffSlide(str(path))
    if name == "openslide":
        import openslide

        return openslide.OpenSlide(str(path))
    raise SlideError(f"unknown slide backend {name!r}; use auto, tiffslide or openslide")


def _describe(handle: Any, name: str, path: Path, mpp: float | None) -> Slide:
    props = dict(handle.properties)
    prefix = "tiffslide" if name == "tiffslide" else "openslide"
    file_mpp = _float_or_none(props.get(f"{prefix}.mpp-x"))
    power = _float_or_none(props.get(f"{prefix}.objective-power"))
    if mpp is not None and not (_float_or_none(mpp)):
        raise SlideError(f"{path}: mpp must be a positive number of microns per pixel, got {mpp!r}")
    dims = tuple(int(v) for v in handle.dimensions)
    if dims[0] <= 0 or dims[1] <= 0:
        raise SlideError(f"{path}: the slide has no pixels ({dims})")
    # An explicit mpp wins; the objective power is then derived from it, so the two stay consistent.
    if mpp is not None:
        file_mpp, power = float(mpp), None
    return Slide(path=path, backend=name, dimensions=(dims[0], dims[1]),
                 level_dimensions=[(int(w), int(h)) for w, h in handle.level_dimensions],
                 level_downsamples=[float(d) for d in handle.level_downsamples],
                 mpp=file_mpp, objective_power=power, _handle=handle)
