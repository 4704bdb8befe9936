"""A spatial MIL benchmark: "slides" that are mosaics of real images, labelled by 2D arrangement.

A slide is an H x W grid of cells. An irregular tissue mask (a union of lobed blobs, ragged edges,
holes) says which cells hold a patch; every tissue cell shows one Fashion-MNIST image. Most are
*background* (clothing), a few are *lesions* (sandals) and some slides also hold *decoys* (bags).
The slide label depends only on how the lesion tiles are arranged on the grid; their number is
drawn by one sampler for every class, before the class is used, so counting or mean pooling
cannot solve the task, and each tile's feature is computed from its image alone (a frozen
encoder), so no single tile can either.

Classification classes (:data:`CLASS_NAMES`):

* 0 ``scattered``: no two lesion tiles 8-adjacent; one per row on k consecutive rows, each 2-3
  columns beside the one above, so in raster order they are spaced like a vertical line's;
* 1 ``cluster``: one compact 4-connected blob (bounding box at most ceil(sqrt(k)) + 1 per side,
  at least 2 per side);
* 2 ``vertical_line``: k lesion tiles in one column, on consecutive rows; adjacent on the grid but
  a whole row apart in raster order, which is what separates 2D scans from 1D sequences.

Survival (``task="survival"``): a compact cluster of s of the k lesion tiles plus k - s loosely
scattered ones. The risk r = (s - 1) / (k - 1), the fraction of lesions in the largest cluster,
takes ``survival_levels`` evenly spaced values (default 3: all scattered, half clustered, one
cluster; 0 draws it uniformly, a harder task) and sets a Weibull event time
T = scale * exp(-beta * r) * Weibull(shape), censored by independent uniform times calibrated to
the configured censoring rate.

Outputs (see ``docs/benchmark.md``): TRIDENT-style ``features/<slide>.h5`` that
:func:`mamba2d.data.bags.read_bag` reads, ``labels.csv``, ``splits.csv``, ``slides.csv`` (per-slide
layout facts) and ``benchmark.json``. Features are computed once per image and cached in
``cache/<source>_<split>_<encoder>.pt``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import h5py
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from mamba2d.data.images import FMNIST_CLASSES, find_fashion_mnist, load_digits_images, load_fashion_mnist
from mamba2d.io import atomic_write, write_json, write_text
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

__all__ = [
    "BENCHMARK_VERSION", "CLASS_NAMES", "PRESETS", "BenchmarkConfig", "BenchmarkError",
    "ResizedEfficientNetLite0Encoder", "SlideLayout", "TileEncoder", "build_benchmark",
    "default_benchmark_dir", "enclosed_holes", "largest_component", "lesion_cells", "render_mosaic",
    "sample_layout", "survival_outcome",
]

#: Bumped whenever the generator changes what a config produces; part of the config hash.
BENCHMARK_VERSION = 1
CLASS_NAMES: tuple[str, ...] = ("scattered", "cluster", "vertical_line")
PARTS: tuple[str, ...] = ("train", "val", "test")
#: Which image split each benchmark part draws from: train and val never see test images.
IMAGE_SPLIT = {"train": "train", "val": "train", "test": "test"}
#: Cell kinds in :attr:`SlideLayout.kind`.
NO_TISSUE, BACKGROUND, LESION, DECOY = -1, 0, 1, 2

_PART_CODE = {"train": 0, "val": 1, "test": 2}
_TASK_CODE = {"classification": 0, "survival": 1}
# Stream ids, so that the per-purpose random generators never share a stream.
_S_LAYOUT, _S_IMAGES, _S_LABELS, _S_POOL, _S_SURV = 11, 12, 13, 14, 15
_MAX_MASK_TRIES = 300
_MAX_PLACE_TRIES = 60
_NON_TISSUE_GREY = 255  # non-tissue cells render as white "glass" next to the dark FMNIST tiles
_DIGITS_TEST_EVERY = 4  # digits fallback: every 4th image is a test image, the rest train


class BenchmarkError(ValueError):
    """A benchmark folder or configuration problem: invalid config, or a folder built differently."""


class TileEncoder(Protocol):
    """What :func:`build_benchmark` needs from an encoder.

    ``encode(images, batch_size)``: images (N, h, w) uint8 grey tiles -> (N, D) float32 tensor.
    An optional ``cache_tag`` attribute names its features in cache file names (default: the class
    name); two encoders with one tag must give the same features.
    """

    def encode(self, images: np.ndarray, batch_size: int = ...) -> torch.Tensor: ...


class ResizedEfficientNetLite0Encoder(EfficientNetLite0Encoder):
    """The packaged EfficientNet-lite0 encoder with a chosen input side (pixels, square).

    Fashion-MNIST tiles are 28 x 28: resizing them to 112 instead of 224 loses nothing the encoder
    can use (same lesion-vs-rest probe accuracy) and is about 7x faster on a CPU.
    """

    def __init__(self, weights: str | Path | None = None, input_size: int = 224) -> None:
        super().__init__(weights)
        if not isinstance(input_size, int) or input_size < 32:
            raise ValueError(f"input_size must be an int >= 32 pixels, got {input_size!r}")
        self.input_size = input_size

    @property
    def cache_tag(self) -> str:
        """Cache file tag: the input size alone, e.g. ``fmnist_test_112.pt``."""
        return str(self.input_size)


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a benchmark depends on; the same config (and encoder) gives the same benchmark.

    Sizes: ``n_train``/``n_val``/``n_test`` slides; grids of H x W cells with H, W uniform in
    [``grid_min``, ``grid_max``]; ``tissue_min``..``tissue_max``: accepted tissue fraction of the grid.
    Tiles: Fashion-MNIST class indices (:data:`mamba2d.data.images.FMNIST_CLASSES`) for
    ``lesion_class``, ``decoy_class`` and ``background_classes``; ``pool_per_class`` unique images
    per class and image split (the cap on encoder work). Lesion count k is uniform in
    [``lesion_min``, ``lesion_max``] for every class; with probability ``decoy_prob`` a slide also
    holds a decoy group of the same count distribution in a random one of the three patterns.
    ``patch_size_level0``: pixels per cell in the written coords. ``encoder_input_size``: the side
    tiles are resized to for the default encoder. Survival: ``survival_scale_months``,
    ``survival_beta``, ``survival_shape`` (Weibull), ``survival_levels`` (how many distinct cluster
    fractions; 0 = continuous) and the target ``censoring_rate``.
    ``fmnist_dir``: where Fashion-MNIST is (None: the usual places); not part of the identity.
    """

    task: Literal["classification", "survival"] = "classification"
    n_train: int = 240
    n_val: int = 60
    n_test: int = 120
    grid_min: int = 16
    grid_max: int = 28
    seed: int = 0
    fmnist_dir: str | None = None
    encoder_input_size: int = 112
    lesion_min: int = 6
    lesion_max: int = 9
    lesion_class: int = 5  # Sandal: linearly separable from the clothing background (probe ~100 %)
    decoy_class: int = 8  # Bag: distinct from both, so "any odd-looking cluster" is not the rule
    background_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 6)
    decoy_prob: float = 0.0
    pool_per_class: int = 250
    tissue_min: float = 0.35
    tissue_max: float = 0.85
    patch_size_level0: int = 224
    survival_scale_months: float = 150.0
    survival_beta: float = 3.0
    survival_shape: float = 1.5
    survival_levels: int = 3
    censoring_rate: float = 0.4

    def __post_init__(self) -> None:
        # JSON round trips give lists; the identity must not depend on that.
        object.__setattr__(self, "background_classes", tuple(int(c) for c in self.background_classes))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BenchmarkConfig:
        """A named configuration from :data:`PRESETS` (``demo``, ``full``) with field overrides."""
        if name not in PRESETS:
            raise BenchmarkError(f"no benchmark preset {name!r}; presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides).validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchmarkConfig:
        """Rebuild from :meth:`to_dict` output (e.g. ``benchmark.json["config"]``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BenchmarkError(f"unknown benchmark config field(s): {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON types."""
        out = dataclasses.asdict(self)
        out["background_classes"] = list(self.background_classes)
        return out

    def identity(self) -> dict[str, Any]:
        """The fields that change the benchmark (everything but where the images are read from)."""
        out = self.to_dict()
        out.pop("fmnist_dir")
        out["version"] = BENCHMARK_VERSION
        return out

    def digest(self) -> str:
        """A 12-hex-digit hash of :meth:`identity`, for cache folder names."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def n_slides(self) -> dict[str, int]:
        """Slides per part, e.g. ``{"train": 240, "val": 60, "test": 120}``."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def validate(self) -> BenchmarkConfig:
        """Raise :class:`BenchmarkError` naming the first invalid field; returns self."""
        def fail(msg: str) -> None:
            raise BenchmarkError(f"benchmark config: {msg}")

        if self.task not in _TASK_CODE:
            fail(f"task must be 'classification' or 'survival', got {self.task!r}")
        for name in ("n_train", "n_val", "n_test", "grid_min", "grid_max", "seed", "lesion_min", "lesion_max",
                     "pool_per_class", "patch_size_level0", "encoder_input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                fail(f"{name} must be a non-negative int, got {value!r}")
        if self.n_train < len(CLASS_NAMES):
            fail(f"n_train must be at least {len(CLASS_NAMES)} (one slide per class), got {self.n_train}")
        if self.lesion_min < 3:
            # Two tiles cannot tell a cluster from a line, and a 3-tile cluster must be an L.
            fail(f"lesion_min must be >= 3, got {self.lesion_min}")
        if self.lesion_max < self.lesion_min:
            fail(f"lesion_max ({self.lesion_max}) < lesion_min ({self.lesion_min})")
        # Empirical bounds under which tissue masks fitting every pattern are found quickly.
        if self.grid_min < self.lesion_max + 7 or 0.6 * self.grid_min ** 2 < 12 * self.lesion_max + 10:
            fail(f"grid_min ({self.grid_min}) is too small for lesion_max {self.lesion_max}: need "
                 f"grid_min >= lesion_max + 7 and 0.6 grid_min^2 >= 12 lesion_max + 10")
        if not self.grid_min <= self.grid_max <= 128:
            fail(f"need grid_min <= grid_max <= 128, got {self.grid_min}..{self.grid_max}")
        if not 0.1 <= self.tissue_min < self.tissue_max <= 0.95:
            fail(f"need 0.1 <= tissue_min < tissue_max <= 0.95, got {self.tissue_min}..{self.tissue_max}")
        classes = [self.lesion_class, self.decoy_class, *self.background_classes]
        if not self.background_classes or len(set(classes)) != len(classes):
            fail(f"lesion_class, decoy_class and background_classes must be distinct, got {classes}")
        if any(not 0 <= c < len(FMNIST_CLASSES) for c in classes):
            fail(f"image classes must be in 0..{len(FMNIST_CLASSES) - 1}, got {classes}")
        if not 0.0 <= self.decoy_prob <= 1.0:
            fail(f"decoy_prob must be in [0, 1], got {self.decoy_prob}")
        if self.pool_per_class < 1 or self.patch_size_level0 < 1:
            fail("pool_per_class and patch_size_level0 must be positive")
        if not 0.05 <= self.censoring_rate <= 0.9:
            fail(f"censoring_rate must be in [0.05, 0.9], got {self.censoring_rate}")
        if self.survival_levels == 1 or self.survival_levels < 0:
            fail(f"survival_levels must be 0 (continuous) or at least 2, got {self.survival_levels}")
        if min(self.survival_scale_months, self.survival_beta, self.survival_shape) <= 0:
            fail("survival_scale_months, survival_beta and survival_shape must be positive")
        return self


#: ``demo`` (the defaults): 420 slides of 16..28 cells a side, 6..9 lesion tiles, no decoys, built
#: in under a minute on 2 CPU cores. ``hard``: grids up to 48 cells, 4..9 lesions, and a decoy group
#: in half the slides. ``full``: ``hard`` with twice the slides and grids up to 64 cells.
PRESETS: dict[str, BenchmarkConfig] = {
    "demo": BenchmarkConfig(),
    "hard": BenchmarkConfig(grid_max=48, lesion_min=4, decoy_prob=0.5),
    "full": BenchmarkConfig(n_train=480, n_val=120, n_test=240, grid_min=16, grid_max=64, lesion_min=4,
                            decoy_prob=0.5, pool_per_class=500),
}


def _cache_root() -> Path:
    env = os.environ.get("MAMBA2D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mamba2d"


def default_benchmark_dir(config: BenchmarkConfig | None = None) -> Path:
    """``$MAMBA2D_CACHE/benchmark-<digest>`` (default cache ``~/.cache/mamba2d``) for ``config``
    (default: the demo config). The digest covers every field but ``fmnist_dir``."""
    config = config if config is not None else BenchmarkConfig()
    return _cache_root() / f"benchmark-{config.validate().digest()}"


# --------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True, eq=False)
class SlideLayout:
    """One slide's grid. Arrays are (H, W), row 0 at the top.

    ``kind``: int8 :data:`NO_TISSUE` (-1), :data:`BACKGROUND` (0), :data:`LESION` (1), :data:`DECOY` (2).
    ``image_class``: int64 source-image class of each tissue cell, -1 off tissue.
    ``pattern``: the lesion arrangement (a :data:`CLASS_NAMES` entry, or ``cluster+scattered`` for
    survival). ``largest_cluster``: size of the largest 4-connected lesion component.
    ``compactness``: survival risk r = (largest_cluster - 1) / (n_lesion - 1) in [0, 1].
    """

    kind: np.ndarray
    image_class: np.ndarray
    pattern: str
    n_lesion: int
    largest_cluster: int
    compactness: float
    decoy_pattern: str
    n_decoy: int

    @property
    def tissue(self) -> np.ndarray:
        """(H, W) bool tissue mask."""
        return self.kind != NO_TISSUE

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) in cells."""
        return int(self.kind.shape[0]), int(self.kind.shape[1])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _tissue_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) bool: a union of 2-5 lobed, rotated ellipses with ragged edges and 1+ enclosed holes.

    Not yet checked for size; :func:`_accept_mask` decides.
    """
    y = (np.arange(h)[:, None] + 0.5) / h
    x = (np.arange(w)[None, :] + 0.5) / w
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        ry, rx = rng.uniform(0.15, 0.42, 2)
        theta = rng.uniform(0.0, math.pi)
        u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
        v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
        rho = np.hypot(u / rx, v / ry)
        ang = np.arctan2(v / ry, u / rx)
        # Low-order harmonics of the angle make the outline lobed rather than elliptic.
        lobes = 1.0 + sum(rng.uniform(0.0, 0.18) * np.cos(m * ang + rng.uniform(0, 2 * math.pi))
                          for m in (2, 3, 4))
        mask |= rho <= lobes
    # Ragged outer edge: drop a random quarter of the boundary cells.
    interior = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    edge = mask & ~interior
    mask &= ~(edge & (rng.random((h, w)) < 0.25))
    # Holes: discs strictly inside tissue, at least 2.5 cells from any non-tissue cell so they stay
    # enclosed even under 8-connectivity.
    n_holes = 1 + int(rng.integers(0, 2 + (h * w) // 800))
    for _ in range(n_holes):
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        radius = rng.uniform(0.8, 2.6)
        cand = np.argwhere(dist >= radius + 2.5)
        if len(cand) == 0:
            radius = 0.8
            cand = np.argwhere(dist >= radius + 2.5)
            if len(cand) == 0:
                break
        r0, c0 = cand[rng.integers(len(cand))]
        rr, cc = np.ogrid[:h, :w]
        mask &= (rr - r0) ** 2 + (cc - c0) ** 2 > radius ** 2
    return mask


def enclosed_holes(tissue: np.ndarray) -> int:
    """Number of non-tissue components (8-connected) not touching the grid border."""
    lab, n = ndimage.label(~tissue, structure=np.ones((3, 3), bool))
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
    return n - len(border)


def _has_vertical_run(free: np.ndarray, length: int) -> bool:
    """Whether some column holds ``length`` consecutive True cells."""
    if length > free.shape[0]:
        return False
    csum = np.vstack([np.zeros((1, free.shape[1]), np.int64), np.cumsum(free, axis=0)])
    return bool((csum[length:] - csum[:-length] == length).any())


def _accept_mask(mask: np.ndarray, config: BenchmarkConfig) -> bool:
    """A mask is used only if every pattern fits on it, so whether it is accepted never depends on
    the class (which would make tissue size a class cue)."""
    frac = float(mask.mean())
    if not config.tissue_min <= frac <= config.tissue_max:
        return False
    # 9 k + 1 cells guarantee a greedy scattered placement; the margin leaves room for decoys.
    if int(mask.sum()) < 12 * config.lesion_max + 10:
        return False
    if enclosed_holes(mask) < 1:
        return False
    need = config.lesion_max + 2
    return _has_vertical_run(mask, need) and int(_chain_lengths(mask).max()) >= need


def _background_classes(rng: np.random.Generator, h: int, w: int, classes: Sequence[int]) -> np.ndarray:
    """(h, w) int64 background image class: Voronoi "tissue regions", each dominated (80 %) by one
    class, so the background has 2D structure that is unrelated to the label."""
    n_regions = int(rng.integers(3, 8))
    seeds = rng.uniform(0, 1, (n_regions, 2)) * (h, w)
    dominant = rng.choice(np.asarray(classes), n_regions)
    rr, cc = np.mgrid[:h, :w]
    d2 = (rr[..., None] + 0.5 - seeds[:, 0]) ** 2 + (cc[..., None] + 0.5 - seeds[:, 1]) ** 2
    out = dominant[np.argmin(d2, axis=-1)]
    mixed = rng.random((h, w)) < 0.2
    out[mixed] = rng.choice(np.asarray(classes), int(mixed.sum()))
    return out.astype(np.int64)


def _dilate8(cells: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool))


def _place_scattered(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """(H, W) bool with k free cells, no two 8-adjacent (greedy over a random order), or None."""
    h, w = free.shape
    cells = np.argwhere(free)
    taken = np.zeros((h + 2, w + 2), dtype=bool)  # padded, so a cell's 3x3 block never leaves it
    out = np.zeros((h, w), dtype=bool)
    n = 0
    for idx in rng.permutation(len(cells)):
        r, c = cells[idx]
        if taken[r:r + 3, c:c + 3].any():
            continue
        taken[r + 1, c + 1] = True
        out[r, c] = True
        n += 1
        if n == k:
            return out
    return None


#: Column steps between the rows of a scattered chain: never 0 or +-1 (that would touch). Wider steps
#: make the raster-order gaps vary more than a line's, a cue for 1D models (a gradient-boosting probe
#: on exact sequence gaps: 73 % with +-2, 77 % with +-2..3, 82 % with +-2..4, 88 % with +-2..6).
_CHAIN_STEPS = np.asarray([-3, -2, 2, 3])


def _chain_lengths(free: np.ndarray) -> np.ndarray:
    """(H, W) int: the longest scattered chain starting at each free cell and going down one row at
    a time, each step moving 2-3 columns sideways over free cells (0 off ``free``)."""
    h, w = free.shape
    pad = int(np.abs(_CHAIN_STEPS).max())
    out = np.zeros((h, w + 2 * pad), np.int64)
    out[h - 1, pad:pad + w] = free[h - 1]
    for r in range(h - 2, -1, -1):
        below = np.max([out[r + 1, pad + d:pad + d + w] for d in _CHAIN_STEPS], axis=0)
        out[r, pad:pad + w] = free[r] * (1 + below)
    return out[:, pad:pad + w]


def _place_chain(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """(H, W) bool: the ``scattered`` class, k free cells on k consecutive rows, one per row, each
    2-3 columns left or right of the one above (so no two are 8-adjacent), or None if none fits.

    Why so constrained: in raster order, consecutive lesions are then one tissue row apart, exactly as
    in a vertical line; the only difference from the line is the sideways step, i.e. whether the
    tiles touch vertically, which a 1D scan cannot see without knowing each row's tissue length.
    """
    h, w = free.shape
    length = _chain_lengths(free)
    starts = np.argwhere(length >= k)
    if len(starts) == 0:
        return None
    r, c = starts[rng.integers(len(starts))]
    out = np.zeros((h, w), dtype=bool)
    out[r, c] = True
    for j in range(1, k):
        cols = c + _CHAIN_STEPS
        ok = (cols >= 0) & (cols < w)
        cols = cols[ok]
        cols = cols[length[r + j, cols] >= k - j]  # only steps from which the chain can still finish
        c = int(cols[rng.integers(len(cols))])
        out[r + j, c] = True
    return out


def _place_cluster(rng: np.random.Generator, free: np.ndarray, k: int, min_side: int) -> np.ndarray | None:
    """(H, W) bool: a compact 4-connected blob of k free cells, or None.

    Grown from a random seed cell by always adding the frontier cell with most 4-neighbours already in
    the blob (ties broken at random), so it stays near-square; kept only if its bounding box is at
    most ceil(sqrt(k)) + 1 and at least ``min_side`` on each side.
    """
    h, w = free.shape
    cells = np.argwhere(free)
    if len(cells) == 0:
        return None
    limit = math.isqrt(k - 1) + 2 if k > 1 else 1  # ceil(sqrt(k)) + 1
    for _ in range(_MAX_PLACE_TRIES):
        blob = np.zeros((h, w), dtype=bool)
        blob[tuple(cells[rng.integers(len(cells))])] = True
        for _ in range(k - 1):
            p = np.pad(blob, 1).astype(np.int8)
            nbrs = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
            frontier = np.argwhere(free & ~blob & (nbrs > 0))
            if len(frontier) == 0:
                break
            score = nbrs[frontier[:, 0], frontier[:, 1]] + rng.uniform(0.0, 0.9, len(frontier))
            blob[tuple(frontier[int(np.argmax(score))])] = True
        if int(blob.sum()) != k:
            continue
        rows, cols = np.nonzero(blob)
        sides = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
        if min(sides) >= min(min_side, k) and max(sides) <= limit:
            return blob
    return None


def _place_line(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """(H, W) bool: k free cells in one column on consecutive rows (uniform over all such), or None."""
    h, w = free.shape
    csum = np.vstack([np.zeros((1, w), np.int64), np.cumsum(free, axis=0)])
    starts = np.argwhere(csum[k:] - csum[:-k] == k)  # (row of the top cell, column)
    if len(starts) == 0:
        return None
    r0, c0 = starts[rng.integers(len(starts))]
    out = np.zeros((h, w), dtype=bool)
    out[r0:r0 + k, c0] = True
    return out


def _place_pattern(rng: np.random.Generator, free: np.ndarray, k: int, pattern: str) -> np.ndarray | None:
    for _ in range(_MAX_PLACE_TRIES):
        if pattern == "scattered":
            out = _place_chain(rng, free, k)
        elif pattern == "cluster":
            out = _place_cluster(rng, free, k, min_side=2)
        else:
            out = _place_line(rng, free, k)
        if out is not None:
            return out
    return None


def largest_component(cells: np.ndarray) -> int:
    """Size of the largest 4-connected component of a (H, W) bool array (0 if empty)."""
    lab, n = ndimage.label(cells)
    return int(np.bincount(lab.ravel())[1:].max()) if n else 0


def sample_layout(config: BenchmarkConfig, key: Sequence[int], label: int | None = None) -> SlideLayout:
    """One slide's layout from the random stream ``key`` (e.g. ``(seed, task, part, index)``).

    ``label``: the class (classification) or None (survival: the compactness is drawn here).
    Everything but the lesion (and then decoy) placement is drawn before the label is looked at,
    so the same key with another label gives the same grid, tissue, background and lesion count.
    """
    rng = _rng(_S_LAYOUT, *key)
    h, w = (int(v) for v in rng.integers(config.grid_min, config.grid_max + 1, 2))
    for _ in range(_MAX_MASK_TRIES):
        tissue = _tissue_mask(rng, h, w)
        if _accept_mask(tissue, config):
            break
    else:
        raise BenchmarkError(f"no acceptable tissue mask for a {h} x {w} grid after {_MAX_MASK_TRIES} "
                             f"tries; raise grid_min or lower lesion_max / tissue_min")
    image_class = np.where(tissue, _background_classes(rng, h, w, config.background_classes), -1)
    k = int(rng.integers(config.lesion_min, config.lesion_max + 1))
    has_decoy = bool(rng.random() < config.decoy_prob)
    k_decoy = int(rng.integers(config.lesion_min, config.lesion_max + 1))
    decoy_pattern = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    u = float(rng.random())

    if label is None:
        # Survival: a cluster of s lesion tiles plus k - s scattered ones, none touching the cluster.
        frac = u if config.survival_levels == 0 else (
            min(int(u * config.survival_levels), config.survival_levels - 1) / (config.survival_levels - 1))
        s = 1 + int(round(frac * (k - 1)))
        lesion = None
        for _ in range(_MAX_PLACE_TRIES):
            blob = _place_cluster(rng, tissue, s, min_side=1)
            if blob is None:
                continue
            rest = _place_scattered(rng, tissue & ~_dilate8(blob), k - s) if k > s else np.zeros_like(blob)
            if rest is not None:
                lesion = blob | rest
                break
        pattern = "cluster+scattered"
    else:
        if not 0 <= label < len(CLASS_NAMES):
            raise BenchmarkError(f"label must be in 0..{len(CLASS_NAMES) - 1}, got {label}")
        pattern = CLASS_NAMES[label]
        lesion = _place_pattern(rng, tissue, k, pattern)
    if lesion is None:
        raise BenchmarkError(f"could not place {k} lesion tiles as {pattern} on a {h} x {w} slide "
                             f"(key {tuple(key)})")

    kind = np.where(tissue, BACKGROUND, NO_TISSUE).astype(np.int8)
    kind[lesion] = LESION
    n_decoy = 0
    if has_decoy:
        # Decoys keep one cell clear of every lesion, so they never change the lesions' adjacency.
        free = tissue & ~_dilate8(lesion)
        decoy = _place_pattern(rng, free, k_decoy, decoy_pattern)
        if decoy is None:  # rare on tiny grids; loosely scattered decoys fit when anything does
            decoy_pattern = "loose"
            decoy = _place_scattered(rng, free, k_decoy)
        if decoy is not None:
            kind[decoy] = DECOY
            n_decoy = k_decoy
    if n_decoy == 0:
        decoy_pattern = "none"
    largest = largest_component(lesion)
    return SlideLayout(kind=kind, image_class=image_class, pattern=pattern, n_lesion=k,
                       largest_cluster=largest, compactness=(largest - 1) / (k - 1),
                       decoy_pattern=decoy_pattern, n_decoy=n_decoy)


# --------------------------------------------------------------------------------------------------
# Survival


def _weibull_times(rng: np.random.Generator, risk: np.ndarray, config: BenchmarkConfig) -> np.ndarray:
    """Event times in months for risks (n,) in [0, 1]: scale * exp(-beta r) * Weibull(shape)."""
    return (config.survival_scale_months * np.exp(-config.survival_beta * risk)
            * rng.weibull(config.survival_shape, risk.shape))


@functools.lru_cache(maxsize=16)
def _censoring_horizon(config: BenchmarkConfig) -> float:
    """c_max (months) such that censoring times uniform on [0, c_max] censor ``censoring_rate`` of
    slides in expectation, found on a fixed Monte-Carlo sample of the risk and time model."""
    rng = _rng(_S_SURV, 0xC0FFEE)
    n = 100_000
    k = rng.integers(config.lesion_min, config.lesion_max + 1, n)
    s = 1 + np.round(rng.random(n) * (k - 1))
    times = _weibull_times(rng, (s - 1) / (k - 1), config)

    def censored(c: float) -> float:  # P(C < T) with C ~ U(0, c) is E[min(T, c)] / c
        return float(np.minimum(times, c).mean() / c)

    lo, hi = 1e-6, float(times.max()) * 1e3
    for _ in range(100):  # censored() decreases in c
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if censored(mid) > config.censoring_rate else (lo, mid)
    return math.sqrt(lo * hi)


def survival_outcome(config: BenchmarkConfig, key: Sequence[int],
                     compactness: float) -> tuple[float, int, float]:
    """(observed months, censorship 1 = censored, true event months) of one slide.

    The event time depends only on ``compactness`` r; the censoring time is U(0, c_max), independent
    of it. Observed times are rounded to 0.01 month (at least 0.01).
    """
    rng = _rng(_S_SURV, *key)
    event = float(_weibull_times(rng, np.asarray([compactness]), config)[0])
    cens = float(rng.uniform(0.0, _censoring_horizon(config)))
    observed = max(round(min(event, cens), 2), 0.01)
    return observed, int(cens < event), event


# --------------------------------------------------------------------------------------------------
# Images and features


@dataclass(frozen=True, eq=False)
class _Source:
    """The image source actually used: (N, s, s) uint8 images and (N,) labels per image split."""

    key: str  # "fmnist" or "digits", used in cache names
    name: str
    folder: str | None
    images: dict[str, np.ndarray] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)

    @property
    def tile_size(self) -> int:
        return int(self.images["train"].shape[1])


def _source_key(fmnist_dir: str | None) -> tuple[str, Path | None]:
    folder = find_fashion_mnist(fmnist_dir)
    return ("fmnist", folder) if folder is not None else ("digits", None)


@functools.lru_cache(maxsize=4)
def _load_split(key: str, folder: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    if key == "fmnist":
        return load_fashion_mnist(folder, split)
    images, labels = load_digits_images()
    # The digits have no official split: a fixed one (every 4th image is test) keeps them apart.
    test = np.arange(len(images)) % _DIGITS_TEST_EVERY == 0
    pick = test if split == "test" else ~test
    return images[pick], labels[pick]


def _load_source(fmnist_dir: str | None, *, warn: bool = True) -> _Source:
    key, folder = _source_key(fmnist_dir)
    if key == "digits" and warn:
        warnings.warn("Fashion-MNIST was not found (fmnist_dir, $MAMBA2D_FMNIST_DIR, "
                      "/usr/share/datasets/fashion-mnist): FALLING BACK to scikit-learn's 8x8 digits. "
                      "This benchmark is not comparable to one built from Fashion-MNIST; install "
                      "Debian's 'dataset-fashion-mnist' or pass fmnist_dir", UserWarning, stacklevel=3)
    name = "fashion-mnist" if key == "fmnist" else "sklearn-digits"
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = _load_split(key, str(folder) if folder else None, split)
    return _Source(key=key, name=name, folder=str(folder) if folder else None, images=images, labels=labels)


def _image_pools(config: BenchmarkConfig, source: _Source) -> dict[str, dict[int, np.ndarray]]:
    """Per image split, per used class: the sorted (pool,) indices of images slides may show."""
    classes = sorted({config.lesion_class, config.decoy_class, *config.background_classes})
    pools: dict[str, dict[int, np.ndarray]] = {}
    for code, split in enumerate(("train", "test")):
        rng = _rng(_S_POOL, config.seed, code)
        pools[split] = {}
        for cls in classes:
            cand = np.flatnonzero(source.labels[split] == cls)
            if len(cand) == 0:
                raise BenchmarkError(f"{source.name} {split} has no images of class {cls}")
            n = min(config.pool_per_class, len(cand))
            pools[split][cls] = np.sort(rng.choice(cand, n, replace=False))
    return pools


def _encoder_tag(encoder: Any) -> str:
    tag = getattr(encoder, "cache_tag", None)
    if tag is None:
        size = getattr(encoder, "input_size", None)
        tag = type(encoder).__name__.lower() + (f"_{size}" if size is not None else "")
    return str(tag)


def _check_cache(obj: Any, key: str, split: str, tag: str) -> bool:
    if not isinstance(obj, dict):
        return False
    if (obj.get("source"), obj.get("split"), obj.get("encoder")) != (key, split, tag):
        return False
    idx, feats = obj.get("indices"), obj.get("features")
    return (isinstance(idx, torch.Tensor) and isinstance(feats, torch.Tensor) and idx.dim() == 1
            and feats.dim() == 2 and feats.shape[0] == idx.shape[0]
            and bool((idx[1:] > idx[:-1]).all()))


def _cached_features(path: Path, indices: np.ndarray, images: np.ndarray, get_encoder: Any, *, key: str,
                     split: str, tag: str, progress: bool) -> tuple[np.ndarray, float]:
    """(len(indices), D) float32 features of ``images[indices]`` (indices sorted, unique), read from
    ``path`` where cached; missing ones are encoded and added to the cache. Also the seconds spent
    encoding."""
    have_idx = np.zeros(0, np.int64)
    have_feat: np.ndarray | None = None
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{path}: unreadable feature cache ({type(exc).__name__}); re-encoding",
                          stacklevel=3)
            obj = None
        if obj is not None and _check_cache(obj, key, split, tag):
            have_idx = obj["indices"].numpy().astype(np.int64)
            have_feat = obj["features"].numpy().astype(np.float32)
        elif obj is not None:
            warnings.warn(f"{path}: feature cache for another source/split/encoder; re-encoding",
                          stacklevel=3)
    missing = np.setdiff1d(indices, have_idx)
    seconds = 0.0
    if len(missing):
        encoder = get_encoder()
        start = time.perf_counter()
        chunks = []
        step = 256
        bar = tqdm(total=len(missing), desc=f"encoding {key} {split}", unit="img", disable=not progress)
        for i in range(0, len(missing), step):
            out = encoder.encode(images[missing[i:i + step]], batch_size=64)
            chunks.append(torch.as_tensor(out).detach().float().cpu().numpy())
            bar.update(len(missing[i:i + step]))
        bar.close()
        seconds = time.perf_counter() - start
        new = np.concatenate(chunks)
        if new.ndim != 2 or new.shape[0] != len(missing):
            raise BenchmarkError(f"encoder returned {new.shape} for {len(missing)} images; expected (N, D)")
        if have_feat is not None and have_feat.shape[1] != new.shape[1]:
            raise BenchmarkError(f"{path}: cached features have D={have_feat.shape[1]}, encoder gives "
                                 f"{new.shape[1]}")
        all_idx = np.concatenate([have_idx, missing])
        all_feat = new if have_feat is None else np.concatenate([have_feat, new])
        order = np.argsort(all_idx, kind="stable")
        have_idx, have_feat = all_idx[order], np.ascontiguousarray(all_feat[order])
        state = {"source": key, "split": split, "encoder": tag, "indices": torch.from_numpy(have_idx),
                 "features": torch.from_numpy(have_feat)}
        # Saved through a buffer: torch.save names the zip's inner folder after the (random) temporary
        # file, so writing it directly would make equal caches differ byte-wise.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    assert have_feat is not None
    return have_feat[np.searchsorted(have_idx, indices)], seconds


# --------------------------------------------------------------------------------------------------
# Building


def _slide_ids(config: BenchmarkConfig) -> dict[str, list[str]]:
    return {part: [f"{part}_{i:04d}" for i in range(n)] for part, n in config.n_slides.items()}


def _labels_for(config: BenchmarkConfig, part: str) -> np.ndarray:
    """(n,) balanced class labels of a part, in a seeded random order."""
    n = config.n_slides[part]
    return _rng(_S_LABELS, config.seed, _PART_CODE[part]).permutation(np.arange(n) % len(CLASS_NAMES))


def _slide_images(layout: SlideLayout, pools: dict[int, np.ndarray], key: Sequence[int],
                  config: BenchmarkConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raster-order (row-major) tissue cells of a slide: (N, 2) int64 (row, col), (N,) int64 image
    indices into the image split, and (N,) int8 kinds."""
    rng = _rng(_S_IMAGES, *key)
    cells = np.argwhere(layout.tissue)
    kinds = layout.kind[cells[:, 0], cells[:, 1]]
    cls = layout.image_class[cells[:, 0], cells[:, 1]].copy()
    cls[kinds == LESION] = config.lesion_class
    cls[kinds == DECOY] = config.decoy_class
    image_index = np.empty(len(cells), np.int64)
    for c in sorted(pools):
        sel = np.flatnonzero(cls == c)
        image_index[sel] = pools[c][rng.integers(len(pools[c]), size=len(sel))]
    return cells.astype(np.int64), image_index, kinds.astype(np.int8)


def _write_slide(path: Path, features: np.ndarray, cells: np.ndarray, image_index: np.ndarray,
                 kinds: np.ndarray, layout: SlideLayout, image_split: str, source: _Source,
                 config: BenchmarkConfig) -> None:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float32, copy=False))
            # TRIDENT coords: level-0 (x, y) of each patch's top-left corner, x = column.
            coords = f.create_dataset("coords", data=cells[:, ::-1] * config.patch_size_level0)
            coords.attrs["patch_size_level0"] = config.patch_size_level0
            coords.attrs["patch_size"] = config.patch_size_level0
            coords.attrs["level0_magnification"] = 20.0
            coords.attrs["target_magnification"] = 20.0
            idx = f.create_dataset("image_index", data=image_index)
            idx.attrs["image_split"] = image_split
            f.create_dataset("is_lesion", data=kinds == LESION)
            f.create_dataset("tile_kind", data=kinds)
            f.attrs["image_split"] = image_split
            f.attrs["image_source"] = source.name
            f.attrs["tile_size"] = source.tile_size
            f.attrs["grid_shape"] = np.asarray(layout.shape, np.int64)

    atomic_write(path, write)


def _identity(config: BenchmarkConfig, source_key: str, tag: str) -> dict[str, Any]:
    return {"config": config.identity(), "image_source": source_key, "encoder": tag}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in ("image_source", "encoder"):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    oc, nc = old.get("config", {}), new.get("config", {})
    for key in sorted(set(oc) | set(nc)):
        if oc.get(key) != nc.get(key):
            out.append(f"{key}: {oc.get(key)!r} -> {nc.get(key)!r}")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"{path}: unreadable ({exc}); delete the folder to rebuild it") from exc
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{path}: not a benchmark description")
    return obj


_MARKER = "build-config.json"
_OWN = {_MARKER, "benchmark.json", "labels.csv", "splits.csv", "slides.csv", "features", "cache"}


def _check_folder(out_dir: Path, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The finished benchmark.json if ``out_dir`` holds this benchmark complete, None if it is to be
    (re)built here; :class:`BenchmarkError` if it holds a different benchmark or foreign files."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise BenchmarkError(f"{out_dir}: exists and is not a folder")
    for name in ("benchmark.json", _MARKER):
        path = out_dir / name
        if path.is_file():
            old = _read_json(path)
            old_ident = old.get("identity", {})
            diff = _differences(old_ident, ident)
            if diff:
                raise BenchmarkError(f"{out_dir} holds a benchmark built with a different configuration ("
                                     + "; ".join(diff) + "); choose another folder or delete this one")
            if name == "benchmark.json" and all((out_dir / f).is_file() for f in old.get("slide_files", [])):
                return old
            return None  # same config, unfinished (or files deleted): resume
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN)
    if foreign:
        raise BenchmarkError(f"{out_dir}: not empty and not a benchmark folder (holds {foreign[:5]}); "
                             f"refusing to write into it")
    return None


def build_benchmark(out_dir: str | Path, config: BenchmarkConfig | None = None, *,
                    encoder: TileEncoder | None = None, progress: bool = True,
                    cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Build (or reuse, or finish) the benchmark described by ``config`` in ``out_dir``.

    ``encoder``: tile encoder (see :class:`TileEncoder`); None builds
    :class:`ResizedEfficientNetLite0Encoder` at ``config.encoder_input_size``, only if some image
    still needs encoding. ``cache_dir``: feature cache folder (default ``out_dir/cache``); several
    benchmarks may share one. Returns the content of ``benchmark.json``.

    A folder already holding this benchmark is returned as is; one holding an unfinished build of
    it is resumed (slides already written are kept); one holding another benchmark or other files
    raises :class:`BenchmarkError`. Every file is written atomically.
    """
    config = (config if config is not None else BenchmarkConfig()).validate()
    out_dir = Path(out_dir)
    if encoder is None:
        tag = str(config.encoder_input_size)
    else:
        if isinstance(encoder, EfficientNetLite0Encoder) and encoder.input_size != config.encoder_input_size:
            raise BenchmarkError(f"encoder input_size {encoder.input_size} != config.encoder_input_size "
                                 f"{config.encoder_input_size}")
        tag = _encoder_tag(encoder)
    source_key, _ = _source_key(config.fmnist_dir)
    ident = _identity(config, source_key, tag)
    done = _check_folder(out_dir, ident)
    if done is not None:
        return done

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / _MARKER, {"identity": ident, "config": config.to_dict()})
    source = _load_source(config.fmnist_dir)
    pools = _image_pools(config, source)
    ids = _slide_ids(config)
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"

    built: list[EfficientNetLite0Encoder] = []

    def get_encoder() -> Any:
        if encoder is not None:
            return encoder
        if not built:
            built.append(ResizedEfficientNetLite0Encoder(input_size=config.encoder_input_size))
        return built[0]

    pool_feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    encode_seconds = [0.0]

    def features_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        # Lazy: a resumed build whose slides are all written needs no features (nor the encoder).
        if split not in pool_feats:
            indices = np.unique(np.concatenate(list(pools[split].values())))
            feats, sec = _cached_features(cache / f"{source.key}_{split}_{tag}.pt", indices,
                                          source.images[split], get_encoder, key=source.key, split=split,
                                          tag=tag, progress=progress)
            pool_feats[split] = (indices, feats)
            encode_seconds[0] += sec
        return pool_feats[split]

    task_code = _TASK_CODE[config.task]
    rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(config.n_slides.values()), desc="slides", unit="slide", disable=not progress)
    write_start = time.perf_counter()
    for part in PARTS:
        labels = _labels_for(config, part) if config.task == "classification" else None
        split = IMAGE_SPLIT[part]
        for i, slide_id in enumerate(ids[part]):
            key = (config.seed, task_code, _PART_CODE[part], i)
            label = int(labels[i]) if labels is not None else None
            layout = sample_layout(config, key, label)
            cells, image_index, kinds = _slide_images(layout, pools[split], key, config)
            path = out_dir / "features" / f"{slide_id}.h5"
            if not path.is_file():  # written atomically, so an existing file is complete
                idx, feats = features_of(split)
                _write_slide(path, feats[np.searchsorted(idx, image_index)], cells, image_index, kinds,
                             layout, split, source, config)
            row: dict[str, Any] = {
                "slide_id": slide_id, "part": part, "image_split": split, "pattern": layout.pattern,
                "n_lesion": layout.n_lesion, "largest_cluster": layout.largest_cluster,
                "compactness": round(layout.compactness, 6), "decoy_pattern": layout.decoy_pattern,
                "n_decoy": layout.n_decoy, "grid_h": layout.shape[0], "grid_w": layout.shape[1],
                "n_patches": len(cells),
            }
            if label is not None:
                row["label"] = label
                label_rows.append({"case_id": slide_id, "slide_id": slide_id, "label": label})
            else:
                observed, censored, event = survival_outcome(config, key, layout.compactness)
                row.update(event_months=round(event, 4), survival_months=observed, censorship=censored)
                label_rows.append({"case_id": slide_id, "slide_id": slide_id,
                                   "survival_months": f"{observed:.2f}", "censorship": censored})
            rows.append(row)
            bar.update(1)
    bar.close()
    # Features are encoded lazily inside the slide loop; report writing without them.
    write_seconds = time.perf_counter() - write_start - encode_seconds[0]

    slides = pd.DataFrame(rows)
    write_text(out_dir / "labels.csv", pd.DataFrame(label_rows).to_csv(index=False))
    width = max(config.n_slides.values())
    split_frame = pd.DataFrame({p: ids[p] + [""] * (width - len(ids[p])) for p in PARTS})
    write_text(out_dir / "splits.csv", split_frame.to_csv())
    write_text(out_dir / "slides.csv", slides.to_csv(index=False))

    if encoder is None or isinstance(encoder, EfficientNetLite0Encoder):
        enc_info = {"cache_tag": tag, "name": "efficientnet-lite0 (ImageNet weights)",
                    "input_size": config.encoder_input_size}
    else:
        enc_info = {"cache_tag": tag, "name": type(encoder).__name__,
                    "input_size": getattr(encoder, "input_size", None)}
    info = _summary(config, ident, source, pools, slides, enc_info)
    info["timing"] = {"build_seconds": round(time.perf_counter() - start, 2),
                      "encode_seconds": round(encode_seconds[0], 2), "write_seconds": round(write_seconds, 2),
                      "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    info["cache_dir"] = str(cache)
    info["slide_files"] = [f"features/{s}.h5" for p in PARTS for s in ids[p]]
    write_json(out_dir / "benchmark.json", info)
    return json.loads((out_dir / "benchmark.json").read_text())


def _summary(config: BenchmarkConfig, ident: dict[str, Any], source: _Source,
             pools: dict[str, dict[int, np.ndarray]], slides: pd.DataFrame,
             encoder: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for part in PARTS:
        sub = slides[slides["part"] == part]
        entry: dict[str, Any] = {"slides": len(sub)}
        if len(sub):
            n = sub["n_patches"]
            entry["patches"] = {"min": int(n.min()), "mean": round(float(n.mean()), 1), "max": int(n.max()),
                                "total": int(n.sum())}
        if config.task == "classification" and len(sub):
            entry["per_class"] = {name: int((sub["label"] == c).sum()) for c, name in enumerate(CLASS_NAMES)}
        elif len(sub):
            entry["censoring_rate"] = round(float(sub["censorship"].mean()), 4)
        counts[part] = entry
    class_of = (lambda c: FMNIST_CLASSES[c]) if source.key == "fmnist" else (lambda c: f"digit {c}")
    info: dict[str, Any] = {
        "format": "mamba2d-spatial-benchmark",
        "version": BENCHMARK_VERSION,
        "identity": ident,
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "task": config.task,
        "counts": counts,
        "image_source": {
            "name": source.name, "folder": source.folder, "fallback": source.key != "fmnist",
            "tile_size": source.tile_size,
            "lesion": class_of(config.lesion_class), "decoy": class_of(config.decoy_class),
            "background": [class_of(c) for c in config.background_classes],
            "pool_sizes": {s: int(sum(len(v) for v in pools[s].values())) for s in pools},
            "image_split_of_part": dict(IMAGE_SPLIT),
        },
        "encoder": encoder,
        "files": {"features": "features", "labels": "labels.csv", "splits": "splits.csv",
                  "slides": "slides.csv"},
        "patch_order": "row-major (raster) over tissue cells",
    }
    if config.task == "classification":
        info["class_names"] = list(CLASS_NAMES)
    else:
        info["survival"] = {
            "risk": "r = (s - 1) / (k - 1), s = largest 4-connected lesion cluster, k = lesion count",
            "event_time": "scale * exp(-beta * r) * Weibull(shape), months",
            "censoring": "independent U(0, c_max) censoring times",
            "c_max_months": round(_censoring_horizon(config), 4),
            "censorship": "1 = censored, 0 = event observed",
        }
    return info


# --------------------------------------------------------------------------------------------------
# Reading back


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
    info = _read_json(out_dir / "benchmark.json")
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
        found = find_fashion_mnist(src.get("folder"))
        if found is None:
            raise BenchmarkError(f"Fashion-MNIST (built from {src.get('folder')}) is not found any more")
        folder = str(found)
    images, _ = _load_split(key, folder, split)
    t = images.shape[1]
    canvas = np.full((h * t, w * t), _NON_TISSUE_GREY, dtype=np.uint8)
    cols, rows = coords[:, 0] // size, coords[:, 1] // size
    for r, c, i in zip(rows, cols, index, strict=True):
        canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] = images[i]
    if scale > 1:
        canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    return canvas
