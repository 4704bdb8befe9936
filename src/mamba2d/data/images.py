"""Real image sources that ship with packages: Fashion-MNIST (Debian's ``dataset-fashion-mnist``)
and, as a fallback, scikit-learn's bundled 8 x 8 digits."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def find_fashion_mnist(root: str | Path | None = None) -> Path | None:
    """The first folder holding the four Fashion-MNIST idx files: ``root``, $MAMBA2D_FMNIST_DIR, then
    Debian's /usr/share/datasets/fashion-mnist. None if none does."""
    candidates = [root, os.environ.get("MAMBA2D_FMNIST_DIR"), DEFAULT_FMNIST_DIR]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for pair in _FILES.values() for f in pair):
            return Path(c)
    return None


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from err
    head = 4 + 4 * ndim
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        raise ValueError(f"{path}: not an idx file with magic number {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - head != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape {dims}, "
                         f"found {len(raw) - head}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train": 60k,
    "test": 10k). Raises FileNotFoundError naming the folders searched when it is absent."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(root)
    if folder is None:
        tried = [str(c) for c in (root, os.environ.get("MAMBA2D_FMNIST_DIR"), DEFAULT_FMNIST_DIR) if c]
        raise FileNotFoundError(f"Fashion-MNIST not found in {', '.join(tried)}; install Debian's "
                                f"'dataset-fashion-mnist' or pass its folder")
    img_name, lab_name = _FILES[split]
    images = _read_idx(folder / img_name, 2051, 3)
    labels = _read_idx(folder / lab_name, 2049, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels in {split}")
    return images, labels


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) uint8 images scaled from 0-16 to 0-255, and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)
