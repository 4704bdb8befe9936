"""Image sources and the packaged encoder: real data loads, bad files give named errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from mamba2d.data.images import _FILES, find_fashion_mnist, load_digits_images, load_fashion_mnist
from mamba2d.wsi.encoders import EfficientNetLite0Encoder


def _write_idx(folder, images, labels, split="train"):
    img_name, lab_name = _FILES[split]
    n, h, w = images.shape
    with gzip.open(folder / img_name, "wb") as fh:
        head = b"".join(d.to_bytes(4, "big") for d in (2051, n, h, w))
        fh.write(head + images.tobytes())
    with gzip.open(folder / lab_name, "wb") as fh:
        fh.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


def _fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split in _FILES:
        _write_idx(tmp_path, rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5), split)
    return tmp_path


def test_idx_round_trip(tmp_path):
    folder = _fake_fmnist(tmp_path)
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
    _write_idx(folder, images, labels, "test")
    got_images, got_labels = load_fashion_mnist(folder, "test")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_bad_idx_files_are_named(tmp_path):
    folder = _fake_fmnist(tmp_path)
    (folder / _FILES["train"][0]).write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(folder, "train")
    with gzip.open(folder / _FILES["test"][0], "wb") as fh:
        fh.write((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28)) + b"\0" * 10)
    with pytest.raises(ValueError, match="expected 3920 bytes"):
        load_fashion_mnist(folder, "test")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(folder, "val")


def test_missing_dataset_names_the_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("mamba2d.data.images.DEFAULT_FMNIST_DIR", tmp_path / "none")
    monkeypatch.delenv("MAMBA2D_FMNIST_DIR", raising=False)
    assert find_fashion_mnist(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty")


def test_real_fashion_mnist_when_installed():
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed")
    images, labels = load_fashion_mnist(split="test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def test_digits_fallback_is_real_and_8_bit():
    images, labels = load_digits_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert set(labels.tolist()) == set(range(10))


def test_encoder_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        EfficientNetLite0Encoder(tmp_path / "nope.pth")
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not EfficientNet-lite0 weights"):
        EfficientNetLite0Encoder(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        EfficientNetLite0Encoder(tmp_path / "junk.pth")


def test_encoder_input_checks():
    enc = EfficientNetLite0Encoder()
    with pytest.raises(ValueError, match="uint8"):
        enc.encode(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        enc(torch.rand(2, 1, 32, 32))
    enc.train()
    assert not enc.net.training  # frozen encoder never switches batch norm to training
