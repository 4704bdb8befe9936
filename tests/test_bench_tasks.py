"""The spatial tasks: every 2D task's classes have the same tissue-type counts on every slide yet are
told apart by an arrangement checker written here from the definitions (on the generated cell
layouts, not by training); raster-hidden tasks relate tiles along rows alike in every class;
the registry, holes, large grids and determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from mamba2d.bench.config import BenchmarkError
from mamba2d.bench.tasks import (
    BACKGROUND,
    KIND_A,
    KIND_B,
    NO_TISSUE,
    SIGNAL_A,
    SIGNAL_B,
    TASKS,
    sample_task_layout,
    task,
)

EIGHT = np.ones((3, 3), bool)


def _components(mask: np.ndarray, structure: np.ndarray = EIGHT) -> list[np.ndarray]:
    """(n, 2) cells of each connected component of a bool array."""
    lab, n = ndimage.label(mask, structure=structure)
    return [np.argwhere(lab == i) for i in range(1, n + 1)]


def _groups(types: np.ndarray, typ: int = SIGNAL_A) -> list[np.ndarray]:
    """Components of ``typ`` tiles with at least two tiles (8-connected): the structure, since
    distractors are isolated."""
    return [c for c in _components(types == typ) if len(c) >= 2]


def _ring(cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the 8-neighbours of a set of cells, outside it."""
    mask = np.zeros(shape, bool)
    mask[cells[:, 0], cells[:, 1]] = True
    return ndimage.binary_dilation(mask, EIGHT) & ~mask


def _steps(cells: np.ndarray) -> list[int]:
    cells = cells[np.argsort(cells[:, 0])]
    assert (np.diff(cells[:, 0]) == 1).all(), "one tile per row on consecutive rows"
    return list(np.diff(cells[:, 1]))


def _enclosed_units(t: np.ndarray) -> int:
    """A components whose whole 8-ring is signal B."""
    return sum(bool((t[_ring(c, t.shape)] == SIGNAL_B).all()) for c in _components(t == SIGNAL_A))


def _touching_units(t: np.ndarray) -> int:
    """A components with a signal-B tile among their 8-neighbours."""
    return sum(bool((t[_ring(c, t.shape)] == SIGNAL_B).any()) for c in _components(t == SIGNAL_A))


def _near_border(t: np.ndarray) -> int:
    (blob,) = _groups(t)
    padded = np.pad(t != NO_TISSUE, 1)
    rows, cols = blob[:, 0] + 1, blob[:, 1] + 1
    off4 = (~padded[rows - 1, cols] | ~padded[rows + 1, cols]
            | ~padded[rows, cols - 1] | ~padded[rows, cols + 1])
    if off4.any():
        return 1
    depth = ndimage.distance_transform_cdt(padded, metric="chessboard")[rows, cols]
    assert depth.min() >= 3, "a deep blob is at least 3 cells from any non-tissue cell"
    return 0


def _arrangement(t: np.ndarray) -> int:
    lesion = t == SIGNAL_A
    comps = _components(lesion)
    if all(len(c) == 1 for c in comps):
        return 0  # scattered
    (comp,) = comps
    return 2 if len(set(comp[:, 1])) == 1 else 1  # a vertical line, else the cluster


def _corner(t: np.ndarray) -> int:
    (run,) = _groups(t)
    return int(len(set(_steps(run))) > 1)


def _diagonal(t: np.ndarray) -> int:
    (run,) = _groups(t)
    steps = set(_steps(run))
    assert steps in ({1}, {-1})
    return int(steps == {-1})


def _pair(t: np.ndarray) -> int:
    (pair,) = _groups(t)
    return int(pair[0, 1] == pair[1, 1])


#: Independent checkers: the class of a slide from its tissue-type map alone (what a model sees).
ORACLES = {
    "diagonal": _diagonal,
    "corner": _corner,
    "enclosure": lambda t: int(_enclosed_units(t) > 0),
    "adjacency": lambda t: int(_touching_units(t) > 0),
    "pair_orientation": _pair,
    "border_distance": _near_border,
    "cluster_count": lambda t: len(_groups(t)) - 1,
    "arrangement": _arrangement,
    "presence": lambda t: int((t == SIGNAL_A).any()),
    "amount": lambda t: int((t == SIGNAL_A).sum() >= 10),
    "surv_enclosure": _enclosed_units,
    "surv_adjacency": _touching_units,
    "surv_amount": lambda t: int((t == SIGNAL_A).sum() >= 6) + int((t == SIGNAL_A).sum() >= 12),
}


def _row_pairs(lay) -> Counter:
    """Multiset of (left type, right type, column distance) over pairs of structure tiles in one row:
    the horizontal relations, which a reader of the tiles in raster order sees as short gaps."""
    pairs: Counter = Counter()
    t = np.where(lay.structure, lay.tissue_type, 0)
    for row in t:
        cols = np.flatnonzero(row)
        pairs.update((int(row[i]), int(row[j]), int(j - i)) for k, i in enumerate(cols) for j in cols[k + 1:])
    return pairs


