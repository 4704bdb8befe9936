"""The images a benchmark's tiles show: Fashion-MNIST, or scikit-learn's digits when it is absent,
split into train and test images, and the per-class pools slides draw from."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mamba2d.bench.config import S_POOL, BenchmarkConfig, BenchmarkError, random_stream
from mamba2d.data.images import find_fashion_mnist, load_digits_images, load_fashion_mnist

__all__ = ["ImageSource", "class_pools", "image_pools", "load_source", "load_split", "source_key"]

_DIGITS_TEST_EVERY = 4  # digits fallback: every 4th image is a test image, the rest train


@dataclass(frozen=True, eq=False)
class ImageSource:
    """The image source actually used: (N, s, s) uint8 images and (N,) labels per image split."""

    key: str  # "fmnist" or "digits", used in cache names
    name: str
    folder: str | None
    images: dict[str, np.ndarray] = field(repr=False)
    labels: dict[str, np.ndarray] = field(repr=False)

    @property
    def tile_size(self) -> int:
        return int(self.images["train"].shape[1])


def source_key(fmnist_dir: str | None) -> tuple[str, Path | None]:
    """("fmnist", its folder) where Fashion-MNIST is found, else ("digits", None)."""
    folder = find_fashion_mnist(fmnist_dir)
    return ("fmnist", folder) if folder is not None else ("digits", None)


@functools.lru_cache(maxsize=4)
def load_split(key: str, folder: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, s, s) uint8 and labels (N,) of one image split ("train", "test") of a source."""
    if key == "fmnist":
        return load_fashion_mnist(folder, split)
    images, labels = load_digits_images()
    # The digits have no official split: a fixed one (every 4th image is test) keeps them apart.
    test = np.arange(len(images)) % _DIGITS_TEST_EVERY == 0
    pick = test if split == "test" else ~test
    return images[pick], labels[pick]


def load_source(fmnist_dir: str | None, *, warn: bool = True) -> ImageSource:
    """Both image splits of Fashion-MNIST, or of the digits (with a loud warning) without it."""
    key, folder = source_key(fmnist_dir)
    if key == "digits" and warn:
        warnings.warn("Fashion-MNIST was not found (fmnist_dir, $MAMBA2D_FMNIST_DIR, "
                      "/usr/share/datasets/fashion-mnist): FALLING BACK to scikit-learn's 8x8 digits. "
                      "This benchmark is not comparable to one built from Fashion-MNIST; install "
                      "Debian's 'dataset-fashion-mnist' or pass fmnist_dir", UserWarning, stacklevel=3)
    name = "fashion-mnist" if key == "fmnist" else "sklearn-digits"
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = load_split(key, str(folder) if folder else None, split)
    return ImageSource(key=key, name=name, folder=str(folder) if folder else None, images=images,
                       labels=labels)


def image_pools(config: BenchmarkConfig, source: ImageSource) -> dict[str, dict[int, np.ndarray]]:
    """Per image split, per used class: the sorted (pool,) indices of images slides may show."""
    classes = sorted({config.lesion_class, config.decoy_class, *config.background_classes})
    return class_pools(source, classes, config.pool_per_class, config.seed)


def class_pools(source: ImageSource, classes: Sequence[int], per_class: int,
                seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Per image split ("train", "test"), per class of ``classes`` (sorted): the sorted indices of
    ``per_class`` images (all, if fewer) drawn without replacement from the seed."""
    pools: dict[str, dict[int, np.ndarray]] = {}
    for code, split in enumerate(("train", "test")):
        rng = random_stream(S_POOL, seed, code)
        pools[split] = {}
        for cls in sorted(classes):
            cand = np.flatnonzero(source.labels[split] == cls)
            if len(cand) == 0:
                raise BenchmarkError(f"{source.name} {split} has no images of class {cls}")
            n = min(per_class, len(cand))
            pools[split][cls] = np.sort(rng.choice(cand, n, replace=False))
    return pools
