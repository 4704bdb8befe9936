"""Vision backbone built on the 2D scan for natural images: 2DVMamba and its 1D cross-scan twin.

Builders: ``vmamba2d_tiny``, ``vmamba2d_small``, ``vmamba1d_tiny``, ``vmamba1d_small``. When timm
is installed, importing this package also registers them in timm's model registry.
"""

from mamba2d.vision.vmamba import (
    SS2D,
    VMamba2D,
    VSSBlock,
    vmamba1d_small,
    vmamba1d_tiny,
    vmamba2d_small,
    vmamba2d_tiny,
)

BUILDERS = {f.__name__: f for f in (vmamba2d_tiny, vmamba2d_small, vmamba1d_tiny, vmamba1d_small)}


def _register_with_timm() -> bool:
    """Register the builders in timm (``timm.create_model("vmamba2d_tiny")``); False without timm."""
    try:
        from timm.models import register_model
    except Exception:  # timm absent, or unusable without a matching torchvision
        return False
    for name, builder in BUILDERS.items():
        def create(pretrained: bool = False, _builder=builder, **kwargs):
            if pretrained:
                raise ValueError("no weights are downloaded: build the model, then load a local checkpoint "
                                 "with torch.load(path, weights_only=True)")
            return _builder(**kwargs)
        create.__name__ = name
        create.__module__ = __name__
        register_model(create)
    return True


TIMM_REGISTERED = _register_with_timm()

__all__ = ["BUILDERS", "SS2D", "TIMM_REGISTERED", "VMamba2D", "VSSBlock", "vmamba1d_small", "vmamba1d_tiny",
           "vmamba2d_small", "vmamba2d_tiny"]
