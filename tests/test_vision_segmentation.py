"""The UperNet head and the backbone + head segmenter: output sizes, gradient flow, feature
sources (2DVMamba's forward_intermediates, timm features_only models), and input checks."""

from __future__ import annotations

import pytest
import torch

from mamba2d.vision import UperNet, VisionSegmenter, vmamba1d_tiny, vmamba2d_tiny

SMALL = dict(dims=16, depths=(1, 1, 1, 1), num_classes=0, backend="torch")


def test_upernet_returns_logits_at_the_finest_map():
    torch.manual_seed(0)
    head = UperNet([8, 16, 32, 64], num_classes=5, channels=12).eval()
    maps = [torch.randn(2, c, 24 // 2**i, 16 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    out = head(maps)
    assert out.shape == (2, 5, 24, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        head(maps[:3])
    with pytest.raises(ValueError, match=r"feature map 1 must be \(batch, 16"):
        head([maps[0], maps[0], maps[2], maps[3]])
    with pytest.raises(ValueError, match="at least two"):
        UperNet([8], 3)


def test_every_level_reaches_the_output():
    # Perturbing any one input map changes the logits: PPM, laterals and the fusion are all wired.
    torch.manual_seed(0)
    head = UperNet([4, 8, 16, 32], num_classes=3, channels=8).eval()
    maps = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate([4, 8, 16, 32])]
    base = head(maps)
    for i in range(4):
        bumped = [m.clone() for m in maps]
        bumped[i] += torch.randn_like(bumped[i])
        assert (head(bumped) - base).abs().max() > 1e-6, i


@pytest.mark.parametrize("builder", [vmamba2d_tiny, vmamba1d_tiny])
def test_segmenter_on_the_backbone_trains_end_to_end(builder):
    torch.manual_seed(0)
    model = VisionSegmenter(builder(**SMALL), num_classes=4, channels=16).train()
    x = torch.randn(2, 3, 64, 96)
    target = torch.randint(0, 4, (2, 64, 96))
    logits = model(x)
    assert logits.shape == (2, 4, 64, 96)
    torch.nn.functional.cross_entropy(logits, target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and "head.classifier" not in n
               and not n.startswith("backbone.head")]
    # The backbone's classifier and final norm are unused by segmentation; everything else learns.
    assert all(n.startswith("backbone.norm") for n in no_grad), no_grad
    assert model.backbone.stages[0][0].mixer.x_proj.grad.abs().sum() > 0


def test_segmenter_on_timm_feature_extractors():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = timm.create_model("vmamba2d_tiny", features_only=True, dims=16, depths=(1, 1, 1, 1),
                             backend="torch")
    other = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
    x = torch.randn(1, 3, 64, 64)
    for backbone in (ours, other):
        model = VisionSegmenter(backbone, num_classes=3, channels=8).eval()
        with torch.no_grad():
            assert model(x).shape == (1, 3, 64, 64)
