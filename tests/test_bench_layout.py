"""The benchmark's slide layouts: class definitions, tissue masks, survival outcomes, and the layout
rule registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from mamba2d.bench.config import BenchmarkConfig, BenchmarkError
from mamba2d.bench.layout import DECOY, LESION, SlideLayout, enclosed_holes, sample_layout
from mamba2d.bench.rules import CLASS_NAMES, RULES, largest_component, rule
from mamba2d.bench.survival import survival_outcome


def _adjacent8(cells: np.ndarray) -> bool:
    """Whether two True cells of a (H, W) bool array touch, diagonals included."""
    counts = ndimage.convolve(cells.astype(int), np.ones((3, 3), int), mode="constant")
    return bool((counts[cells] > 1).any())


@pytest.fixture(scope="module")
def layouts() -> list[tuple[int, SlideLayout]]:
    cfg = BenchmarkConfig(grid_min=16, grid_max=32)
    return [(i % 3, sample_layout(cfg, (0, 0, 0, i), i % 3)) for i in range(150)]


def test_class_definitions_hold(layouts):
    for label, lay in layouts:
        lesion = lay.kind == LESION
        k = int(lesion.sum())
        assert k == lay.n_lesion and 4 <= k <= 9
        assert lay.tissue[lesion].all()
        rows, cols = np.nonzero(lesion)
        if label == 0:  # scattered: no two lesion tiles 8-adjacent ...
            assert not _adjacent8(lesion) and lay.largest_cluster == 1
            # ... one per row on consecutive rows, stepping 2-3 columns (raster gaps like a line's)
            assert np.array_equal(rows, np.arange(rows[0], rows[0] + k))
            assert set(np.abs(np.diff(cols))) <= {2, 3}
        elif label == 1:  # cluster: one 4-connected, compact blob, not a line
            assert largest_component(lesion) == k
            sides = (np.ptp(rows) + 1, np.ptp(cols) + 1)
            assert min(sides) >= 2 and max(sides) <= math.ceil(math.sqrt(k)) + 1
        else:  # vertical line: one column, consecutive rows
            assert len(set(cols)) == 1 and np.ptp(rows) + 1 == k
        decoy = lay.kind == DECOY
        assert decoy.sum() == lay.n_decoy
        # Decoys never touch lesions, so the lesions' adjacency (the label) is theirs alone.
        assert not (ndimage.binary_dilation(lesion, np.ones((3, 3), bool)) & decoy).any()


def test_tissue_is_irregular_with_holes(layouts):
    for _, lay in layouts:
        tissue = lay.tissue
        assert enclosed_holes(tissue) >= 1
        assert 0.35 <= tissue.mean() <= 0.85
        # Not a rectangle: the tissue's bounding box holds non-tissue cells besides the holes.
        rows, cols = np.nonzero(tissue)
        box = tissue[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (~box).sum() > 0
        assert set(np.unique(lay.image_class[tissue])) <= {0, 1, 2, 3, 4, 6}
        assert (lay.image_class[~tissue] == -1).all()
    assert len({lay.shape for _, lay in layouts}) > 20


def test_count_and_tissue_do_not_depend_on_the_class():
    # Everything but the arrangement is drawn before the label is used: one slide key under the three
    # labels gives the same grid, tissue, background and lesion count (so the count sampler is one).
    cfg = BenchmarkConfig(grid_min=16, grid_max=32)
    for i in range(20):
        lays = [sample_layout(cfg, (3, 0, 1, i), label) for label in range(3)]
        for other in lays[1:]:
            assert other.n_lesion == lays[0].n_lesion
            assert np.array_equal(other.tissue, lays[0].tissue)
            assert np.array_equal(other.image_class, lays[0].image_class)
        assert [lay.pattern for lay in lays] == list(CLASS_NAMES)


def test_survival_depends_on_the_configuration_not_the_count():
    cfg = BenchmarkConfig(task="survival", grid_min=16, grid_max=24)
    rows = []
    for i in range(300):
        lay = sample_layout(cfg, (0, 1, 0, i))
        lesion = lay.kind == LESION
        assert lesion.sum() == lay.n_lesion and lay.tissue[lesion].all()
        # The largest cluster is exactly the placed blob: the scattered rest never touches it.
        assert largest_component(lesion) == lay.largest_cluster
        rows.append((lay.n_lesion, lay.largest_cluster, lay.compactness,
                     *survival_outcome(cfg, (0, 1, 0, i), lay.compactness)))
    k, s, r, observed, censored, event = (np.asarray(c) for c in zip(*rows, strict=True))
    assert 0.30 <= censored.mean() <= 0.50
    assert (observed > 0).all() and (observed <= event + 0.01).all()
    assert spearmanr(event, s).statistic < -0.3
    assert spearmanr(event, r).statistic < -0.4
    assert abs(spearmanr(event, k).statistic) < 0.15  # counting lesions does not predict survival
    assert abs(spearmanr(r, k).statistic) < 0.15


@pytest.mark.parametrize("levels", [3, 0])
def test_survival_levels_set_the_clustered_fraction(levels):
    cfg = BenchmarkConfig(task="survival", grid_min=16, grid_max=24, survival_levels=levels)
    placed = []
    for i in range(120):
        lay = sample_layout(cfg, (0, 1, 0, i))
        placed.append((lay.largest_cluster - 1) / (lay.n_lesion - 1))
    fracs = np.asarray(placed)
    if levels == 3:
        # s = 1 + round(f (k - 1)), f in {0, 1/2, 1}: all scattered, about half, one cluster.
        assert {0.0, 1.0} <= set(np.round(fracs, 6))
        middle = fracs[(fracs > 0) & (fracs < 1)]
        assert len(middle) > 20 and np.all(np.abs(middle - 0.5) <= 0.5 / 5 + 1e-9)
        for f in (0.0, 1.0):  # each level holds roughly a third of the slides
            assert 20 <= (fracs == f).sum() <= 60
    else:
        assert len(np.unique(np.round(fracs, 6))) > 8  # continuous: many distinct fractions




# --------------------------------------------------------------------------------------------------
# The layout rule registry


@pytest.fixture
def horizontal_line():
    """A rule added the way a new class is added: one decorated function (removed afterwards)."""

    @rule("horizontal_line", fits=lambda tissue, n: bool(
        (np.lib.stride_tricks.sliding_window_view(tissue, n, axis=1).all(-1)).any()))
    def sample(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
        """k lesion tiles in one row, on consecutive columns."""
        windows = np.lib.stride_tricks.sliding_window_view(free, k, axis=1).all(-1)
        starts = np.argwhere(windows)
        if len(starts) == 0:
            return None
        r, c = starts[rng.integers(len(starts))]
        out = np.zeros_like(free)
        out[r, c:c + k] = True
        return out

    yield "horizontal_line"
    del RULES["horizontal_line"]


def test_the_registry_holds_the_classes_with_their_definitions():
    assert tuple(RULES)[:3] == CLASS_NAMES == BenchmarkConfig().classes
    assert all(RULES[name].doc for name in RULES)
    with pytest.raises(ValueError, match="already registered"):
        rule("cluster")(RULES["cluster"].sample)

    def undocumented(rng, free, k):
        return None

    with pytest.raises(ValueError, match="needs a docstring"):
        rule("undocumented")(undocumented)
    assert "undocumented" not in RULES


def test_a_registered_rule_is_a_class_of_a_benchmark(horizontal_line):
    cfg = BenchmarkConfig(grid_min=16, grid_max=24, classes=("vertical_line", horizontal_line))
    default = BenchmarkConfig(grid_min=16, grid_max=24)
    assert cfg.validate().to_dict()["classes"] == ["vertical_line", horizontal_line]
    assert "classes" not in default.to_dict() and cfg.digest() != default.digest()
    assert BenchmarkConfig.from_dict(cfg.to_dict()) == cfg
    for i in range(20):
        lay = sample_layout(cfg, (0, 0, 0, i), 1)
        rows, cols = np.nonzero(lay.kind == LESION)
        assert lay.pattern == horizontal_line and len(set(rows)) == 1
        assert np.array_equal(np.sort(cols), np.arange(cols.min(), cols.min() + lay.n_lesion))
        # The same key under the other class: same tissue and count, a vertical line instead.
        other = sample_layout(cfg, (0, 0, 0, i), 0)
        assert np.array_equal(other.tissue, lay.tissue) and other.n_lesion == lay.n_lesion
        assert len(set(np.nonzero(other.kind == LESION)[1])) == 1
    with pytest.raises(BenchmarkError, match="layout rules"):
        BenchmarkConfig(classes=("cluster", "spiral")).validate()
    with pytest.raises(BenchmarkError, match="label must be in 0..1"):
        sample_layout(cfg, (0, 0, 0, 0), 2)


def test_a_rules_fit_check_decides_which_tissue_masks_are_used():
    @rule("never_fits", fits=lambda tissue, n: False)
    def never_fits(rng: np.random.Generator, free: np.ndarray, k: int) -> np.ndarray | None:
        """Fits on no tissue mask."""
        return None

    try:
        cfg = BenchmarkConfig(grid_min=16, grid_max=16, classes=("cluster", "never_fits"))
        with pytest.raises(BenchmarkError, match="no acceptable tissue mask"):
            sample_layout(cfg, (0, 0, 0, 0), 0)  # even for the other class: acceptance is class-blind
    finally:
        del RULES["never_fits"]
