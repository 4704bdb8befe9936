"""timm registration of the 2DVMamba builders.

``import mamba2d`` (or :mod:`mamba2d.vision`) calls :func:`register_when_timm_is_imported`: the
builders are registered in timm's registry as soon as timm is imported, before or after mamba2d,
without importing timm itself (which takes seconds). After that,
``timm.create_model("vmamba2d_tiny", num_classes=..., drop_path_rate=..., features_only=True,
out_indices=(1, 2, 3))`` works like any timm model. No weights are published, so nothing is ever
downloaded: ``pretrained=True`` needs a local file, given either as
``pretrained_cfg_overlay={"file": path}`` or, for a checkpoint written by ``mamba2d vision-train``
or ``torch.save(model.state_dict())``, as ``checkpoint_path=path``. Both load with
``weights_only=True``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

from mamba2d.vision.vmamba import BUILDERS, VMamba2D

_LOCK = threading.Lock()
_REGISTERED = False

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
    """Register the builders in timm's registry now (importing timm); True when they are there,
    False (and nothing done) without a usable timm. Registering twice is a no-op."""
    global _REGISTERED
    try:
        from timm.models import generate_default_cfgs, is_model, register_model
    except Exception:  # timm absent, or unusable without a matching torchvision
        return False
    with _LOCK:
        if not _REGISTERED:
            default_cfgs.update(generate_default_cfgs({name: pretrained_cfg(name) for name in BUILDERS}))
            for name, builder in BUILDERS.items():
                if not is_model(name):
                    register_model(_entry_point(name, builder))
            _REGISTERED = True
    return True


class _RegisteringLoader(importlib.abc.Loader):
    """timm's own loader, followed by the registration once timm's package has run."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put timm's loader back first, so that nothing of this hook stays visible on the module.
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        try:
            register_with_timm()
        except Exception as err:  # never break `import timm`
            warnings.warn(f"mamba2d: could not register the 2DVMamba models with timm: {err}", stacklevel=2)

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first ``import timm`` it wraps the loader the other finders
    give, then removes itself."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        _remove_hook()
        spec = None
        for finder in list(sys.meta_path):  # the finders after this one, in their order
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def register_when_timm_is_imported() -> None:
    """Register the builders with timm now if timm is loaded, else as soon as it is imported."""
    if "timm" in sys.modules:
        register_with_timm()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
