"""Building task datasets end to end: two tasks (synthetic and Fashion-MNIST features) read back
through the training readers, the synthetic features' noise model, a survival task, byte-identical
rebuilds, reuse and refusal."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from bench_cases import FMNIST, FakeEncoder, needs_fmnist, no_temp_files

from mamba2d.bench import sources
from mamba2d.bench.config import BenchmarkError
from mamba2d.bench.taskdata import TaskConfig, build_task, prototypes, task_config
from mamba2d.bench.tasks import KIND_A, KIND_B, TASKS
from mamba2d.data.bags import FeatureBagSet, read_bag
from mamba2d.data.labels import read_labels
from mamba2d.data.splits import read_split_csv, resolve_split


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "benchmark.json" and "cache" not in p.parts}


def _read_back(folder, task: str, n: int) -> tuple:
    table = read_labels(folder / "labels.csv", task)
    split = read_split_csv(folder / "splits.csv")
    rows = resolve_split(split, table)
    assert sum(len(r) for r in rows.values()) == n and all(len(r) for r in rows.values())
    bags = FeatureBagSet(folder / "features", table.frame["slide_id"])
    report = bags.validate()
    assert report.n_slides == n and report.patch_sizes_level0 == (224,)
    return table, bags, report


def test_gaussian_task_builds_reads_back_and_rebuilds_identically(tmp_path):
    info = build_task(tmp_path / "a", "enclosure", "gauss32", n_slides=20, seed=3)
    assert info["needs_2d"] and not info["raster_visible"] and info["class_names"] == ["open", "enclosed"]
    parts = {p: info["counts"][p]["slides"] for p in ("train", "val", "test")}
    assert parts == {"train": 12, "val": 3, "test": 5}
    table, bags, report = _read_back(tmp_path / "a", "classification", 20)
    assert report.feature_dim == 32 and table.class_names == ["0", "1"]
    protos = prototypes(32, 3, 4.5)
    dist = np.linalg.norm(protos[:, None] - protos[None], axis=-1)
    assert np.allclose(dist[~np.eye(10, dtype=bool)], 4.5)
    residuals = []
    slides = pd.read_csv(tmp_path / "a" / "slides.csv")
    for sid in table.frame["slide_id"]:
        path = tmp_path / "a" / "features" / f"{sid}.h5"
        bag = read_bag(path)
        with h5py.File(path) as f:
            cls, kind, lesion = f["cell_class"][()], f["tile_kind"][()], f["is_lesion"][()]
            grid = tuple(f.attrs["grid_shape"])
        residuals.append(bag.features.numpy() - protos[cls])
        assert np.array_equal(lesion, (kind == KIND_A) | (kind == KIND_B))
        assert (bag.coords % 224 == 0).all() and bag.grid().height <= grid[0]
        flat = (bag.coords[:, 1] * 10_000 + bag.coords[:, 0]).numpy()
        assert (np.diff(flat) > 0).all()  # raster order
        row = slides[slides["slide_id"] == sid].iloc[0]
        assert (row["n_structure_a"], row["n_structure_b"]) in ((1, 8), (2, 10))  # w A tiles, 2 (w + 2) + 2 B
    # Features are prototype + N(0, I) noise.
    res = np.concatenate(residuals)
    assert abs(res.mean()) < 0.02 and abs(res.std() - 1.0) < 0.02

    build_task(tmp_path / "b", "enclosure", "gauss32", n_slides=20, seed=3)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    no_temp_files(tmp_path)
    # A finished folder is returned as it is; a different task in it is refused.
    assert build_task(tmp_path / "a", "enclosure", "gauss32", n_slides=20, seed=3)["config_digest"] == \
        info["config_digest"]
    with pytest.raises(BenchmarkError, match="different configuration"):
        build_task(tmp_path / "a", "enclosure", "gauss32", n_slides=20, seed=4)


@needs_fmnist
def test_fmnist_task_features_are_the_named_images(tmp_path):
    encoder = FakeEncoder()
    info = build_task(tmp_path, "adjacency", "fmnist", n_slides=12, seed=1, encoder=encoder,
                      pool_per_class=8, fmnist_dir=FMNIST)
    assert info["image_source"]["source"] == "fmnist" and info["image_source"]["encoder"] == "fake"
    table, bags, report = _read_back(tmp_path, "classification", 12)
    images = {s: sources.load_split("fmnist", FMNIST, s)[0] for s in ("train", "test")}
    labels = {s: sources.load_split("fmnist", FMNIST, s)[1] for s in ("train", "test")}
    for sid in table.frame["slide_id"]:
        path = tmp_path / "features" / f"{sid}.h5"
        with h5py.File(path) as f:
            index, split, cls = f["image_index"][()], str(f.attrs["image_split"]), f["cell_class"][()]
        assert split == ("test" if sid.startswith("test") else "train")
        assert np.array_equal(labels[split][index], cls)  # each tile shows an image of its class
        assert torch.allclose(read_bag(path).features, encoder.encode(images[split][index]), atol=1e-5)


def test_survival_task_risk_follows_the_arrangement_level(tmp_path):
    info = build_task(tmp_path, "surv_adjacency", "gauss48", n_slides=60, seed=0)
    assert info["task"] == "survival" and info["survival"]["levels"] == 3
    table, _, _ = _read_back(tmp_path, "survival", 60)
    slides = pd.read_csv(tmp_path / "slides.csv")
    means = slides.groupby("label")["event_months"].mean()
    assert means[0] > means[1] > means[2]  # T = 150 exp(-3 risk) Weibull(1.5): 135, 30, 7 months
    assert 0.2 < slides["censorship"].mean() < 0.6
    # Identical tile counts at every level.
    assert slides.groupby("label")[["n_structure_a", "n_structure_b"]].sum().sum(axis=1).nunique() <= 3


def test_configs_are_checked():
    assert task_config("diagonal", n_slides=192).n_slides == {"train": 115, "val": 29, "test": 48}
    assert TaskConfig("diagonal") == task_config("diagonal", n_slides=192)
    for bad, match in ((dict(task="nope"), "task must be"),
                       (dict(task="diagonal", source="gauss5"), "10 <= D"),
                       (dict(task="diagonal", source="png"), "source must be"),
                       (dict(task="diagonal", grid=(3, 9)), "grid must be"),
                       (dict(task="diagonal", holes=(0.3, 0.1)), "holes must be"),
                       (dict(task="amount", n_val=1), "at least 2 slides")):
        with pytest.raises(BenchmarkError, match=match):
            TaskConfig(**bad).validate()
    a, b = TaskConfig("diagonal"), TaskConfig("diagonal", fmnist_dir="/elsewhere")
    assert a.digest() == b.digest() != TaskConfig("diagonal", grid=(10, 33)).digest()
    assert TaskConfig.from_dict(a.to_dict()) == a
    assert all(t in TASKS for t in ("diagonal", "surv_amount"))
