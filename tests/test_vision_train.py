"""`mamba2d vision-train` on CPU with a small 2DVMamba: classification on real Fashion-MNIST images
and on an ImageFolder of them, mosaic segmentation, resume equal to an uninterrupted run, DDP on two
CPU processes, the ImageNet recipe files, and errors that name the bad option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba2d.cli import main
from mamba2d.data.images import find_fashion_mnist
from mamba2d.train.config import VisionTrainConfig

pytest.importorskip("timm")
needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
ROOT = Path(__file__).resolve().parents[1]
# A small model (same code path as vmamba2d_tiny) keeps each CPU epoch to seconds.
SMALL = ["--model-arg", "dims=16", "--model-arg", "depths=[1,1,1,1]", "--model-arg", "backend=torch",
         "--workers", "0", "--no-progress", "--device", "cpu"]


def _cls(out: Path, *extra: str) -> list[str]:
    return ["vision-train", "--out", str(out), "--train-limit", "64", "--val-limit", "32",
            "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", *SMALL, *extra]


@needs_fmnist
def test_classification_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    assert main(_cls(out, "--ema", "--ema-decay", "0.9")) == 0
    for name in ("config.yaml", "history.csv", "metrics.json", "last.pt", "best.pt", "curves.png",
                 "confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and 0.0 <= metrics["final_val_top1"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"])) == 32  # every validation image counted once
    assert "final_ema_val_top1" in metrics and len(metrics["per_class_accuracy"]) == 10
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,train_loss,val_loss,val_top1")
    # best.pt is a plain state dict that timm (and torch) load safely.
    import timm

    model = timm.create_model("vmamba2d_tiny", num_classes=10, in_chans=1, dims=16, depths=(1, 1, 1, 1),
                              checkpoint_path=str(out / "best.pt"), backend="torch")
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert main(_cls(out)) == 2  # an existing run is not overwritten


@needs_fmnist
def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_cls(whole, "--mixup", "0.2", "--drop-path", "0.1")) == 0
    assert main(_cls(parts, "--mixup", "0.2", "--drop-path", "0.1", "--stop-after-epochs", "1")) == 0
    assert len((parts / "history.csv").read_text().splitlines()) == 2
    assert not (parts / "metrics.json").exists()
    assert main(["vision-train", "--resume", "--out", str(parts), "--no-progress"]) == 0
    a = torch.load(whole / "last.pt", weights_only=True)["model"]
    b = torch.load(parts / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((whole / "metrics.json").read_text())
    mb = json.loads((parts / "metrics.json").read_text())
    assert ma["final_val_top1"] == mb["final_val_top1"] and ma["final_val_loss"] == mb["final_val_loss"]


@needs_fmnist
def test_segmentation_on_mosaics(tmp_path):
    out = tmp_path / "seg"
    args = ["vision-train", "--task", "segmentation", "--out", str(out), "--mosaics", "40",
            "--batch-size", "8", "--epochs", "1", "--head-channels", "16", *SMALL]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["img_size"] == 64 and 0.0 <= metrics["final_val_miou"] <= 1.0
    assert list(metrics["iou"]) == ["background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert (out / "examples.png").stat().st_size > 1000


@needs_fmnist
def test_image_folder_classification(tmp_path):
    _folder_of_real_images(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["vision-train", "--data", str(tmp_path / "data"), "--out", str(out), "--img-size", "32",
                 "--batch-size", "16", "--epochs", "1", *SMALL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class_accuracy"]) == {"bag", "trouser"}


@needs_fmnist
def test_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mamba2d", *_cls(out, "--epochs", "1", "--val-limit", "31")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Each rank validates its share (16 and 15 images); every image is counted once over both.
    assert sum(map(sum, metrics["confusion_matrix"])) == 31


@pytest.mark.parametrize("name", ["imagenet_2dvmamba_tiny.yaml", "imagenet_vmamba1d_tiny.yaml"])
def test_imagenet_recipe_files_hold_the_papers_values(name):
    cfg = VisionTrainConfig.load(ROOT / "configs" / name)
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.sched, cfg.opt) == (
        300, 1e-3, 0.05, 20, "cosine", "adamw")
    assert cfg.batch_size * 8 == 1024 and cfg.img_size == 224 and cfg.model.endswith("_tiny")


def test_bad_options_are_named(tmp_path, capsys):
    assert main(["vision-train", "--out", str(tmp_path / "a"), "--data", str(tmp_path / "nowhere")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["vision-train", "--out", str(tmp_path / "b"), "--task", "segmentation", "--data",
                 str(tmp_path)]) == 2
    assert "mosaics" in capsys.readouterr().err
    assert main(["vision-train", "--out", str(tmp_path / "c"), "--img-size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["vision-train", "--resume", "--out", str(tmp_path / "d")]) == 2
    assert "--resume" in capsys.readouterr().err


@needs_fmnist
def test_unknown_model_is_named(tmp_path, capsys):
    assert main(["vision-train", "--out", str(tmp_path / "m"), "--model", "no_such_net",
                 "--train-limit", "32", "--workers", "0", "--no-progress"]) == 2
    assert "no_such_net" in capsys.readouterr().err


def _folder_of_real_images(root: Path, corrupt: str | None = None) -> None:
    """Fashion-MNIST trousers and bags as RGB PNG files in ROOT/{train,val}/{trouser,bag}/."""
    from PIL import Image

    from mamba2d.data.images import load_fashion_mnist

    images, labels = load_fashion_mnist(split="test")
    for part, rows in (("train", range(0, 200)), ("val", range(200, 300))):
        for i in rows:
            if labels[i] in (1, 8):
                folder = root / part / ("trouser" if labels[i] == 1 else "bag")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).convert("RGB").save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "bag" / corrupt).write_bytes(b"not a png at all")


@needs_fmnist
def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    _folder_of_real_images(tmp_path / "data", corrupt="broken.png")
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["vision-train", "--data", str(tmp_path / "data"), "--out", str(out), "--img-size", "32",
                     "--batch-size", "8", "--epochs", "1", *SMALL]) == 0
    assert "broken.png" in caplog.text


def test_folder_without_val_and_missing_fashion_mnist_are_named(tmp_path, capsys, monkeypatch):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    assert main(["vision-train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r1"),
                 *SMALL]) == 2
    assert "no val/" in capsys.readouterr().err
    from mamba2d.data import images

    monkeypatch.setattr(images, "DEFAULT_FMNIST_DIR", tmp_path / "absent")
    monkeypatch.delenv("MAMBA2D_FMNIST_DIR", raising=False)
    assert main(["vision-train", "--out", str(tmp_path / "r2"), *SMALL]) == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err
