"""Semantic segmentation on the backbone's feature pyramid: an UperNet-style head.

UperNet (Xiao et al., 2018) as used by VMamba and 2DVMamba on ADE20K: a pyramid pooling module
(PPM) on the stride-32 map, a feature pyramid network (FPN) that adds it top-down into the
stride-16, 8 and 4 maps, and a fusion of all four levels at stride 4 before a 1 x 1 classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UperNet", "VisionSegmenter"]


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNet(nn.Module):
    """PPM + FPN head. Input: maps (batch, in_channels[i], H_i, W_i), finest first; output logits
    (batch, num_classes, H_0, W_0) at the finest map's resolution.

    ``channels``: the width of every head convolution (512 for ADE20K; smaller for small data);
    ``pool_scales``: the PPM's pooled grid sizes; ``dropout``: before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UperNet needs at least two feature maps, got in_channels={list(in_channels)}")
        self.in_channels = list(in_channels)
        top = self.in_channels[-1]
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv_bn_relu(top, channels, 1)) for s in pool_scales)
        self.ppm_fuse = _conv_bn_relu(top + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in self.in_channels[:-1])
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fuse = _conv_bn_relu(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.in_channels):
            raise ValueError(f"UperNet expects {len(self.in_channels)} feature maps, got {len(maps)}")
        for i, (m, c) in enumerate(zip(maps, self.in_channels, strict=True)):
            if m.dim() != 4 or m.shape[1] != c:
                raise ValueError(f"feature map {i} must be (batch, {c}, h, w), got {tuple(m.shape)}")
        top = maps[-1]
        pooled = [top] + [_resize(branch(top), top.shape[-2:]) for branch in self.ppm]
        levels = [lat(m) for lat, m in zip(self.lateral, maps[:-1], strict=True)]
        levels.append(self.ppm_fuse(torch.cat(pooled, 1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each coarser level is added into the next finer
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class VisionSegmenter(nn.Module):
    """Backbone + UperNet, logits (batch, num_classes, H, W) at the input's resolution.

    ``backbone``: a timm ``features_only`` model (``timm.create_model(name, features_only=True)``,
    for any timm backbone) or a model with timm's ``forward_intermediates`` such as
    :class:`~mamba2d.vision.VMamba2D`, taking the stages in ``indices``. The maps' channels come
    from the backbone's ``feature_info``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, indices: Sequence[int] = (0, 1, 2, 3),
                 channels: int = 512) -> None:
        super().__init__()
        self.backbone, self.indices = backbone, list(indices)
        info = backbone.feature_info
        self.wrapped = hasattr(info, "channels")  # timm's FeatureInfo: the wrapper returns its maps
        in_channels = info.channels() if self.wrapped else [info[i]["num_chs"] for i in self.indices]
        self.head = UperNet(in_channels, num_classes, channels=channels)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.wrapped:
            return list(self.backbone(images))
        return self.backbone.forward_intermediates(images, indices=self.indices, intermediates_only=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _resize(self.head(self.features(images)), images.shape[-2:])
