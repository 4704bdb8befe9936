"""2DMamba: 2D selective state-space scans for whole-slide images and vision."""

from __future__ import annotations

import importlib
from typing import Any

from mamba2d.mil import MILOutput, PatchGrid, TwoDMambaMIL, build_model, patch_grid
from mamba2d.nn import Mamba2D, Mamba2DBlock, SRMamba
from mamba2d.ops import ScanLayout, selective_scan_1d, selective_scan_2d
from mamba2d.train import nll_survival_loss
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

__version__ = "0.1.0"

# The pipeline's names pull in pandas, h5py, scikit-learn and matplotlib; they load on first use so
# that `import mamba2d` stays as light as the operator and the layers.
_LAZY = {
    "FeatureBagSet": "mamba2d.data.bags",
    "read_bag": "mamba2d.data.bags",
    "read_labels": "mamba2d.data.labels",
    "read_split_csv": "mamba2d.data.splits",
    "kfold_splits": "mamba2d.data.splits",
    "TrainConfig": "mamba2d.train.config",
    "run_training": "mamba2d.train.engine",
    "evaluate_run": "mamba2d.train.evaluate",
    "compare_runs": "mamba2d.train.evaluate",
    "classification_metrics": "mamba2d.train.metrics",
    "concordance_index": "mamba2d.train.metrics",
    "run_demo": "mamba2d.demo",
    "open_slide": "mamba2d.wsi.slides",
    "tissue_mask": "mamba2d.wsi.tissue",
    "plan_tiles": "mamba2d.wsi.tiling",
    "build_encoder": "mamba2d.wsi.encoders",
    "extract_slides": "mamba2d.wsi.extract",
    "VMamba2D": "mamba2d.vision.vmamba",
    "vmamba2d_tiny": "mamba2d.vision.vmamba",
    "vmamba2d_small": "mamba2d.vision.vmamba",
    "vmamba1d_tiny": "mamba2d.vision.vmamba",
    "vmamba1d_small": "mamba2d.vision.vmamba",
    "UperNet": "mamba2d.vision.segmentation",
    "VisionSegmenter": "mamba2d.vision.segmentation",
    "VisionTrainConfig": "mamba2d.train.config",
    "run_vision_training": "mamba2d.train.vision",
    "segmentation_metrics": "mamba2d.train.metrics",
    "MosaicSegmentation": "mamba2d.data.mosaic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mamba2d' has no attribute {name!r}")


__all__ = [
    "EfficientNetLite0Encoder", "FeatureBagSet", "MILOutput", "Mamba2D", "Mamba2DBlock", "PatchGrid",
    "SRMamba", "ScanLayout", "TrainConfig", "TwoDMambaMIL", "__version__", "build_model",
    "classification_metrics", "compare_runs", "concordance_index", "evaluate_run", "kfold_splits",
    "nll_survival_loss", "patch_grid", "read_bag", "read_labels", "read_split_csv", "run_training",
    "selective_scan_1d", "selective_scan_2d", "run_demo", "open_slide", "tissue_mask", "plan_tiles",
    "build_encoder",
    "extract_slides", "VMamba2D", "vmamba2d_tiny", "vmamba2d_small", "vmamba1d_tiny", "vmamba1d_small",
    "UperNet", "VisionSegmenter", "VisionTrainConfig", "run_vision_training", "segmentation_metrics",
    "MosaicSegmentation",
]
