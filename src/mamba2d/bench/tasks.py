"""Spatial tasks: slide labels defined by how a few "signal" tiles are arranged, one registered
function each, whose docstring is the task's definition.

A task function ``place(size, rng, tissue, label) -> types | None`` lays out the informative tiles
(the *structure*) of one slide of class ``label`` on the (H, W) bool ``tissue`` mask and returns an
(H, W) int8 array: 0 where it puts nothing, :data:`SIGNAL_A` or :data:`SIGNAL_B` (two signal tissue
types) where it puts a tile, or None when the arrangement does not fit (the caller retries). It draws
every *count* from ``size`` first (a generator in the same state for every label of a slide) and every
*position or orientation* from ``rng``, so the classes of a task differ only in arrangement.

:func:`sample_task_layout` does the rest: the grid, an irregular tissue mask with holes, background
regions of several tissue types, and isolated *distractors* (signal-type tiles placed loosely, away
from the structure and from each other). Everything but the structure is drawn before the label is
looked at, and a tissue mask is kept only if every class's structure and distractors fit on it, so
the same slide key under each label gives the same grid, tissue, background, tile counts and
distractor counts. For tasks marked ``needs_2d`` the classes place the same number of tiles of each
type (checked on every slide), so presence and amount say nothing and a bag-of-patches model is at
chance; ``raster_visible`` marks the 2D tasks whose cue a model reading the tiles in raster order
(row-major, no coordinates) can still see, because it lies along rows.

Adding a task is one function::

    @task("vertical_run", classes=("short", "long"), needs_2d=False, grid=(12, 32),
          distractors={SIGNAL_B: (1, 4)})
    def vertical_run(size, rng, tissue, label):
        '''2 (short) or 5 (long) signal tiles in one column on consecutive rows.'''
        k = (2, 5)[label]
        return place_shape(rng, tissue, [(i, 0) for i in range(k)], [SIGNAL_A] * k)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mamba2d.bench.config import BenchmarkConfig, BenchmarkError, random_stream
from mamba2d.bench.layout import background_regions, tissue_outline
from mamba2d.bench.rules import CLASS_NAMES, MAX_PLACE_TRIES, dilate8, place, place_loose

__all__ = ["BACKGROUND", "KIND_A", "KIND_B", "KIND_BACKGROUND", "KIND_DISTRACTOR_A", "KIND_DISTRACTOR_B",
           "NO_TISSUE", "SIGNAL_A", "SIGNAL_B", "TASKS", "Task", "TaskLayout", "TileClasses", "carve_holes",
           "classification_tasks", "place_shape", "sample_task_layout", "survival_tasks", "task", "task_code",
           "tasks_markdown"]

#: Tissue types in :attr:`TaskLayout.tissue_type`.
NO_TISSUE, BACKGROUND, SIGNAL_A, SIGNAL_B = -1, 0, 1, 2
#: Tile kinds in :attr:`TaskLayout.kind` (and the h5 ``tile_kind``): structure tiles of each signal
#: type, and distractors of each signal type.
KIND_BACKGROUND, KIND_A, KIND_B, KIND_DISTRACTOR_A, KIND_DISTRACTOR_B = 0, 1, 2, 3, 4

#: (size, rng, tissue (H, W) bool, label) -> (H, W) int8 structure types, or None.
Placer = Callable[[np.random.Generator, np.random.Generator, np.ndarray, int], "np.ndarray | None"]

# Stream ids (see mamba2d.bench.config), distinct from the built-in benchmark's 11..15.
S_TASK_LAYOUT, S_SIZES, S_PLACE, S_DISTRACT = 21, 22, 23, 24
_MAX_MASK_TRIES = 200
_TISSUE_FRACTION = (0.3, 0.92)


@dataclass(frozen=True)
class Task:
    """A registered task: its placer, class names (label order), whether it needs 2D context, whether
    its cue lies along rows, whether it is a survival task (classes are risk levels, lowest first),
    its default grid side range (cells) and distractor counts per signal type, and its definition."""

    name: str
    place: Placer
    classes: tuple[str, ...]
    needs_2d: bool
    raster_visible: bool
    survival: bool
    grid: tuple[int, int]
    distractors: Mapping[int, tuple[int, int]]
    doc: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join(self.doc.split("\n\n")[0].split())


#: Every task by name, in registration order.
TASKS: dict[str, Task] = {}


def task(name: str, *, classes: Sequence[str], needs_2d: bool, grid: tuple[int, int],
         distractors: Mapping[int, tuple[int, int]], raster_visible: bool = False,
         survival: bool = False) -> Callable[[Placer], Placer]:
    """Register the decorated placer as task ``name`` (see the module docstring); returns it unchanged.

    ``distractors``: per signal type (:data:`SIGNAL_A`, :data:`SIGNAL_B`), the (min, max) number of
    isolated tiles of that type added to every slide. Raises ValueError for a taken name, a placer
    without docstring, fewer than two classes or a bad range.
    """
    def register(fn: Placer) -> Placer:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        doc = (fn.__doc__ or "").strip()
        if not doc:
            raise ValueError(f"task {name!r}: the placer needs a docstring (the task's definition)")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"task {name!r}: needs at least two distinct classes, got {list(classes)}")
        if not 4 <= grid[0] <= grid[1]:
            raise ValueError(f"task {name!r}: grid must be (min, max) with 4 <= min <= max, got {grid}")
        for kind, (lo, hi) in distractors.items():
            if kind not in (SIGNAL_A, SIGNAL_B) or not 0 <= lo <= hi:
                raise ValueError(f"task {name!r}: bad distractor range {kind}: {(lo, hi)}")
        TASKS[name] = Task(name=name, place=fn, classes=tuple(classes), needs_2d=needs_2d,
                           raster_visible=raster_visible, survival=survival, grid=tuple(grid),
                           distractors=dict(distractors), doc=doc)
        return fn

    return register


def task_code(name: str) -> int:
    """A stable integer for a task name, part of every random-stream key (adding a task never
    changes another task's slides)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# Shapes and tissue


def place_shape(rng: np.random.Generator, free: np.ndarray, offsets: Sequence[tuple[int, int]],
                types: Sequence[int], *, touching: np.ndarray | None = None) -> np.ndarray | None:
    """A fixed shape at a uniformly random position where all its cells are on ``free``, or None.

    ``offsets``: (row, col) of each cell relative to any origin; ``types``: each cell's type.
    ``touching``: (H, W) bool; if given, at least one of the shape's cells must lie on it. Returns an
    (H, W) int8 array with the types at the shape's cells, 0 elsewhere.
    """
    cells = np.asarray(offsets, np.int64).reshape(-1, 2)
    cells = cells - cells.min(axis=0)
    h, w = free.shape
    span = cells.max(axis=0)
    hs, ws = h - int(span[0]), w - int(span[1])
    if hs <= 0 or ws <= 0:
        return None
    valid = np.ones((hs, ws), dtype=bool)
    hit = np.zeros((hs, ws), dtype=bool) if touching is not None else None
    for dr, dc in cells:
        valid &= free[dr:dr + hs, dc:dc + ws]
        if hit is not None:
            hit |= touching[dr:dr + hs, dc:dc + ws]
    if hit is not None:
        valid &= hit
    anchors = np.argwhere(valid)
    if len(anchors) == 0:
        return None
    r0, c0 = anchors[rng.integers(len(anchors))]
    out = np.zeros((h, w), dtype=np.int8)
    out[cells[:, 0] + r0, cells[:, 1] + c0] = np.asarray(types, np.int8)
    return out


def _place_units(rng: np.random.Generator, tissue: np.ndarray,
                 units: Sequence[tuple[Sequence[tuple[int, int]], Sequence[int]]]) -> np.ndarray | None:
    """Several shapes (offsets, types), each on rows at least one row clear of the ones before, or
    None. Separate rows keep the units from sharing a row, where their distance would be a raster
    cue unrelated to their arrangement."""
    out = np.zeros(tissue.shape, dtype=np.int8)
    for offsets, types in units:
        blocked = ndimage.binary_dilation((out != 0).any(axis=1), structure=np.ones(3, bool))
        part = place_shape(rng, tissue & ~blocked[:, None], offsets, types)
        if part is None:
            return None
        out += part
    return out


def _loose(rng: np.random.Generator, tissue: np.ndarray, k: int, kind: int) -> np.ndarray | None:
    """k tiles of type ``kind``, no two 8-adjacent, or None."""
    if k == 0:
        return np.zeros(tissue.shape, dtype=np.int8)
    cells = place_loose(rng, tissue, k)
    return None if cells is None else cells.astype(np.int8) * np.int8(kind)


def carve_holes(rng: np.random.Generator, mask: np.ndarray, fraction: float) -> np.ndarray:
    """``mask`` with about ``fraction`` of its cells removed as small holes (discs of radius
    0.5-1.6 cells) whose centres lie at least radius + 1.5 cells inside the tissue, so holes are
    enclosed; fewer where the tissue has no room. Works in a few vectorised rounds."""
    mask = mask.copy()
    target = int(round(fraction * int(mask.sum())))
    removed = 0
    for _ in range(8):
        if removed >= target:
            break
        radius = float(rng.uniform(0.5, 1.6))
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        cand = np.argwhere(dist >= radius + 1.5)
        if len(cand) == 0:
            break
        span = int(math.floor(radius))
        rr, cc = np.mgrid[-span:span + 1, -span:span + 1]
        disc = rr ** 2 + cc ** 2 <= radius ** 2
        n = min(len(cand), math.ceil((target - removed) / int(disc.sum())))
        centres = cand[rng.choice(len(cand), n, replace=False)]
        holes = np.zeros_like(mask)
        holes[centres[:, 0], centres[:, 1]] = True
        holes = ndimage.binary_dilation(holes, structure=disc)
        removed += int((holes & mask).sum())
        mask &= ~holes
    return mask


# --------------------------------------------------------------------------------------------------
# The layout of one slide


@dataclass(frozen=True)
class TileClasses:
    """Which image class (Fashion-MNIST index, or synthetic prototype) each tissue type shows: several
    background classes in regions, one per signal type. Defaults: the built-in benchmark's clothing
    background, Sandal (signal A) and Bag (signal B)."""

    background: tuple[int, ...] = BenchmarkConfig.background_classes
    signal_a: int = BenchmarkConfig.lesion_class
    signal_b: int = BenchmarkConfig.decoy_class

    @property
    def all(self) -> tuple[int, ...]:
        return tuple(sorted({*self.background, self.signal_a, self.signal_b}))


@dataclass(frozen=True, eq=False)
class TaskLayout:
    """One slide of a task. Arrays are (H, W), row 0 at the top.

    ``tissue_type``: int8 :data:`NO_TISSUE`, :data:`BACKGROUND`, :data:`SIGNAL_A`, :data:`SIGNAL_B`.
    ``structure``: bool, the informative tiles (the label's arrangement; not the distractors).
    ``cell_class``: int64 image class of each tissue cell (-1 off tissue). ``hole_cells``: tissue
    cells removed as holes.
    """

    task: str
    label: int
    tissue_type: np.ndarray
    structure: np.ndarray
    cell_class: np.ndarray
    hole_cells: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tissue_type.shape[0]), int(self.tissue_type.shape[1])

    @property
    def tissue(self) -> np.ndarray:
        return self.tissue_type != NO_TISSUE

    @property
    def kind(self) -> np.ndarray:
        """(H, W) int8 tile kind (:data:`KIND_BACKGROUND` ... :data:`KIND_DISTRACTOR_B`), -1 off tissue."""
        out = np.where(self.tissue, KIND_BACKGROUND, -1).astype(np.int8)
        for typ, structure_kind, distractor_kind in ((SIGNAL_A, KIND_A, KIND_DISTRACTOR_A),
                                                     (SIGNAL_B, KIND_B, KIND_DISTRACTOR_B)):
            cells = self.tissue_type == typ
            out[cells & self.structure] = structure_kind
            out[cells & ~self.structure] = distractor_kind
        return out

    def counts(self) -> dict[int, int]:
        """Tiles of each tissue type: {BACKGROUND: n, SIGNAL_A: n, SIGNAL_B: n}."""
        return {t: int((self.tissue_type == t).sum()) for t in (BACKGROUND, SIGNAL_A, SIGNAL_B)}


