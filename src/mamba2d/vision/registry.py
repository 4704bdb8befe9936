"""timm registration of the 2DVMamba builders.

Importing :mod:`mamba2d.vision` calls :func:`register_with_timm`, after which
``timm.create_model("vmamba2d_tiny", num_classes=..., drop_path_rate=..., features_only=True,
out_indices=(1, 2, 3))`` works like any timm model. No weights are published, so nothing is ever
downloaded: ``pretrained=True`` needs a local file, given either as
``pretrained_cfg_overlay={"file": path}`` or, for a checkpoint written by ``mamba2d vision-train``
or ``torch.save(model.state_dict())``, as ``checkpoint_path=path``. Both load with
``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from mamba2d.vision.vmamba import BUILDERS, VMamba2D

# Filled by register_with_timm; timm's register_model reads the pretrained configs from the
# ``default_cfgs`` attribute of the module that defines each entry point.
default_cfgs: dict = {}


def pretrained_cfg(name: str) -> dict:
    """timm's metadata for a builder: ImageNet input conventions, the paper, and no download source."""
    return {
        "url": "", "hf_hub_id": None, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2412.00678", "paper_name": "2DMamba: Efficient State Space Model for Image "
        "Representation with Applications on Giga-Pixel Whole Slide Image Classification",
        "notes": (f"{name}: no published weights; pass a local file with "
                  "pretrained_cfg_overlay={'file': path} or checkpoint_path=path",),
    }


def _entry_point(name: str, builder: Callable[..., VMamba2D]) -> Callable[..., VMamba2D]:
    from timm.models import build_model_with_cfg

    def create(pretrained: bool = False, **kwargs) -> VMamba2D:
        # The builder's config supplies the defaults (depths, ssm_ratio, drop path); timm's
        # kwargs override them, as in the builder itself.
        def model_cls(**model_kwargs) -> VMamba2D:
            return builder(**model_kwargs)

        return build_model_with_cfg(
            model_cls, name, pretrained, pretrained_strict=True,
            feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)}, **kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = builder.__doc__
    return create


def register_with_timm() -> bool:
    """Register the builders in timm's registry; False (and nothing done) without timm."""
    try:
        from timm.models import generate_default_cfgs, register_model
    except Exception:  # timm absent, or unusable without a matching torchvision
        return False
    default_cfgs.update(generate_default_cfgs({name: pretrained_cfg(name) for name in BUILDERS}))
    for name, builder in BUILDERS.items():
        register_model(_entry_point(name, builder))
    return True
