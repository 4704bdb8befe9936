"""Feature bags: CLAM / TRIDENT h5, CLAM .pt + patches h5, and the folder-level dataset."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mamba2d.data.bags import Bag, BagError, FeatureBagSet, read_bag, slide_stem

N, D = 12, 8


def _lattice(n: int = N, step: int = 512, x0: int = 1000, y0: int = 2048) -> np.ndarray:
    """(n, 2) int64 (x, y) on a 4-wide lattice of ``step`` pixels."""
    idx = np.arange(n)
    return np.stack([x0 + (idx % 4) * step, y0 + (idx // 4) * step], axis=1).astype(np.int64)


def _features(seed: int = 0, n: int = N, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def write_clam_h5(path: Path, feats: np.ndarray | None, coords: np.ndarray | None, *, patch_size: int = 256,
                  level: int = 1, downsample: tuple[float, float] = (2.0, 2.0)) -> Path:
    """A CLAM h5: level-0 patch side = patch_size * downsample[0]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if feats is not None:
            f.create_dataset("features", data=feats)
        if coords is not None:
            ds = f.create_dataset("coords", data=coords)
            ds.attrs["patch_size"] = patch_size
            ds.attrs["patch_level"] = level
            ds.attrs["downsample"] = np.asarray(downsample)
            ds.attrs["level_dim"] = np.asarray([50000, 40000])
    return path


def write_trident_h5(path: Path, feats: np.ndarray, coords: np.ndarray, *, level0: int | None = 512) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=coords)
        if level0 is not None:
            ds.attrs["patch_size_level0"] = level0
        ds.attrs["patch_size"] = 256
        ds.attrs["level0_magnification"] = 40
        ds.attrs["target_magnification"] = 20
    return path


def write_pt(path: Path, feats: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(feats), path)
    return path


# --------------------------------------------------------------------------------------------------
# slide_stem


@pytest.mark.parametrize("name, stem", [
    ("TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-D8FB-45CF-B4BD-C6B76294C291.svs",
     "TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-D8FB-45CF-B4BD-C6B76294C291"),
    ("TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF", "TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF"),
    ("slide.SVS", "slide"), (" slide.ndpi ", "slide"), ("a.b.ome.tiff", "a.b"), ("x.mrxs", "x"),
    ("/data/wsi/x.tif", "x"), ("x.h5", "x.h5"), (Path("dir/y.czi"), "y"),
])
def test_slide_stem(name: str, stem: str) -> None:
    assert slide_stem(name) == stem


# --------------------------------------------------------------------------------------------------
# read_bag: formats


def test_clam_h5_round_trip(tmp_path: Path) -> None:
    feats, coords = _features(), _lattice()
    path = write_clam_h5(tmp_path / "slide_a.h5", feats, coords, patch_size=256, downsample=(2.0, 2.0))
    bag = read_bag(path)
    assert isinstance(bag, Bag)
    assert bag.slide_id == "slide_a" and bag.path == path
    assert bag.features.dtype == torch.float32 and bag.coords.dtype == torch.int64
    assert torch.equal(bag.features, torch.from_numpy(feats))
    assert torch.equal(bag.coords, torch.from_numpy(coords))
    assert bag.patch_size_level0 == 512 and bag.n_patches == N and bag.feature_dim == D
    grid = bag.grid()
    assert (grid.height, grid.width) == (3, 4)
    assert grid.cols.tolist() == [i % 4 for i in range(N)]


def test_clam_h5_leading_one_and_odd_downsample(tmp_path: Path) -> None:
    feats = _features(1)
    # Batch axis kept by some extractors; a downsample like 4.0002 still means 1024 pixels.
    path = write_clam_h5(tmp_path / "b.h5", feats[None], _lattice(step=1024).astype(np.int32), patch_size=256,
                         level=2, downsample=(4.0002, 4.0001))
    bag = read_bag(path)
    assert bag.features.shape == (N, D) and torch.equal(bag.features, torch.from_numpy(feats))
    assert bag.coords.dtype == torch.int64
    assert bag.patch_size_level0 == 1024


def test_clam_h5_level0_without_downsample(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=_features())
        ds = f.create_dataset("coords", data=_lattice(step=224))
        ds.attrs.update({"patch_size": 224, "patch_level": 0})
    assert read_bag(path).patch_size_level0 == 224


def test_trident_h5(tmp_path: Path) -> None:
    feats, coords = _features(2).astype(np.float16), _lattice()
    bag = read_bag(write_trident_h5(tmp_path / "t.h5", feats, coords, level0=512))
    assert bag.patch_size_level0 == 512
    assert torch.equal(bag.features, torch.from_numpy(feats.astype(np.float32)))
    # Without patch_size_level0, the magnifications give it: 256 * 40 / 20.
    bag = read_bag(write_trident_h5(tmp_path / "u.h5", feats, coords, level0=None))
    assert bag.patch_size_level0 == 512