def _arrange(spec: Task, tissue: np.ndarray, sizes_seed: int, key: Sequence[int], attempt: int, label: int,
             n_distract: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(types, structure) of class ``label`` on ``tissue``: the task's structure and the distractors,
    or None if they do not fit."""
    for t in range(MAX_PLACE_TRIES):
        size = np.random.default_rng(np.random.SeedSequence([S_SIZES, sizes_seed]))  # same for every label
        types = spec.place(size, random_stream(S_PLACE, *key, attempt, label, t), tissue, label)
        if types is not None:
            break
    else:
        return None
    types = np.asarray(types, np.int8)
    structure = types != 0
    if not tissue[structure].all():
        raise BenchmarkError(f"task {spec.name!r} placed tiles off the tissue")
    total = sum(n_distract.values())
    if total:
        rng = random_stream(S_DISTRACT, *key, attempt, label)
        cells = place_loose(rng, tissue & ~dilate8(structure), total)
        if cells is None:
            return None
        where = np.argwhere(cells)[rng.permutation(total)]
        kinds = np.concatenate([np.full(n, t, np.int8) for t, n in sorted(n_distract.items())])
        types = types.copy()
        types[where[:, 0], where[:, 1]] = kinds
    return types, structure


def sample_task_layout(name: str, key: Sequence[int], label: int, *, grid: tuple[int, int] | None = None,
                       holes: tuple[float, float] = (0.0, 0.15),
                       distractors: tuple[int, int] | None = None,
                       tile_classes: TileClasses = TileClasses()) -> TaskLayout:
    """One slide of task ``name`` and class ``label`` from the random stream ``key``.

    ``grid``: (min, max) cells a side (default: the task's); ``holes``: (min, max) fraction of tissue
    cells removed as holes; ``distractors``: (min, max) count of each of the task's distractor types
    (default: the task's own ranges; (0, 0) for none). The same key under another label gives the
    same grid, tissue, background and counts (see the module docstring).
    """
    if name not in TASKS:
        raise BenchmarkError(f"no task {name!r}; tasks are {list(TASKS)}")
    spec = TASKS[name]
    if not 0 <= label < spec.n_classes:
        raise BenchmarkError(f"task {name!r}: label must be in 0..{spec.n_classes - 1}, got {label}")
    lo, hi = grid or spec.grid
    ranges = {t: (distractors if distractors is not None else r) for t, r in spec.distractors.items()}
    rng = random_stream(S_TASK_LAYOUT, *key)
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    for attempt in range(_MAX_MASK_TRIES):
        outline = tissue_outline(rng, h, w)
        tissue = carve_holes(rng, outline, float(rng.uniform(*holes)))
        sizes_seed = int(rng.integers(2 ** 62))
        n_distract = {t: int(rng.integers(a, b + 1)) for t, (a, b) in sorted(ranges.items())}
        if not _TISSUE_FRACTION[0] <= tissue.mean() <= _TISSUE_FRACTION[1]:
            continue
        placed = [_arrange(spec, tissue, sizes_seed, key, attempt, c, n_distract)
                  for c in range(spec.n_classes)]
        if all(p is not None for p in placed):
            break
    else:
        raise BenchmarkError(f"task {name!r}: no {h} x {w} tissue mask fits every class after "
                             f"{_MAX_MASK_TRIES} tries; use a larger grid")
    if spec.needs_2d:
        counts = {tuple(int((types == t).sum()) for t in (SIGNAL_A, SIGNAL_B)) for types, _ in placed}
        if len(counts) > 1:
            raise BenchmarkError(f"task {name!r} needs 2D context but its classes place different tile "
                                 f"counts (A, B) on one slide: {sorted(counts)}")
    types, structure = placed[label]
    cell_class = np.where(tissue, background_regions(rng, h, w, tile_classes.background), -1)
    cell_class[types == SIGNAL_A] = tile_classes.signal_a
    cell_class[types == SIGNAL_B] = tile_classes.signal_b
    tissue_type = np.where(tissue, types, NO_TISSUE).astype(np.int8)
    return TaskLayout(task=name, label=label, tissue_type=tissue_type, structure=structure,
                      cell_class=cell_class.astype(np.int64), hole_cells=int(outline.sum() - tissue.sum()))


# --------------------------------------------------------------------------------------------------
# Geometry used by several tasks

A, B = SIGNAL_A, SIGNAL_B


def _steps_to_cells(steps: Sequence[int]) -> list[tuple[int, int]]:
    """One cell per row on consecutive rows; ``steps[i]`` is the column move from row i to row i + 1."""
    cols = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    return [(i, int(c)) for i, c in enumerate(cols)]


def _enclosure_unit(w: int, enclosed: bool, side: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Three rows: a ring row of w + 2 B tiles, a middle row B, w A, B, and another ring row; the
    middle row is aligned (A enclosed) or shifted ``side`` * (w + 1) columns (A open above and below)."""
    shift = 0 if enclosed else side * (w + 1)
    cells = [(row, j + (shift if row == 1 else 0)) for row in range(3) for j in range(w + 2)]
    types = [B] * (w + 2) + [B] + [A] * w + [B] + [B] * (w + 2)
    return cells, types


def _bar_pair(a: int, b: int, touching: bool,
              rng: np.random.Generator) -> tuple[list[tuple[int, int]], list[int]]:
    """A bar of ``a`` signal-A tiles and, on the row below or above (at random), a bar of ``b``
    signal-B tiles: overlapping columns (touching along the row boundary) or 1-2 columns clear."""
    a_on_top = bool(rng.random() < 0.5)
    top, low = (a, b) if a_on_top else (b, a)
    if touching:
        start = int(rng.integers(-(low - 1), top))
    else:
        gap = int(rng.integers(1, 3))
        start = top + gap if rng.random() < 0.5 else -(low + gap)
    cells = [(0, j) for j in range(top)] + [(1, start + j) for j in range(low)]
    types = [A] * top + [B] * low if a_on_top else [B] * top + [A] * low
    return cells, types


_BLOBS = {2: [[(0, 0), (0, 1)], [(0, 0), (1, 0)]],
          3: [[(0, 0), (0, 1), (1, 0)], [(0, 0), (0, 1), (1, 1)], [(0, 0), (1, 0), (1, 1)],
              [(0, 1), (1, 0), (1, 1)]],
          4: [[(0, 0), (0, 1), (1, 0), (1, 1)]]}


def _edge_and_depth(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool tissue cells with a 4-neighbour off tissue (the grid's outside counts as off), and
    (H, W) int chessboard distance of each cell to the nearest non-tissue cell."""
    padded = np.pad(tissue, 1)
    inner = ndimage.binary_erosion(padded, structure=ndimage.generate_binary_structure(2, 1))[1:-1, 1:-1]
    depth = ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1]
    return tissue & ~inner, depth


# --------------------------------------------------------------------------------------------------
# Tasks that need 2D context. Registration order is the documentation order.


@task("diagonal", classes=("diagonal", "anti_diagonal"), needs_2d=True, grid=(10, 32),
      distractors={A: (2, 6)})
def diagonal(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
             label: int) -> np.ndarray | None:
    """A run of k = 3..5 signal-A tiles, one per row on consecutive rows, each one column right of the
    one above (diagonal, label 0) or one column left (anti-diagonal, label 1).

    The tiles touch only at corners, so in raster order consecutive tiles are a row's length apart
    plus or minus one: telling the two apart needs each row's tissue length, i.e. the grid.
    """
    k = int(size.integers(3, 6))
    step = 1 if label == 0 else -1
    return place_shape(rng, tissue, _steps_to_cells([step] * (k - 1)), [A] * k)


@task("corner", classes=("straight", "corner"), needs_2d=True, grid=(10, 32), distractors={A: (2, 6)})
def corner(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
           label: int) -> np.ndarray | None:
    """k = 4..6 signal-A tiles, one per row on consecutive rows, each 0 or 1 column left or right of
    the one above: one straight line (vertical or diagonal, every step the same; label 0), or a line
    that turns a corner once (two different steps, each used at least once: an L-like bend of 45
    degrees or a right-angled chevron; label 1). Same tile count in both.

    No two tiles share a row, so a raster-order reader sees only row-length-sized gaps that differ
    by a column or two between the classes.
    """
    k = int(size.integers(4, 7))
    if label == 0:
        steps = [int(rng.integers(-1, 2))] * (k - 1)
    else:
        first, second = (int(v) for v in rng.choice([-1, 0, 1], 2, replace=False))
        j = int(rng.integers(1, k - 1))  # steps before the turn, 1..k-2
        steps = [first] * j + [second] * (k - 1 - j)
    return place_shape(rng, tissue, _steps_to_cells(steps), [A] * k)


@task("enclosure", classes=("open", "enclosed"), needs_2d=True, grid=(10, 32),
      distractors={A: (1, 4), B: (1, 4)})
def enclosure(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
              label: int) -> np.ndarray | None:
    """A lesion of w = 1..2 signal-A tiles in a row with a signal-B tile on each side, between two
    ring rows of w + 2 B tiles: aligned, the lesion is surrounded by B on all 8 sides (enclosed,
    label 1); with the middle row shifted w + 1 columns sideways, the same tiles lie side by side and
    the lesion is open above and below (open, label 0).

    Every row holds the same run of tiles in both classes, in the same order: only the rows'
    alignment differs.
    """
    w = int(size.integers(1, 3))
    cells, types = _enclosure_unit(w, label == 1, int(rng.choice([-1, 1])))
    return place_shape(rng, tissue, cells, types)


@task("adjacency", classes=("apart", "touching"), needs_2d=True, grid=(10, 32),
      distractors={A: (1, 4), B: (1, 4)})
def adjacency(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
              label: int) -> np.ndarray | None:
    """A bar of a = 1..3 signal-A tiles and, on the row below or above, a bar of b = 1..3 signal-B
    tiles: overlapping columns, so A and B touch (touching, label 1), or 1-2 columns clear of each
    other, so no A tile has a B neighbour, diagonals included (apart, label 0).

    The two types never share a row, so a raster-order reader sees the same two runs about a row
    apart in both classes.
    """
    a, b = (int(v) for v in size.integers(1, 4, 2))
    cells, types = _bar_pair(a, b, label == 1, rng)
    return place_shape(rng, tissue, cells, types)


@task("pair_orientation", classes=("horizontal", "vertical"), needs_2d=True, raster_visible=True,
      grid=(8, 28), distractors={A: (2, 6)})
def pair_orientation(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                     label: int) -> np.ndarray | None:
    """Two signal-A tiles side by side in one row (horizontal, label 0) or one above the other
    (vertical, label 1).

    Raster-visible: a horizontal pair is two consecutive tiles in raster order, so a 1D model can
    learn this one; a context-free model cannot.
    """
    cells = [(0, 0), (0, 1)] if label == 0 else [(0, 0), (1, 0)]
    return place_shape(rng, tissue, cells, [A, A])


@task("border_distance", classes=("deep", "near_border"), needs_2d=True, grid=(16, 40),
      distractors={A: (2, 6)})
def border_distance(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                    label: int) -> np.ndarray | None:
    """A compact blob of k = 2..4 signal-A tiles (a domino, an L-tromino or a 2 x 2 square) touching
    the tissue border, i.e. with a tile whose 4-neighbour is off tissue (a hole, the outline or the
    grid edge; near_border, label 1), or deep inside, every tile at least 3 cells (chessboard) from
    any non-tissue cell (deep, label 0).

    The raster sequence holds tissue tiles only, so where the tissue ends is visible only on the grid.
    """
    k = int(size.integers(2, 5))
    cells = _BLOBS[k][int(size.integers(len(_BLOBS[k])))]  # the same shape for every label
    edge, depth = _edge_and_depth(tissue)
    if label == 1:
        return place_shape(rng, tissue, cells, [A] * k, touching=edge)
    return place_shape(rng, tissue & (depth >= 3), cells, [A] * k)


@task("cluster_count", classes=("one", "two"), needs_2d=True, grid=(12, 32), distractors={A: (2, 6)})
def cluster_count(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                  label: int) -> np.ndarray | None:
    """m = 2..4 rows of w = 2..3 signal-A tiles on consecutive rows: aligned into one w x m cluster
    (one, label 0), or split after the first 1..m-1 rows with the lower rows shifted w + 1
    columns sideways, making two clusters that do not touch (two, label 1). Same total in both.

    Every row holds one run of w tiles in both classes: only the rows' alignment differs.
    """
    w, m = int(size.integers(2, 4)), int(size.integers(2, 5))
    if label == 0:
        cells = [(r, c) for r in range(m) for c in range(w)]
    else:
        split = int(rng.integers(1, m))
        shift = int(rng.choice([-1, 1])) * (w + 1)
        cells = [(r, c + (shift if r >= split else 0)) for r in range(m) for c in range(w)]
    return place_shape(rng, tissue, cells, [A] * (w * m))


@task("arrangement", classes=CLASS_NAMES, needs_2d=True, raster_visible=True, grid=(16, 28),
      distractors={B: (0, 4)})
def arrangement(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                label: int) -> np.ndarray | None:
    """The built-in benchmark's three classes (:mod:`mamba2d.bench.rules`) with k = 4..7 signal-A
    tiles: scattered (one per row on consecutive rows, 2-3 columns sideways each step; label 0), one
    compact cluster (label 1), or one vertical line (label 2).

    Three classes; partly raster-visible: a cluster's rows are runs of consecutive tiles, while
    scattered vs vertical line is not visible in raster order.
    """
    k = int(size.integers(4, 8))
    cells = place(CLASS_NAMES[label], rng, tissue, k)
    return None if cells is None else cells.astype(np.int8) * np.int8(A)


# --------------------------------------------------------------------------------------------------
# Controls: a context-free model can learn these.


@task("presence", classes=("absent", "present"), needs_2d=False, grid=(8, 32), distractors={B: (1, 5)})
def presence(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
             label: int) -> np.ndarray | None:
    """k = 1..4 signal-A tiles scattered (no two 8-adjacent; present, label 1) or none (absent,
    label 0). Signal-B distractors in both, so "any unusual tile" is not the rule."""
    k = int(size.integers(1, 5))
    return _loose(rng, tissue, k if label == 1 else 0, A)


@task("amount", classes=("few", "many"), needs_2d=False, grid=(14, 28), distractors={B: (1, 5)})
def amount(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
           label: int) -> np.ndarray | None:
    """2..4 (few, label 0) or 10..16 (many, label 1) signal-A tiles, scattered (no two 8-adjacent).
    Signal-B distractors in both."""
    few, many = int(size.integers(2, 5)), int(size.integers(10, 17))
    return _loose(rng, tissue, many if label == 1 else few, A)


# --------------------------------------------------------------------------------------------------
# Survival tasks: the classes are risk levels, lowest first (risk = level / (levels - 1)).


@task("surv_enclosure", classes=("none_enclosed", "one_enclosed", "both_enclosed"), needs_2d=True,
      survival=True, grid=(16, 32), distractors={A: (1, 3), B: (1, 3)})
def surv_enclosure(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                   label: int) -> np.ndarray | None:
    """Two lesions as in ``enclosure`` (w = 1..2 each), apart from each other; the risk level is how
    many of them are enclosed (0, 1, 2). Same tile counts at every level."""
    widths = [int(v) for v in size.integers(1, 3, 2)]
    enclosed = rng.permutation([True] * label + [False] * (2 - label))
    units = [_enclosure_unit(w, bool(e), int(rng.choice([-1, 1])))
             for w, e in zip(widths, enclosed, strict=True)]
    return _place_units(rng, tissue, units)


@task("surv_adjacency", classes=("none_touching", "one_touching", "both_touching"), needs_2d=True,
      survival=True, grid=(16, 32), distractors={A: (1, 3), B: (1, 3)})
def surv_adjacency(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                   label: int) -> np.ndarray | None:
    """Two A/B bar pairs as in ``adjacency`` (bars of 1..3 tiles), apart from each other; the risk
    level is how many pairs touch (0, 1, 2). Same tile counts at every level."""
    lengths = [(int(a), int(b)) for a, b in size.integers(1, 4, (2, 2))]
    touching = rng.permutation([True] * label + [False] * (2 - label))
    units = [_bar_pair(a, b, bool(t), rng) for (a, b), t in zip(lengths, touching, strict=True)]
    return _place_units(rng, tissue, units)


@task("surv_amount", classes=("few", "some", "many"), needs_2d=False, survival=True, grid=(16, 32),
      distractors={B: (1, 4)})
def surv_amount(size: np.random.Generator, rng: np.random.Generator, tissue: np.ndarray,
                label: int) -> np.ndarray | None:
    """Control: 2..4, 6..9 or 12..16 signal-A tiles scattered (no two 8-adjacent); the risk level is
    which range (0, 1, 2). Signal-B distractors at every level."""
    counts = (int(size.integers(2, 5)), int(size.integers(6, 10)), int(size.integers(12, 17)))
    return _loose(rng, tissue, counts[label], A)


def classification_tasks() -> list[str]:
    """Names of the classification tasks, in registration order."""
    return [n for n, t in TASKS.items() if not t.survival]


def survival_tasks() -> list[str]:
    """Names of the survival tasks, in registration order."""
    return [n for n, t in TASKS.items() if t.survival]



def tasks_markdown() -> str:
    """The task table of ``docs/benchmark.md``, generated from the registry and the docstrings."""
    names = {SIGNAL_A: "A", SIGNAL_B: "B"}
    lines = ["| task | classes (label order) | needs 2D | raster-visible | grid | distractors | definition |",
             "|---|---|---|---|---|---|---|"]
    for t in TASKS.values():
        distract = ", ".join(f"{lo}-{hi} {names[k]}" for k, (lo, hi) in t.distractors.items()) or "none"
        text = " ".join(" ".join(t.doc.split()).replace("|", "\\|").split())
        lines.append(f"| `{t.name}`{' (survival)' if t.survival else ''} | {', '.join(t.classes)} | "
                     f"{'yes' if t.needs_2d else 'no'} | {'yes' if t.raster_visible else 'no'} | "
                     f"{t.grid[0]}-{t.grid[1]} | {distract} | {text} |")
    return "\n".join(lines)
