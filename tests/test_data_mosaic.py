"""Fashion-MNIST mosaics for segmentation: layout, labels that follow each garment's silhouette,
determinism, the train/val source split, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from mamba2d.data.images import find_fashion_mnist, load_fashion_mnist
from mamba2d.data.mosaic import MOSAIC_CLASSES, FashionMNISTImages, MosaicSegmentation, make_mosaics

needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def fmnist_test():
    images, labels = load_fashion_mnist(split="test")
    return images[:2000], labels[:2000]


@needs_fmnist
def test_labels_follow_the_garments(fmnist_test):
    images, labels = fmnist_test
    canvas, target = make_mosaics(images, labels, n=40, size=96, threshold=40, seed=3)
    assert canvas.shape == target.shape == (40, 96, 96) and canvas.dtype == target.dtype == np.uint8
    assert target.max() <= 10 and set(np.unique(target)) - {0}
    # A pixel is foreground exactly where the garment is brighter than the threshold.
    assert np.array_equal(target > 0, canvas > 40)
    # Each 32 x 32 cell holds at most one garment, so at most one class.
    cells = target.reshape(40, 3, 32, 3, 32).transpose(0, 1, 3, 2, 4).reshape(40 * 9, -1)
    assert all(len(set(np.unique(c)) - {0}) <= 1 for c in cells)
    assert 0.4 < np.mean([c.any() for c in cells]) < 0.95  # fill 0.75, minus near-blank garments


@needs_fmnist
def test_each_class_label_is_its_source_image_class(fmnist_test):
    images, labels = fmnist_test
    keep = labels == 8  # only bags: every foreground pixel must be labelled Bag (8 + 1)
    canvas, target = make_mosaics(images[keep], labels[keep], n=10, size=64, seed=0)
    assert set(np.unique(target)) == {0, 9} and MOSAIC_CLASSES[9] == "Bag"


@needs_fmnist
def test_mosaics_are_deterministic_per_seed(fmnist_test):
    images, labels = fmnist_test
    a = make_mosaics(images, labels, n=8, size=64, seed=1)
    b = make_mosaics(images, labels, n=8, size=64, seed=1)
    c = make_mosaics(images, labels, n=8, size=64, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


def test_bad_arguments_are_named():
    images, labels = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8), np.arange(4)
    with pytest.raises(ValueError, match="multiple of 32"):
        make_mosaics(images, labels, 2, size=40)
    with pytest.raises(ValueError, match="fill"):
        make_mosaics(images, labels, 2, fill=0.0)
    with pytest.raises(ValueError, match="labels"):
        make_mosaics(images, labels[:3], 2)
    with pytest.raises(ValueError, match="split"):
        MosaicSegmentation("test")


@needs_fmnist
def test_datasets_return_tensors_and_pil_images():
    seg = MosaicSegmentation("val", n=6, size=64)
    image, target = seg[0]
    assert image.shape == (1, 64, 64) and 0.0 <= image.min() and image.max() <= 1.0
    assert target.shape == (64, 64) and target.dtype.is_floating_point is False
    train = MosaicSegmentation("train", n=6, size=64)
    assert not np.array_equal(train.images.numpy(), seg.images.numpy())  # other images, other layouts
    cls = FashionMNISTImages("val", limit=5)
    picture, label = cls[0]
    assert len(cls) == 5 and picture.size == (28, 28) and picture.mode == "L" and 0 <= label <= 9
