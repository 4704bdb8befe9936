"""The spatial MIL benchmark: class definitions, survival outcomes, files the readers accept,
determinism, reuse and resumption. A fake encoder keeps these fast; one test runs the real one."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import spearmanr

import mamba2d.data.benchmarks as bm
from mamba2d.data.bags import FeatureBagSet, read_bag
from mamba2d.data.benchmarks import (
    CLASS_NAMES,
    BenchmarkConfig,
    BenchmarkError,
    build_benchmark,
    default_benchmark_dir,
    enclosed_holes,
    largest_component,
    lesion_cells,
    render_mosaic,
    sample_layout,
    survival_outcome,
)
from mamba2d.data.labels import read_labels
from mamba2d.data.splits import read_split_csv, resolve_split

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(bm.find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
# Small slides and cohorts: a build takes a fraction of a second with the fake encoder.
TINY = BenchmarkConfig(n_train=9, n_val=3, n_test=6, grid_min=14, grid_max=20, lesion_min=3, lesion_max=5,
                       pool_per_class=12)


class FakeEncoder:
    """Deterministic stand-in for a CNN: a fixed random projection of the pixels, (N, 16)."""

    cache_tag = "fake"

    def __init__(self) -> None:
        self.weight = np.random.default_rng(0).standard_normal((28 * 28, 16)).astype(np.float32)
        self.calls = 0

    def encode(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
        return torch.from_numpy(x @ self.weight[: x.shape[1]])


class ExplodingEncoder(FakeEncoder):
    def encode(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        raise AssertionError("the encoder must not run when everything is cached")


def _build(path: Path, config: BenchmarkConfig = TINY, **kw: object) -> dict:
    return build_benchmark(path, config, encoder=kw.pop("encoder", FakeEncoder()), progress=False, **kw)


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# Layouts


def _adjacent8(cells: np.ndarray) -> bool:
    """Whether two True cells of a (H, W) bool array touch, diagonals included."""
    counts = ndimage.convolve(cells.astype(int), np.ones((3, 3), int), mode="constant")
    return bool((counts[cells] > 1).any())


@pytest.fixture(scope="module")
def layouts() -> list[tuple[int, bm.SlideLayout]]:
    cfg = BenchmarkConfig(grid_min=16, grid_max=32)
    return [(i % 3, sample_layout(cfg, (0, 0, 0, i), i % 3)) for i in range(150)]


def test_class_definitions_hold(layouts):
    for label, lay in layouts:
        lesion = lay.kind == bm.LESION
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
        decoy = lay.kind == bm.DECOY
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
        lesion = lay.kind == bm.LESION
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
# Building


@needs_fmnist
def test_files_read_back_through_the_readers(tmp_path):
    info = _build(tmp_path)
    ids = {p: [f"{p}_{i:04d}" for i in range(n)] for p, n in TINY.n_slides.items()}
    table = read_labels(tmp_path / "labels.csv", "classification")
    assert table.class_names == ["0", "1", "2"] and info["class_names"] == list(CLASS_NAMES)
    split = read_split_csv(tmp_path / "splits.csv")
    assert (list(split.train), list(split.val), list(split.test)) == (ids["train"], ids["val"], ids["test"])
    rows = resolve_split(split, table)
    assert [len(rows[p]) for p in ("train", "val", "test")] == [9, 3, 6]
    bags = FeatureBagSet(tmp_path / "features", table.frame["slide_id"])
    report = bags.validate()
    assert report.n_slides == 18 and report.feature_dim == 16 and report.patch_sizes_level0 == (224,)
    assert info["counts"]["train"]["per_class"] == {name: 3 for name in CLASS_NAMES}

    encoder = FakeEncoder()
    images = {s: bm._load_split("fmnist", FMNIST, s)[0] for s in ("train", "test")}
    for part, slide_ids in ids.items():
        for sid in slide_ids:
            path = tmp_path / "features" / f"{sid}.h5"
            bag = read_bag(path)
            grid = bag.grid()
            with h5py.File(path) as f:
                index, split_name = f["image_index"][()], str(f.attrs["image_split"])
                kind, shape = f["tile_kind"][()], tuple(f.attrs["grid_shape"])
            # Train and val slides show train images only, test slides test images only, and the
            # features are those of exactly these images.
            assert split_name == ("test" if part == "test" else "train")
            assert torch.allclose(bag.features, encoder.encode(images[split_name][index]), atol=1e-5)
            assert (bag.coords % 224 == 0).all()
            assert grid.height <= shape[0] and grid.width <= shape[1]
            assert np.array_equal(lesion_cells(tmp_path, sid), kind == bm.LESION)
            # Raster order (row-major), which 1D sequence models see.
            flat = (bag.coords[:, 1] * 10_000 + bag.coords[:, 0]).numpy()
            assert (np.diff(flat) > 0).all()
    _no_temp_files(tmp_path)


@needs_fmnist
def test_render_mosaic_rebuilds_the_slide(tmp_path):
    _build(tmp_path)
    sid = "test_0002"
    bag = read_bag(tmp_path / "features" / f"{sid}.h5")
    with h5py.File(tmp_path / "features" / f"{sid}.h5") as f:
        index, (h, w) = f["image_index"][()], tuple(int(v) for v in f.attrs["grid_shape"])
    images = bm._load_split("fmnist", FMNIST, "test")[0]
    mosaic = render_mosaic(tmp_path, sid)
    assert mosaic.shape == (h * 28, w * 28) and mosaic.dtype == np.uint8
    cells = (bag.coords // 224).numpy()
    covered = np.zeros((h, w), bool)
    for (x, y), i in zip(cells, index, strict=True):
        assert np.array_equal(mosaic[y * 28:(y + 1) * 28, x * 28:(x + 1) * 28], images[i])
        covered[y, x] = True
    assert (mosaic.reshape(h, 28, w, 28).transpose(0, 2, 1, 3)[~covered] == 255).all()
    assert render_mosaic(tmp_path, sid, scale=2).shape == (h * 56, w * 56)
    with pytest.raises(BenchmarkError, match="no such slide"):
        render_mosaic(tmp_path, "nope")


@needs_fmnist
def test_same_seed_same_benchmark(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _build(a)
    _build(b)
    _build(c, dataclasses.replace(TINY, seed=1))
    for name in ("labels.csv", "splits.csv", "slides.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    # Byte-identical slide files and feature caches, not just equal arrays.
    for path in sorted((a / "features").iterdir()) + sorted((a / "cache").iterdir()):
        assert path.read_bytes() == (b / path.parent.name / path.name).read_bytes()


@needs_fmnist
def test_reuse_resume_and_mismatch(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    first = _build(out)
    # Complete: returned as is, nothing encoded (the encoder would raise).
    assert _build(out, encoder=ExplodingEncoder()) == first
    with pytest.raises(BenchmarkError, match="seed: 0 -> 1"):
        _build(out, dataclasses.replace(TINY, seed=1))
    with pytest.raises(BenchmarkError, match="encoder"):
        build_benchmark(out, TINY, encoder=None, progress=False)
    # fmnist_dir is where the images are, not what they are: same benchmark.
    assert _build(out, dataclasses.replace(TINY, fmnist_dir="/usr/share/datasets/fashion-mnist")) == first

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BenchmarkError, match="not a benchmark folder"):
        _build(foreign)

    # An interrupted build leaves only complete files, and the next call finishes it identically.
    broken = tmp_path / "broken"
    real_write = bm._write_slide
    calls = {"n": 0}

    def dying_write(*args: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_write(*args, **kw)

    monkeypatch.setattr(bm, "_write_slide", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _build(broken)
    monkeypatch.setattr(bm, "_write_slide", real_write)
    _no_temp_files(broken)
    assert not (broken / "benchmark.json").exists() and len(list((broken / "features").iterdir())) == 4
    with pytest.raises(BenchmarkError, match="lesion_max"):
        _build(broken, dataclasses.replace(TINY, lesion_max=4))
    kept = {p.name: p.stat().st_mtime_ns for p in (broken / "features").iterdir()}
    encoder = FakeEncoder()
    _build(broken, encoder=encoder)
    assert encoder.calls == 1  # the train images' cache survived the crash; only test images remain
    assert {p.name: p.stat().st_mtime_ns for p in (broken / "features").iterdir() if p.name in kept} == kept
    for name in ("labels.csv", "splits.csv"):
        assert (broken / name).read_bytes() == (out / name).read_bytes()
    _no_temp_files(broken)


@needs_fmnist
def test_survival_build(tmp_path):
    cfg = dataclasses.replace(TINY, task="survival", n_train=12)
    info = _build(tmp_path, cfg)
    table = read_labels(tmp_path / "labels.csv", "survival")
    assert len(table) == 21 and (table.frame["survival_months"] > 0).all()
    assert set(table.frame["censorship"]) <= {0, 1}
    assert info["survival"]["c_max_months"] > 0 and "censoring_rate" in info["counts"]["test"]
    resolve_split(read_split_csv(tmp_path / "splits.csv"), table)


def test_config_checks_and_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA2D_CACHE", str(tmp_path))
    path = default_benchmark_dir()
    assert path.parent == tmp_path and path.name == f"benchmark-{BenchmarkConfig().digest()}"
    assert default_benchmark_dir(BenchmarkConfig(seed=1)) != path
    assert default_benchmark_dir(BenchmarkConfig(fmnist_dir="/elsewhere")) == path
    assert BenchmarkConfig.from_dict(BenchmarkConfig().to_dict()) == BenchmarkConfig()
    assert BenchmarkConfig.preset("full").n_train > BenchmarkConfig.preset("demo").n_train
    for bad in (dict(lesion_min=2), dict(grid_min=10), dict(lesion_class=0), dict(task="x"),
                dict(censoring_rate=1.5), dict(n_train=1), dict(survival_levels=1)):
        with pytest.raises(BenchmarkError):
            BenchmarkConfig(**bad).validate()


def test_digits_fallback_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "find_fashion_mnist", lambda root=None: None)
    with pytest.warns(UserWarning, match="FALLING BACK"):
        info = _build(tmp_path)
    assert info["image_source"]["fallback"] and info["image_source"]["tile_size"] == 8
    assert info["identity"]["image_source"] == "digits"
    assert render_mosaic(tmp_path, "train_0000").shape[0] % 8 == 0


@needs_fmnist
def test_real_encoder_smoke(tmp_path):
    cfg = dataclasses.replace(TINY, n_train=3, n_val=0, n_test=3, grid_min=12, grid_max=13, lesion_max=4,
                              pool_per_class=3)
    info = build_benchmark(tmp_path / "a", cfg, progress=False)
    build_benchmark(tmp_path / "b", cfg, progress=False)
    for path in sorted((tmp_path / "a" / "features").iterdir()):  # the CPU encoder is deterministic
        assert path.read_bytes() == (tmp_path / "b" / "features" / path.name).read_bytes()
    tmp_path = tmp_path / "a"
    assert (tmp_path / "cache" / "fmnist_train_112.pt").is_file()
    assert info["encoder"]["input_size"] == 112
    bags = FeatureBagSet(tmp_path / "features", [f"test_{i:04d}" for i in range(3)])
    assert bags.validate().feature_dim == 1280
    bag = bags[0]
    lesion = torch.from_numpy(lesion_cells(tmp_path, "test_0000"))
    assert torch.isfinite(bag.features).all()
    # Sandal tiles sit apart from the clothing tiles in feature space (the task is spatial, not visual).
    centre = bag.features[lesion].mean(0)
    d_lesion = (bag.features[lesion] - centre).norm(dim=1).max()
    d_other = (bag.features[~lesion] - centre).norm(dim=1).min()
    assert d_lesion < d_other
    cached = torch.load(tmp_path / "cache" / "fmnist_test_112.pt", weights_only=True)
    assert cached["features"].shape == (len(cached["indices"]), 1280)
