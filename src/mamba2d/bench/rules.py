"""Layout rules: how k lesion tiles are arranged on a slide's grid, one registered function each.

A rule is a sampler ``sample(rng, free, k) -> cells | None``: ``free`` is an (H, W) bool array of
the cells it may use, and it returns an (H, W) bool array with exactly ``k`` True cells, or None when
the arrangement does not fit (the caller retries, then gives up). Its docstring is the class
definition, shown in docs and errors. A benchmark's classes are rule names
(:attr:`mamba2d.bench.config.BenchmarkConfig.classes`, default :data:`CLASS_NAMES`); decoy groups
draw their arrangement from the same names.

Adding a rule is one function::

    @rule("horizontal_line")
    def horizontal_line(rng, free, k):
        '''k lesion tiles in one row, on consecutive columns.'''
        ...

``fits=`` optionally gives a check ``fits(tissue, n) -> bool`` that the arrangement of n tiles fits
on a tissue mask at all; tissue masks are drawn until every class's check passes (so whether a
mask is accepted never depends on the class).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["CLASS_NAMES", "RULES", "Rule", "dilate8", "largest_component", "place", "place_loose", "rule"]

#: (rng, free (H, W) bool, k) -> (H, W) bool with k True cells, or None.
Sampler = Callable[[np.random.Generator, np.ndarray, int], "np.ndarray | None"]
#: (tissue (H, W) bool, n) -> whether an arrangement of n tiles fits on it.
FitCheck = Callable[[np.ndarray, int], bool]

#: How often :func:`place` retries a rule that returned None.
MAX_PLACE_TRIES = 60


@dataclass(frozen=True)
class Rule:
    """A registered arrangement: its name, sampler, optional fit check and definition (docstring)."""

    name: str
    sample: Sampler
    fits: FitCheck | None
    doc: str


#: Every rule by name, in registration order.
RULES: dict[str, Rule] = {}


def rule(name: str, *, fits: FitCheck | None = None) -> Callable[[Sampler], Sampler]:
    """Register the decorated sampler under ``name`` (see the module docstring); returns it unchanged.

    Raises ValueError if ``name`` is taken or the sampler has no docstring.
    """
    def register(sample: Sampler) -> Sampler:
        if name in RULES:
            raise ValueError(f"layout rule {name!r} is already registered")
        doc = (sample.__doc__ or "").strip()
        if not doc:
            raise ValueError(f"layout rule {name!r}: the sampler needs a docstring (the class definition)")
        RULES[name] = Rule(name=name, sample=sample, fits=fits, doc=doc)
        return sample

    return register


def place(name: str, rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """Rule ``name``'s arrangement of ``k`` cells on ``free``, retried up to :data:`MAX_PLACE_TRIES`
    times; None if it never fits."""
    sample = RULES[name].sample
    for _ in range(MAX_PLACE_TRIES):
        out = sample(rng, free, k)
        if out is not None:
            return out
    return None


# --------------------------------------------------------------------------------------------------
# Shared geometry


def dilate8(cells: np.ndarray) -> np.ndarray:
    """(H, W) bool: the cells and their 8 neighbours."""
    return ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool))


def largest_component(cells: np.ndarray) -> int:
    """Size of the largest 4-connected component of a (H, W) bool array (0 if empty)."""
    lab, n = ndimage.label(cells)
    return int(np.bincount(lab.ravel())[1:].max()) if n else 0


def place_loose(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """(H, W) bool with k free cells, no two 8-adjacent (greedy over a random order), or None.

    Not a class: survival slides scatter their unclustered lesions this way, and decoy groups fall
    back to it when their rule does not fit.
    """
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


def chain_lengths(free: np.ndarray) -> np.ndarray:
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


def has_vertical_run(free: np.ndarray, length: int) -> bool:
    """Whether some column holds ``length`` consecutive True cells."""
    if length > free.shape[0]:
        return False
    csum = np.vstack([np.zeros((1, free.shape[1]), np.int64), np.cumsum(free, axis=0)])
    return bool((csum[length:] - csum[:-length] == length).any())


def compact_blob(rng: np.random.Generator, free: np.ndarray, k: int, min_side: int) -> np.ndarray | None:
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
    for _ in range(MAX_PLACE_TRIES):
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


# --------------------------------------------------------------------------------------------------
# The classes. Registration order is the default label order (CLASS_NAMES).


@rule("scattered", fits=lambda tissue, n: int(chain_lengths(tissue).max()) >= n)
def scattered(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """No two lesion tiles 8-adjacent: one per row on k consecutive rows, each 2-3 columns left or
    right of the one above, so in raster order they are spaced like a vertical line's.

    Why so constrained: consecutive lesions are then one tissue row apart in raster order, exactly as
    in a vertical line; the only difference from the line is the sideways step, i.e. whether the
    tiles touch vertically, which a 1D scan cannot see without knowing each row's tissue length.
    """
    h, w = free.shape
    length = chain_lengths(free)
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


@rule("cluster")
def cluster(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """One compact 4-connected blob: bounding box at most ceil(sqrt(k)) + 1 and at least 2 per side."""
    return compact_blob(rng, free, k, min_side=2)


@rule("vertical_line", fits=has_vertical_run)
def vertical_line(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
    """k lesion tiles in one column on consecutive rows (uniform over all such): adjacent on the grid
    but a whole row apart in raster order, which is what separates 2D scans from 1D sequences."""
    h, w = free.shape
    csum = np.vstack([np.zeros((1, w), np.int64), np.cumsum(free, axis=0)])
    starts = np.argwhere(csum[k:] - csum[:-k] == k)  # (row of the top cell, column)
    if len(starts) == 0:
        return None
    r0, c0 = starts[rng.integers(len(starts))]
    out = np.zeros((h, w), dtype=bool)
    out[r0:r0 + k, c0] = True
    return out


#: The classification classes of the built-in benchmark, in label order.
CLASS_NAMES: tuple[str, ...] = ("scattered", "cluster", "vertical_line")