def test_pt_with_patches_h5(tmp_path: Path) -> None:
    feats, coords = _features(3), _lattice()
    pt = write_pt(tmp_path / "feats" / "pt_files" / "s1.pt", feats)
    patches = write_clam_h5(tmp_path / "patches" / "s1.h5", None, coords, patch_size=256, downsample=(2, 2))
    bag = read_bag(pt, coords_path=patches)
    assert torch.equal(bag.features, torch.from_numpy(feats))
    assert torch.equal(bag.coords, torch.from_numpy(coords))
    assert bag.patch_size_level0 == 512 and bag.slide_id == "s1"
    # CLAM layout: feats/pt_files/s1.pt finds patches/s1.h5 two levels up without being told.
    found = read_bag(tmp_path / "feats" / "pt_files" / "s1.pt")
    assert torch.equal(found.coords, bag.coords)


def test_pt_without_coords(tmp_path: Path) -> None:
    pt = write_pt(tmp_path / "lonely.pt", _features())
    with pytest.raises(BagError, match=r"lonely\.pt: no coordinates.*coords_path"):
        read_bag(pt)


# --------------------------------------------------------------------------------------------------
# read_bag: patch size argument


def test_patch_size_argument(tmp_path: Path) -> None:
    feats, coords = _features(), _lattice()
    path = write_clam_h5(tmp_path / "p.h5", feats, coords, patch_size=256, downsample=(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_bag(path, patch_size=512).patch_size_level0 == 512  # agrees: no warning
    with pytest.warns(UserWarning, match=r"p\.h5: patch_size=256 overrides .* 512"):
        assert read_bag(path, patch_size=256).patch_size_level0 == 256
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords)
    assert read_bag(bare, patch_size=512).patch_size_level0 == 512
    bag = read_bag(bare)
    assert bag.patch_size_level0 is None
    with pytest.raises(BagError, match=r"bare\.h5: coords: no patch size"):
        bag.grid()
    with pytest.raises(BagError, match="positive int"):
        read_bag(bare, patch_size=0)


def test_grid_errors_name_the_file(tmp_path: Path) -> None:
    path = write_clam_h5(tmp_path / "off.h5", _features(), _lattice(step=500), patch_size=256,
                         downsample=(2, 2))
    with pytest.raises(BagError, match=r"off\.h5: coords: .* not tilings of 512-pixel patches"):
        read_bag(path).grid()


# --------------------------------------------------------------------------------------------------
# read_bag: bad input


def _h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BagError, match=r"nope\.h5: no such file"):
        read_bag(tmp_path / "nope.h5")
    with pytest.raises(BagError, match=r"nope\.pt: no such file"):
        read_bag(tmp_path / "nope.pt", coords_path=tmp_path / "c.h5")