def test_every_task_has_an_oracle():
    assert set(ORACLES) == set(TASKS)
    assert sum(not t.survival for t in TASKS.values()) >= 10  # 9 new tasks + the built-in arrangement


@pytest.mark.parametrize("name", list(TASKS))
def test_classes_differ_by_arrangement_only(name):
    spec = TASKS[name]
    for i in range(10):
        key = (5, 0, 0, i)
        lays = [sample_task_layout(name, key, label) for label in range(spec.n_classes)]
        for label, lay in enumerate(lays):
            t = lay.tissue_type
            seen = ORACLES[name](t)
            assert seen == label, f"{name} slide {i}: the checker says {seen}, the label is {label}"
            # The structure is what the definition places; distractors are isolated from everything.
            kind = lay.kind
            signal = (t == SIGNAL_A) | (t == SIGNAL_B)
            assert np.array_equal(lay.structure, (kind == KIND_A) | (kind == KIND_B))
            for r, c in np.argwhere(signal & ~lay.structure):
                block = signal[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
                assert block.sum() == 1, f"{name}: a distractor touches another signal tile"
            assert (lay.cell_class[t == BACKGROUND] >= 0).all()
            assert (lay.cell_class[t == NO_TISSUE] == -1).all()
        # Everything but the arrangement is shared by the classes of one slide key.
        for other in lays[1:]:
            assert other.shape == lays[0].shape
            assert np.array_equal(other.tissue, lays[0].tissue)
            if spec.needs_2d:
                # Identical counts of every tissue type: a bag-of-patches model cannot separate them.
                assert other.counts() == lays[0].counts()
                if not spec.raster_visible:
                    # The classes relate their tiles along rows alike: the difference is across rows,
                    # which a raster-order reader sees only as gaps of about a row's tissue length.
                    assert _row_pairs(other) == _row_pairs(lays[0])
        if not spec.needs_2d:
            assert len({lay.counts()[SIGNAL_A] for lay in lays}) == spec.n_classes  # controls: amounts differ


def test_holes_grids_and_distractors_follow_the_settings():
    lays = [sample_task_layout("enclosure", (1, 0, 0, i), i % 2, grid=(40, 48), holes=(0.2, 0.2),
                               distractors=(5, 5)) for i in range(6)]
    for lay in lays:
        assert 40 <= min(lay.shape) and max(lay.shape) <= 48
        outline = int(lay.tissue.sum()) + lay.hole_cells
        assert 0.15 <= lay.hole_cells / outline <= 0.3
        # Holes are inside the tissue: non-tissue components not touching the grid edge exist.
        lab, n = ndimage.label(~lay.tissue)
        edge = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))) - {0}
        assert n - len(edge) >= 1
        kind = lay.kind
        assert (kind == 3).sum() == 5 and (kind == 4).sum() == 5
    none = sample_task_layout("enclosure", (1, 0, 0, 0), 1, holes=(0.0, 0.0), distractors=(0, 0))
    assert none.hole_cells == 0 and not (none.kind >= 3).any()
    big = sample_task_layout("diagonal", (1, 0, 0, 0), 0, grid=(200, 200))
    assert big.shape == (200, 200) and ORACLES["diagonal"](big.tissue_type) == 0


def test_layouts_are_deterministic():
    a = sample_task_layout("cluster_count", (9, 1, 2, 3), 1)
    b = sample_task_layout("cluster_count", (9, 1, 2, 3), 1)
    c = sample_task_layout("cluster_count", (9, 1, 2, 4), 1)
    assert np.array_equal(a.tissue_type, b.tissue_type) and np.array_equal(a.cell_class, b.cell_class)
    assert not (a.shape == c.shape and np.array_equal(a.tissue_type, c.tissue_type))


def test_registry_refuses_bad_tasks():
    with pytest.raises(ValueError, match="already registered"):
        task("diagonal", classes=("a", "b"), needs_2d=False, grid=(8, 8), distractors={})(lambda *a: None)
    with pytest.raises(ValueError, match="docstring"):
        task("nodoc", classes=("a", "b"), needs_2d=False, grid=(8, 8), distractors={})(lambda *a: None)

    def unequal(size, rng, tissue, label):
        """Broken: class 1 places one tile more."""
        out = np.zeros(tissue.shape, np.int8)
        cells = np.argwhere(tissue)[: 2 + label]
        out[cells[:, 0], cells[:, 1]] = SIGNAL_A
        return out

    task("unequal_counts", classes=("a", "b"), needs_2d=True, grid=(12, 12), distractors={})(unequal)
    try:
        with pytest.raises(BenchmarkError, match="different tile counts"):
            sample_task_layout("unequal_counts", (0, 0, 0, 0), 0)
    finally:
        del TASKS["unequal_counts"]
    with pytest.raises(BenchmarkError, match="no task"):
        sample_task_layout("nope", (0,), 0)
    with pytest.raises(BenchmarkError, match="label must be"):
        sample_task_layout("diagonal", (0,), 2)


def test_docs_list_every_task_as_defined():
    from pathlib import Path

    from mamba2d.bench.tasks import tasks_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmark.md").read_text()
    assert tasks_markdown() in docs, "regenerate the task table in docs/benchmark.md (tasks_markdown())"
