"""Real-image datasets for the vision backbone: Fashion-MNIST for classification, and Fashion-MNIST
mosaics for semantic segmentation.

A mosaic is a square canvas cut into 32 x 32 cells. Each cell holds, with probability ``fill``,
one Fashion-MNIST image rescaled to a side of 16 to 32 pixels and placed at a random offset in
the cell. Each pixel is labelled with its image's class + 1 where the garment is (intensity above
``threshold``), and 0 (background) elsewhere, so the task is to find and name every garment's
silhouette. Canvases are drawn once from a seed and are identical on every call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mamba2d.data.images import FMNIST_CLASSES, load_fashion_mnist
from mamba2d.extras import require

__all__ = ["MOSAIC_CLASSES", "FashionMNISTImages", "MosaicSegmentation", "make_mosaics"]

MOSAIC_CLASSES: tuple[str, ...] = ("background",) + FMNIST_CLASSES
_CELL = 32
_SIDES = (16, 20, 24, 28, 32)


def make_mosaics(images: np.ndarray, labels: np.ndarray, n: int, size: int = 64, fill: float = 0.75,
                 threshold: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases (n, size, size) uint8 and their label maps (n, size, size) uint8 with values
    0 (background) to 10, from source ``images`` (N, 28, 28) uint8 and ``labels`` (N,) in 0..9.

    ``size`` must be a positive multiple of 32; ``threshold`` is the grey level (0-255) above which
    a pixel belongs to its garment.
    """
    if size < _CELL or size % _CELL:
        raise ValueError(f"mosaic size must be a positive multiple of {_CELL}, got {size}")
    if images.ndim != 3 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need images (N, h, w) and labels (N,) with N > 0, got {images.shape} and "
                         f"{labels.shape}")
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    rng = np.random.default_rng(seed)
    cells = size // _CELL
    shape = (n, cells, cells)
    used = rng.random(shape) < fill
    src = rng.integers(0, images.shape[0], shape)
    side = rng.choice(np.array(_SIDES), shape)
    off_y = (rng.random(shape) * (_CELL - side + 1)).astype(int)
    off_x = (rng.random(shape) * (_CELL - side + 1)).astype(int)
    canvas = np.zeros((n, size, size), np.uint8)
    target = np.zeros((n, size, size), np.uint8)
    for s in _SIDES:  # one resize per tile side, for every tile of that side at once
        where = np.argwhere(used & (side == s))
        if len(where) == 0:
            continue
        chosen = torch.from_numpy(np.array(images[src[tuple(where.T)]], dtype=np.float32))[:, None]
        tiles = F.interpolate(chosen, size=(s, s), mode="bilinear", antialias=True,
                              align_corners=False)
        tiles = tiles[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
        for (k, cy, cx), tile in zip(where, tiles, strict=True):
            y, x = cy * _CELL + off_y[k, cy, cx], cx * _CELL + off_x[k, cy, cx]
            canvas[k, y:y + s, x:x + s] = tile
            target[k, y:y + s, x:x + s] = np.where(tile > threshold, labels[src[k, cy, cx]] + 1, 0)
    return canvas, target


class MosaicSegmentation(Dataset):
    """Fashion-MNIST mosaics: items (image (1, size, size) float in [0, 1], labels (size, size) int64).

    Training mosaics are drawn from the 60k training images, validation ones from the 10k test
    images, so no garment is shared between the two.
    """

    num_classes = len(MOSAIC_CLASSES)

    def __init__(self, split: str = "train", n: int = 10000, size: int = 64, seed: int = 0,
                 root: str | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        images, labels = load_fashion_mnist(root, "train" if split == "train" else "test")
        # Different seeds for the two splits, so their layouts differ too.
        canvas, target = make_mosaics(images, labels, n, size, seed=seed * 2 + (split == "val"))
        self.images = torch.from_numpy(canvas)
        self.targets = torch.from_numpy(target).long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i][None].float() / 255.0, self.targets[i]


class FashionMNISTImages(Dataset):
    """Fashion-MNIST as (PIL image, label) pairs, so that timm's transforms apply; ``limit`` keeps
    the first n images of the split ("train": 60k, "val": the 10k test images)."""

    classes = FMNIST_CLASSES

    def __init__(self, split: str = "train", transform=None, limit: int | None = None,
                 root: str | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        images, labels = load_fashion_mnist(root, "train" if split == "train" else "test")
        self.images, self.labels = images[:limit], labels[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        Image = require("PIL.Image", "vision")

        image = Image.fromarray(self.images[i])  # uint8 (h, w): greyscale "L"
        return (self.transform(image) if self.transform else image), int(self.labels[i])
