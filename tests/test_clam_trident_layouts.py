"""CLAM's and TRIDENT's files as their scripts lay them out train 2DMambaMIL with no extra flags.

The writers below follow the published file conventions (not their code):

- CLAM ``create_patches_fp.py``: ``RESULTS/patches/<slide>.h5``, a resizable ``coords`` dataset whose
  attributes are ``patch_size``, ``patch_level``, ``downsample``, ``downsampled_level_dim``,
  ``level_dim``, ``name``, ``save_path``; every tissue contour is tiled from the corner of its own
  bounding box, so contours sit on lattices of different phase.
- CLAM ``extract_features_fp.py``: ``FEATURES/h5_files/<slide>.h5`` with ``features`` and ``coords``
  and no attributes at all, plus ``FEATURES/pt_files/<slide>.pt``.
- TRIDENT: ``JOB/20x_256px_<o>px_overlap/patches/<slide>_patches.h5`` and
  ``.../features_<encoder>/<slide>.h5``, whose ``coords`` carry ``patch_size``,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``,
  ``savetodir``; column k >= 1 sits at k * P - (k - 1) * overlap, column 0 at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mamba2d.cli import main
from mamba2d.data.bags import read_bag

DIM = 12
N_SLIDES = 12


def _resizable(f: h5py.File, name: str, data: np.ndarray) -> h5py.Dataset:
    return f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=(1, *data.shape[1:]))


def _clam_contours(rng: np.random.Generator, label: int) -> np.ndarray:
    """Level-0 coords of 2-3 contours (patch 256 at level 0 of a 20x slide), each from its own corner."""
    parts = []
    for c in range(int(rng.integers(2, 4))):
        x0, y0 = 3000 * c + int(rng.integers(0, 256)), 1000 + int(rng.integers(0, 256))
        h, w = int(rng.integers(3, 6)), int(rng.integers(3, 6))
        rows, cols = np.nonzero(rng.random((h, w)) < 0.85)
        parts.append(np.stack([x0 + cols * 256, y0 + rows * 256], 1))
    return np.concatenate(parts).astype(np.int64)


def _features(rng, n, label):
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    feats[:, 0] += 1.5 * label
    return feats


def _write_clam(root: Path, same_folder: bool) -> tuple[Path, Path]:
    """CLAM's patching and feature extraction; returns (features folder, labels CSV)."""
    rng = np.random.default_rng(0)
    results = root / "RESULTS"
    features = results if same_folder else root / "FEATURES"
    for d in (results / "patches", features / "h5_files", features / "pt_files"):
        d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(N_SLIDES):
        label = i % 2
        coords = _clam_contours(rng, label)
        with h5py.File(results / "patches" / f"slide_{i}.h5", "w") as f:
            ds = _resizable(f, "coords", coords)
            ds.attrs.update(patch_size=256, patch_level=0, downsample=np.array([1.0, 1.0]),
                            downsampled_level_dim=np.array([12000, 4000]), level_dim=np.array([12000, 4000]),
                            name=f"slide_{i}", save_path=str(results / "patches"))
        feats = _features(rng, len(coords), label)
        with h5py.File(features / "h5_files" / f"slide_{i}.h5", "w") as f:
            _resizable(f, "features", feats)
            _resizable(f, "coords", coords)
        torch.save(torch.from_numpy(feats), features / "pt_files" / f"slide_{i}.pt")
        rows.append(dict(case_id=f"patient_{i}", slide_id=f"slide_{i}", label=["normal", "tumor"][label]))
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return features, labels


def _trident_pos(k: int, p0: int, o0: int) -> int:
    return k * p0 - max(k - 1, 0) * o0


def _write_trident(root: Path, overlap: int) -> tuple[Path, Path]:
    """TRIDENT at 20x with 256-px patches on a 40x slide (patch_size_level0 512)."""
    rng = np.random.default_rng(1)
    job = root / f"20x_256px_{overlap}px_overlap"
    patches, features = job / "patches", job / "features_uni_v1"
    patches.mkdir(parents=True)
    features.mkdir(parents=True)
    o0 = overlap * 2
    rows = []
    for i in range(N_SLIDES):
        label = i % 2
        cols, rws = np.nonzero(rng.random((6, 7)) < 0.7)
        coords = np.stack([[_trident_pos(c, 512, o0) for c in cols],
                           [_trident_pos(r, 512, o0) for r in rws]], 1)
        attrs = dict(patch_size=256, patch_size_level0=512, level0_magnification=40, target_magnification=20,
                     overlap=overlap, name=f"slide_{i}", savetodir=str(job))
        with h5py.File(patches / f"slide_{i}_patches.h5", "w") as f:
            f.create_dataset("coords", data=coords).attrs.update(attrs)
        with h5py.File(features / f"slide_{i}.h5", "w") as f:
            f.create_dataset("features", data=_features(rng, len(coords), label))
            f.create_dataset("coords", data=coords).attrs.update(attrs)
        rows.append(dict(slide_id=f"slide_{i}.svs", label=["normal", "tumor"][label]))
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return features, labels


def _train_2d(features: Path, labels: Path, out: Path) -> dict:
    rc = main(["train", "--features", str(features), "--labels", str(labels), "--folds", "3", "--epochs", "2",
               "--model", "2dmambamil", "--model-arg", "backend=torch", "--no-progress", "--out", str(out)])
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("same_folder", [True, False], ids=["features-in-results", "sibling-folders"])
def test_clam_features_h5_without_attributes_train_2dmambamil(tmp_path, same_folder):
    features, labels = _write_clam(tmp_path, same_folder)
    bag = read_bag(features / "h5_files" / "slide_0.h5")
    assert bag.patch_size_level0 == 256 and bag.size_source is not None
    assert bag.size_source.parent.name == "patches"
    grid = bag.grid()
    assert grid.tilings >= 2 and len(torch.unique(grid.flat)) == bag.n_patches
    metrics = _train_2d(features, labels, tmp_path / "run")
    assert len(metrics["runs"]) == 3


def test_clam_pt_files_train_2dmambamil(tmp_path):
    features, labels = _write_clam(tmp_path, same_folder=True)
    for h5 in (features / "h5_files").iterdir():  # only the .pt bags are left
        h5.unlink()
    (features / "h5_files").rmdir()
    assert _train_2d(features, labels, tmp_path / "run")["runs"]


@pytest.mark.parametrize("overlap", [0, 64])
def test_trident_features_train_2dmambamil_with_their_overlap(tmp_path, overlap):
    features, labels = _write_trident(tmp_path, overlap)
    bag = read_bag(features / "slide_3.h5")
    assert (bag.patch_size_level0, bag.overlap_level0) == (512, 2 * overlap)
    grid = bag.grid()
    # Every patch lands on the cell TRIDENT tiled it as: overlap undone, no patch moved.
    with h5py.File(features / "slide_3.h5") as f:
        coords = f["coords"][()]
    step = 512 - 2 * overlap
    col = np.where(coords[:, 0] == 0, 0, (coords[:, 0] - 2 * overlap) // step)
    assert grid.moved == 0 and (grid.cols.numpy() == col - col.min()).all()
    assert _train_2d(features, labels, tmp_path / "run")["runs"]
