"""Pixel confusion and mIoU against scikit-learn's jaccard_score on random label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from mamba2d.train.metrics import pixel_confusion, segmentation_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 5, (3, 17, 23), generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, 5, target.shape, generator=g))
    cm = pixel_confusion(pred, target, 5)
    assert cm.sum() == target.numel() and cm.dtype == torch.int64
    got = segmentation_metrics(cm, list("abcde"))
    want = jaccard_score(target.flatten().numpy(), pred.flatten().numpy(), labels=range(5), average=None)
    assert np.allclose([got["iou"][c] for c in "abcde"], want, rtol=1e-12)
    assert got["miou"] == pytest.approx(want.mean(), rel=1e-12)
    assert got["pixel_accuracy"] == pytest.approx((pred == target).double().mean().item(), rel=1e-12)


def test_absent_classes_are_left_out_and_ignored_pixels_dropped():
    target = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    cm = pixel_confusion(pred, target, 3, ignore_index=255)
    assert cm.sum() == 3
    m = segmentation_metrics(cm)
    assert m["iou"]["2"] is None  # neither true nor predicted once the ignored pixel is dropped
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one shape"):
        pixel_confusion(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="0..1"):
        pixel_confusion(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="no pixels"):
        segmentation_metrics(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="square"):
        segmentation_metrics(np.ones((2, 3)))
