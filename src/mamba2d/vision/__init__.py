"""Vision backbone built on the 2D scan for natural images: 2DVMamba and its 1D cross-scan twin.

Builders (:data:`BUILDERS`): ``vmamba2d_tiny``, ``vmamba2d_small``, ``vmamba2d_base`` and their 1D
twins ``vmamba1d_tiny``, ``vmamba1d_small``, ``vmamba1d_base``. They are registered in timm's model
registry as soon as timm is imported (:mod:`mamba2d.vision.registry`). ``UperNet`` is a
segmentation head on the backbone's four feature maps.
"""

from mamba2d.vision.registry import register_when_timm_is_imported, register_with_timm
from mamba2d.vision.segmentation import UperNet, VisionSegmenter
from mamba2d.vision.vmamba import (
    BUILDERS,
    SS2D,
    VMamba2D,
    VSSBlock,
    vmamba1d_base,
    vmamba1d_small,
    vmamba1d_tiny,
    vmamba2d_base,
    vmamba2d_small,
    vmamba2d_tiny,
)

register_when_timm_is_imported()

__all__ = ["BUILDERS", "SS2D", "UperNet", "VMamba2D", "VSSBlock", "VisionSegmenter", "register_with_timm",
           "vmamba1d_base", "vmamba1d_small", "vmamba1d_tiny", "vmamba2d_base", "vmamba2d_small",
           "vmamba2d_tiny"]
