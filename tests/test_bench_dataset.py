"""Building the benchmark: files the readers accept, determinism, reuse and resumption, the feature
cache, the digits fallback. A fake encoder keeps these fast; one test runs the real one."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from bench_cases import FMNIST, TINY, ExplodingEncoder, FakeEncoder, build, needs_fmnist, no_temp_files

from mamba2d.bench import dataset, sources
from mamba2d.bench.config import BenchmarkConfig, BenchmarkError, default_benchmark_dir
from mamba2d.bench.dataset import build_benchmark
from mamba2d.bench.layout import LESION
from mamba2d.bench.render import lesion_cells, render_mosaic
from mamba2d.bench.rules import CLASS_NAMES
from mamba2d.data.bags import FeatureBagSet, read_bag
from mamba2d.data.labels import read_labels
from mamba2d.data.splits import read_split_csv, resolve_split


@needs_fmnist
def test_files_read_back_through_the_readers(tmp_path):
    info = build(tmp_path)
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
    images = {s: sources.load_split("fmnist", FMNIST, s)[0] for s in ("train", "test")}
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
            assert np.array_equal(lesion_cells(tmp_path, sid), kind == LESION)
            # Raster order (row-major), which 1D sequence models see.
            flat = (bag.coords[:, 1] * 10_000 + bag.coords[:, 0]).numpy()
            assert (np.diff(flat) > 0).all()
    no_temp_files(tmp_path)


@needs_fmnist
def test_render_mosaic_rebuilds_the_slide(tmp_path):
    build(tmp_path)
    sid = "test_0002"
    bag = read_bag(tmp_path / "features" / f"{sid}.h5")
    with h5py.File(tmp_path / "features" / f"{sid}.h5") as f:
        index, (h, w) = f["image_index"][()], tuple(int(v) for v in f.attrs["grid_shape"])
    images = sources.load_split("fmnist", FMNIST, "test")[0]
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
    build(a)
    build(b)
    build(c, dataclasses.replace(TINY, seed=1))
    for name in ("labels.csv", "splits.csv", "slides.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    # Byte-identical slide files and feature caches, not just equal arrays.
    for path in sorted((a / "features").iterdir()) + sorted((a / "cache").iterdir()):
        assert path.read_bytes() == (b / path.parent.name / path.name).read_bytes()


@needs_fmnist
def test_reuse_resume_and_mismatch(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    first = build(out)
    # Complete: returned as is, nothing encoded (the encoder would raise).
    assert build(out, encoder=ExplodingEncoder()) == first
    with pytest.raises(BenchmarkError, match="seed: 0 -> 1"):
        build(out, dataclasses.replace(TINY, seed=1))
    with pytest.raises(BenchmarkError, match="encoder"):
        build_benchmark(out, TINY, encoder=None, progress=False)
    # fmnist_dir is where the images are, not what they are: same benchmark.
    assert build(out, dataclasses.replace(TINY, fmnist_dir="/usr/share/datasets/fashion-mnist")) == first

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BenchmarkError, match="not a benchmark folder"):
        build(foreign)

    # An interrupted build leaves only complete files, and the next call finishes it identically.
    broken = tmp_path / "broken"
    real_write = dataset._write_slide
    calls = {"n": 0}

    def dying_write(*args: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_write(*args, **kw)

    monkeypatch.setattr(dataset, "_write_slide", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build(broken)
    monkeypatch.setattr(dataset, "_write_slide", real_write)
    no_temp_files(broken)
    assert not (broken / "benchmark.json").exists() and len(list((broken / "features").iterdir())) == 4
    with pytest.raises(BenchmarkError, match="lesion_max"):
        build(broken, dataclasses.replace(TINY, lesion_max=4))
    kept = {p.name: p.stat().st_mtime_ns for p in (broken / "features").iterdir()}
    encoder = FakeEncoder()
    build(broken, encoder=encoder)
    assert encoder.calls == 1  # the train images' cache survived the crash; only test images remain
    assert {p.name: p.stat().st_mtime_ns for p in (broken / "features").iterdir() if p.name in kept} == kept
    for name in ("labels.csv", "splits.csv"):
        assert (broken / name).read_bytes() == (out / name).read_bytes()
    no_temp_files(broken)


@needs_fmnist
def test_survivalbuild(tmp_path):
    cfg = dataclasses.replace(TINY, task="survival", n_train=12)
    info = build(tmp_path, cfg)
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
    monkeypatch.setattr(sources, "find_fashion_mnist", lambda root=None: None)
    with pytest.warns(UserWarning, match="FALLING BACK"):
        info = build(tmp_path)
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