def test_garbage_and_truncated_h5(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(BagError, match=r"garbage\.h5: not a readable HDF5 file"):
        read_bag(garbage)
    good = write_clam_h5(tmp_path / "cut.h5", _features(n=400, d=64), _lattice(n=400))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(BagError, match=r"cut\.h5"):
        read_bag(good)


def test_missing_datasets_listed(tmp_path: Path) -> None:
    path = _h5(tmp_path / "nofeat.h5", coords=_lattice(), extra=np.zeros(3))
    with pytest.raises(BagError, match=r"nofeat\.h5: no 'features' dataset; the file holds: coords, extra"):
        read_bag(path)
    path = _h5(tmp_path / "nocoords.h5", features=_features())
    with pytest.raises(BagError, match=r"nocoords\.h5: no 'coords' dataset; the file holds: features"):
        read_bag(path)


@pytest.mark.parametrize("feats, coords, message", [
    (np.zeros(N, np.float32), _lattice(), r"'features' must be \(N, D\), got shape \(12,\)"),
    (np.zeros((2, N, D), np.float32), _lattice(), r"'features' must be \(N, D\), got shape \(2, 12, 8\)"),
    (_features(), _lattice()[:, :1], r"'coords' must be \(N, 2\), got shape \(12, 1\)"),
    (_features(), _lattice()[:10], "12 feature rows but 10 coordinates"),
    (np.zeros((0, D), np.float32), np.zeros((0, 2), np.int64), r"empty bag \(0 patches\)"),
    (_features(), _lattice() + 0.5, "whole, finite pixel"),
    (np.array([["a"] * D] * N, dtype="S1"), _lattice(), "must be real numbers"),
])
def test_bad_shapes(tmp_path: Path, feats: np.ndarray, coords: np.ndarray, message: str) -> None:
    path = _h5(tmp_path / "bad.h5", features=feats, coords=coords)
    with pytest.raises(BagError, match=r"bad\.h5: .*" + message):
        read_bag(path)


def test_non_finite_rows(tmp_path: Path) -> None:
    feats = _features()
    feats[3, 1], feats[7, 0], feats[7, 2] = np.nan, np.inf, -np.inf
    path = write_clam_h5(tmp_path / "nan.h5", feats, _lattice())
    with pytest.raises(BagError, match=r"nan\.h5: features: 2 of 12 rows hold NaN or Inf \(first: row 3\)"):
        read_bag(path)
    assert torch.isnan(read_bag(path, check_finite=False).features[3, 1])


def test_duplicate_coords(tmp_path: Path) -> None:
    coords = _lattice()
    coords[5] = coords[1]
    coords[9] = coords[1]
    path = write_clam_h5(tmp_path / "dup.h5", _features(), coords)
    x, y = coords[1]
    with pytest.raises(BagError, match=rf"dup\.h5: 2 patch\(es\) repeat .*first duplicate \(x={x}, y={y}\) "
                                       r"at row 5"):
        read_bag(path)


def test_bad_attribute(tmp_path: Path) -> None:
    path = write_clam_h5(tmp_path / "attr.h5", _features(), _lattice(), downsample=(-1.0, -1.0))
    with pytest.raises(BagError, match=r"attr\.h5: coords attribute 'downsample' must be a positive number"):
        read_bag(path)


def test_bad_pt_files(tmp_path: Path) -> None:
    coords = write_clam_h5(tmp_path / "c.h5", None, _lattice())
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a torch file")
    with pytest.raises(BagError, match=r"garbage\.pt: not a readable weights-only torch file"):
        read_bag(garbage, coords_path=coords)
    mapping = tmp_path / "dict.pt"
    torch.save({"features": torch.zeros(N, D)}, mapping)
    with pytest.raises(BagError, match=r"dict\.pt: expected a \(N, D\) feature tensor, got dict"):
        read_bag(mapping, coords_path=coords)
    short = write_pt(tmp_path / "short.pt", _features(n=5))
    with pytest.raises(BagError, match=r"short\.pt: 5 feature rows but 12 coordinates \(coords from .*c\.h5"):
        read_bag(short, coords_path=coords)
    no_coords = _h5(tmp_path / "nc.h5", features=_features())
    with pytest.raises(BagError, match=r"nc\.h5: no 'coords' dataset"):
        read_bag(write_pt(tmp_path / "ok.pt", _features()), coords_path=no_coords)
    with pytest.raises(BagError, match=r"x\.npy: unknown bag format"):
        read_bag(tmp_path / "x.npy")


# --------------------------------------------------------------------------------------------------
# FeatureBagSet


def _trident_dir(root: Path, n_slides: int = 3, d: int = D) -> list[np.ndarray]:
    feats = [_features(seed=i, n=N + i, d=d) for i in range(n_slides)]
    for i, f in enumerate(feats):
        write_trident_h5(root / f"slide{i}.h5", f, _lattice(n=N + i))
    return feats


def test_bag_set_h5(tmp_path: Path) -> None:
    feats = _trident_dir(tmp_path)
    ds = FeatureBagSet(tmp_path, ["slide0.svs", "slide1", "slide2.tiff"])
    assert len(ds) == 3 and ds.slide_ids == ["slide0", "slide1", "slide2"]
    assert ds.feature_dim == D
    for i in range(3):
        bag = ds[i]
        assert bag.slide_id == f"slide{i}" and torch.equal(bag.features, torch.from_numpy(feats[i]))
        assert bag.patch_size_level0 == 512
    assert ds.index_of("slide2.svs") == 2
    report = ds.validate()
    assert (report.n_slides, report.feature_dim) == (3, D)
    assert (report.n_patches_min, report.n_patches_max, report.n_patches_total) == (N, N + 2, 3 * N + 3)
    assert report.patch_sizes_level0 == (512,) and report.skipped == {}


def test_bag_set_lazy_and_cache(tmp_path: Path) -> None:
    _trident_dir(tmp_path, 1)
    lazy = FeatureBagSet(tmp_path, ["slide0"])
    cached = FeatureBagSet(tmp_path, ["slide0"], cache=True)
    first = cached[0]
    new = _features(seed=99)
    write_trident_h5(tmp_path / "slide0.h5", new, _lattice())
    assert torch.equal(lazy[0].features, torch.from_numpy(new))  # read at access, so it sees the new file
    assert cached[0] is first  # kept from the first read


def test_bag_set_clam_layouts(tmp_path: Path) -> None:
    feats_dir = tmp_path / "features"
    f_h5, f_pt = _features(10), _features(11)
    write_clam_h5(feats_dir / "h5_files" / "a.h5", f_h5, _lattice())
    write_pt(feats_dir / "pt_files" / "b.pt", f_pt)
    write_clam_h5(tmp_path / "patches" / "b.h5", None, _lattice(step=1024), downsample=(4.0, 4.0))
    ds = FeatureBagSet(feats_dir, ["a.svs", "b.svs"])
    assert ds.paths["a"].parent.name == "h5_files" and ds.coords_paths["a"] is None
    assert ds.coords_paths["b"] == tmp_path / "patches" / "b.h5"
    assert torch.equal(ds[0].features, torch.from_numpy(f_h5))
    assert torch.equal(ds[1].features, torch.from_numpy(f_pt))
    assert ds[1].patch_size_level0 == 1024
    # An explicit coords_dir is the only place looked in.
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(BagError, match=r"b\.pt has no coordinates file; looked for .*other"):
        FeatureBagSet(feats_dir, ["b"], coords_dir=other)
    write_clam_h5(other / "b.h5", None, _lattice())
    assert FeatureBagSet(feats_dir, ["b"], coords_dir=other)[0].patch_size_level0 == 512


def test_bag_set_prefers_h5(tmp_path: Path) -> None:
    f_h5 = _features(1)
    write_trident_h5(tmp_path / "s.h5", f_h5, _lattice())
    write_pt(tmp_path / "s.pt", _features(2))
    assert torch.equal(FeatureBagSet(tmp_path, ["s"])[0].features, torch.from_numpy(f_h5))


def test_bag_set_missing(tmp_path: Path) -> None:
    _trident_dir(tmp_path, 1)
    ids = ["slide0"] + [f"ghost{i}.svs" for i in range(7)]
    with pytest.raises(BagError, match=r"7 slide\(s\) have no features: \['ghost0', .*'ghost4'\] and 2 more; "
                                       rf"ghost0: no ghost0\.h5 or ghost0\.pt in {tmp_path}"):
        FeatureBagSet(tmp_path, ids)
    with pytest.warns(UserWarning, match="skipping slide ghost"):
        ds = FeatureBagSet(tmp_path, ids, skip_bad=True)
    assert ds.slide_ids == ["slide0"] and set(ds.skipped) == {f"ghost{i}" for i in range(7)}
    with pytest.raises(BagError, match="listed more than once"):
        FeatureBagSet(tmp_path, ["slide0", "slide0.svs"])
    with pytest.raises(BagError, match="features folder does not exist"):
        FeatureBagSet(tmp_path / "nowhere", ["slide0"])


def test_bag_set_validate_bad_files(tmp_path: Path) -> None:
    _trident_dir(tmp_path, 3)
    (tmp_path / "slide1.h5").write_bytes(b"garbage")
    ds = FeatureBagSet(tmp_path, ["slide0", "slide1", "slide2"])
    with pytest.raises(BagError, match=r"slide1\.h5: not a readable HDF5 file"):
        ds.validate()
    ds = FeatureBagSet(tmp_path, ["slide0", "slide1", "slide2"], skip_bad=True, cache=True)
    with pytest.warns(UserWarning, match=r"skipping slide slide1: .*slide1\.h5"):
        report = ds.validate()
    assert ds.slide_ids == ["slide0", "slide2"] and list(ds.skipped) == ["slide1"]
    assert report.n_slides == 2 and report.skipped == ds.skipped
    assert ds[1].slide_id == "slide2"


def test_bag_set_dim_mismatch(tmp_path: Path) -> None:
    _trident_dir(tmp_path, 3)
    write_trident_h5(tmp_path / "odd.h5", _features(d=D + 4), _lattice())
    ds = FeatureBagSet(tmp_path, ["slide0", "slide1", "odd", "slide2"])
    with pytest.raises(BagError, match=rf"odd\.h5 has D={D + 4} but .*slide0\.h5 has D={D}"):
        ds.validate()
    # The majority decides which slides are odd, even when the odd one comes first.
    ds = FeatureBagSet(tmp_path, ["odd", "slide0", "slide1", "slide2"], skip_bad=True)
    assert ds.feature_dim == D + 4  # peeked from the first file before validation
    with pytest.warns(UserWarning, match=rf"skipping slide odd: .*odd\.h5 has D={D + 4}"):
        report = ds.validate()
    assert report.feature_dim == D and ds.feature_dim == D and ds.slide_ids == ["slide0", "slide1", "slide2"]
