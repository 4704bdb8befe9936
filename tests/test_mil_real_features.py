"""Every MIL model learns on a small bag set of real-image features.

Bags are 3 x 3 grids with one hole, tiled with real Fashion-MNIST images (scikit-learn's digits
when Fashion-MNIST is absent); a bag is positive when it holds a "Bag" image (class 8). Features
come from the frozen EfficientNet-lite0 with its packaged ImageNet weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba2d.data.images import find_fashion_mnist, load_digits_images, load_fashion_mnist
from mamba2d.mil import MODELS, build_model
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

PS = 224  # level-0 patch size of the synthetic slides, pixels
CELLS = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]  # a hole in the middle
N_BAGS = 16
POSITIVE_CLASS = 8


@pytest.fixture(scope="module")
def encoder():
    return EfficientNetLite0Encoder()


@pytest.fixture(scope="module")
def bag_set(encoder):
    if find_fashion_mnist() is not None:
        images, labels = load_fashion_mnist(split="test")
    else:
        warnings.warn("Fashion-MNIST not installed; using scikit-learn's digits", stacklevel=1)
        images, labels = load_digits_images()
    rng = np.random.default_rng(0)
    pos_pool = rng.permutation(np.flatnonzero(labels == POSITIVE_CLASS))
    neg_pool = rng.permutation(np.flatnonzero(labels != POSITIVE_CLASS))
    picks, bag_labels, p, n = [], [], 0, 0
    for b in range(N_BAGS):
        k = len(CELLS)
        n_pos = 1 + b % 2 if b % 2 == 0 or b % 4 == 1 else 0  # half the bags positive, 1 or 2 lesions
        idx = list(pos_pool[p:p + n_pos]) + list(neg_pool[n:n + k - n_pos])
        p, n = p + n_pos, n + k - n_pos
        picks.append(rng.permutation(idx))
        bag_labels.append(int(n_pos > 0))
    feats = encoder.encode(images[np.concatenate(picks)]).reshape(N_BAGS, len(CELLS), -1)
    coords = torch.tensor([[c * PS, r * PS] for r, c in CELLS], dtype=torch.float32)
    return feats, coords, torch.tensor(bag_labels)


def test_encoder_recognises_a_real_photo(encoder):
    skimage_data = pytest.importorskip("skimage.data")
    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    top5 = encoder.imagenet_logits(cat).topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}  # ImageNet's domestic-cat classes
    feats = encoder.encode(skimage_data.chelsea()[None])
    assert feats.shape == (1, 1280) and torch.isfinite(feats).all() and feats.std() > 0


def test_bag_set_is_balanced_and_real(bag_set):
    feats, _, labels = bag_set
    assert feats.shape == (N_BAGS, len(CELLS), 1280)
    assert 0 < labels.sum() < N_BAGS
    assert feats.std(dim=(0, 1)).mean() > 0.05  # real, varied features


def _mean_loss(model, feats, coords, labels):
    model.eval()
    with torch.no_grad():
        return float(torch.stack([F.cross_entropy(model(f, coords, PS).logits[None], y[None])
                                  for f, y in zip(feats, labels, strict=True)]).mean())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_few_steps_reduce_the_loss(name, bag_set):
    feats, coords, labels = bag_set
    torch.manual_seed(0)
    kw = {"backend": "torch"} if "mamba" in name else {}
    model = build_model(name, 1280, 2, **kw)
    before = _mean_loss(model, feats, coords, labels)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-5)
    order = torch.Generator().manual_seed(1)
    for _ in range(2):  # epochs of one-bag steps
        model.train()
        for i in torch.randperm(N_BAGS, generator=order).tolist():
            kwargs = {"label": labels[i]} if name == "clam_sb" else {}
            out = model(feats[i], coords, PS, **kwargs)
            loss = F.cross_entropy(out.logits[None], labels[i][None])
            if out.aux_loss is not None:
                loss = loss + 0.3 * out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _mean_loss(model, feats, coords, labels)
    assert after < 0.85 * before, (before, after)
