"""One slide's layout: an irregular tissue mask, its background regions, and the lesion (and decoy)
tiles placed by a layout rule (:mod:`mamba2d.bench.rules`).

Everything but the lesion placement is drawn before the label is looked at, so the grid, tissue,
background and lesion count of a slide never depend on its class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mamba2d.bench.config import S_LAYOUT, BenchmarkConfig, BenchmarkError, random_stream
from mamba2d.bench.rules import (
    MAX_PLACE_TRIES,
    RULES,
    compact_blob,
    dilate8,
    largest_component,
    place,
    place_loose,
)

__all__ = ["BACKGROUND", "DECOY", "LESION", "NO_TISSUE", "SlideLayout", "background_regions",
           "enclosed_holes", "sample_layout", "tissue_outline"]

#: Cell kinds in :attr:`SlideLayout.kind`.
NO_TISSUE, BACKGROUND, LESION, DECOY = -1, 0, 1, 2
_MAX_MASK_TRIES = 300


@dataclass(frozen=True, eq=False)
class SlideLayout:
    """One slide's grid. Arrays are (H, W), row 0 at the top.

    ``kind``: int8 :data:`NO_TISSUE` (-1), :data:`BACKGROUND` (0), :data:`LESION` (1), :data:`DECOY` (2).
    ``image_class``: int64 source-image class of each tissue cell, -1 off tissue.
    ``pattern``: the lesion arrangement (a layout rule's name, or ``cluster+scattered`` for
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


def tissue_outline(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) bool: a union of 2-5 lobed, rotated ellipses with a ragged outer edge (no holes yet)."""
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
    return mask


def _tissue_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) bool: :func:`tissue_outline` with 1+ enclosed holes.

    Not yet checked for size; :func:`_accept_mask` decides.
    """
    mask = tissue_outline(rng, h, w)
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


def _accept_mask(mask: np.ndarray, config: BenchmarkConfig) -> bool:
    """A mask is used only if every class's arrangement fits on it, so whether it is accepted never
    depends on the class (which would make tissue size a class cue)."""
    frac = float(mask.mean())
    if not config.tissue_min <= frac <= config.tissue_max:
        return False
    # 9 k + 1 cells guarantee a greedy scattered placement; the margin leaves room for decoys.
    if int(mask.sum()) < 12 * config.lesion_max + 10:
        return False
    if enclosed_holes(mask) < 1:
        return False
    need = config.lesion_max + 2
    return all(RULES[name].fits(mask, need) for name in config.classes if RULES[name].fits is not None)


def background_regions(rng: np.random.Generator, h: int, w: int, classes: Sequence[int]) -> np.ndarray:
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


def _cluster_and_scattered(rng: np.random.Generator, tissue: np.ndarray, k: int, s: int) -> np.ndarray | None:
    """Survival lesions: a compact cluster of s tiles plus k - s loosely scattered ones, none
    touching the cluster, or None."""
    for _ in range(MAX_PLACE_TRIES):
        blob = compact_blob(rng, tissue, s, min_side=1)
        if blob is None:
            continue
        rest = place_loose(rng, tissue & ~dilate8(blob), k - s) if k > s else np.zeros_like(blob)
        if rest is not None:
            return blob | rest
    return None


def sample_layout(config: BenchmarkConfig, key: Sequence[int], label: int | None = None) -> SlideLayout:
    """One slide's layout from the random stream ``key`` (e.g. ``(seed, task, part, index)``).

    ``label``: the class, an index into ``config.classes`` (classification), or None (survival: the
    compactness is drawn here). Everything but the lesion (and then decoy) placement is drawn before
    the label is looked at, so the same key with another label gives the same grid, tissue,
    background and lesion count.
    """
    rng = random_stream(S_LAYOUT, *key)
    h, w = (int(v) for v in rng.integers(config.grid_min, config.grid_max + 1, 2))
    for _ in range(_MAX_MASK_TRIES):
        tissue = _tissue_mask(rng, h, w)
        if _accept_mask(tissue, config):
            break
    else:
        raise BenchmarkError(f"no acceptable tissue mask for a {h} x {w} grid after {_MAX_MASK_TRIES} "
                             f"tries; raise grid_min or lower lesion_max / tissue_min")
    image_class = np.where(tissue, background_regions(rng, h, w, config.background_classes), -1)
    k = int(rng.integers(config.lesion_min, config.lesion_max + 1))
    has_decoy = bool(rng.random() < config.decoy_prob)
    k_decoy = int(rng.integers(config.lesion_min, config.lesion_max + 1))
    decoy_pattern = config.classes[int(rng.integers(len(config.classes)))]
    u = float(rng.random())

    if label is None:
        # Survival: a cluster of s lesion tiles plus k - s scattered ones, none touching the cluster.
        frac = u if config.survival_levels == 0 else (
            min(int(u * config.survival_levels), config.survival_levels - 1) / (config.survival_levels - 1))
        s = 1 + int(round(frac * (k - 1)))
        lesion = _cluster_and_scattered(rng, tissue, k, s)
        pattern = "cluster+scattered"
    else:
        if not 0 <= label < len(config.classes):
            raise BenchmarkError(f"label must be in 0..{len(config.classes) - 1}, got {label}")
        pattern = config.classes[label]
        lesion = place(pattern, rng, tissue, k)
    if lesion is None:
        raise BenchmarkError(f"could not place {k} lesion tiles as {pattern} on a {h} x {w} slide "
                             f"(key {tuple(key)})")

    kind = np.where(tissue, BACKGROUND, NO_TISSUE).astype(np.int8)
    kind[lesion] = LESION
    n_decoy = 0
    if has_decoy:
        # Decoys keep one cell clear of every lesion, so they never change the lesions' adjacency.
        free = tissue & ~dilate8(lesion)
        decoy = place(decoy_pattern, rng, free, k_decoy)
        if decoy is None:  # rare on tiny grids; loosely scattered decoys fit when anything does
            decoy_pattern = "loose"
            decoy = place_loose(rng, free, k_decoy)
        if decoy is not None:
            kind[decoy] = DECOY
            n_decoy = k_decoy
    if n_decoy == 0:
        decoy_pattern = "none"
    largest = largest_component(lesion)
    return SlideLayout(kind=kind, image_class=image_class, pattern=pattern, n_lesion=k,
                       largest_cluster=largest, compactness=(largest - 1) / (k - 1),
                       decoy_pattern=decoy_pattern, n_decoy=n_decoy)
