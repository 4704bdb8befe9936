"""2DMamba: 2D selective state-space scans for whole-slide images and vision.

``import mamba2d`` loads the operator, the layers, the MIL models and the vision backbone (all on
torch alone), and registers the 2DVMamba builders with timm as soon as timm is imported. Everything
else (the training pipeline, slides, the benchmark) loads on first use of its name.
"""

from __future__ import annotations

# First, so that any module may read it (`from mamba2d import __version__`) while the package loads.
__version__ = "0.1.0"

import importlib  # noqa: E402
from typing import Any  # noqa: E402

from mamba2d.mil import MILOutput, PatchGrid, TwoDMambaMIL, build_model, patch_grid
from mamba2d.nn import Mamba2D, Mamba2DBlock, SRMamba
from mamba2d.ops import ScanLayout, selective_scan_1d, selective_scan_2d
from mamba2d.train import nll_survival_loss
from mamba2d.vision import BUILDERS

# Every vision builder under its own name (mamba2d.vmamba2d_base, ...), from the one table.
globals().update(BUILDERS)

# The pipeline's names pull in pandas, h5py, scikit-learn and matplotlib, and the slide names the
# [wsi] extra; they load on first use so that `import mamba2d` stays as light as the operator and
# the layers, and works on a core install.
_LAZY = {
    "FeatureBagSet": "mamba2d.data.bags",
    "read_bag": "mamba2d.data.bags",
    "read_labels": "mamba2d.data.labels",
    "read_split_csv": "mamba2d.data.splits",
    "kfold_splits": "mamba2d.data.splits",
    "MosaicSegmentation": "mamba2d.data.mosaic",
    "TrainConfig": "mamba2d.train.config",
    "VisionTrainConfig": "mamba2d.train.config",
    "run_training": "mamba2d.train.engine",
    "run_vision_training": "mamba2d.train.vision",
    "evaluate_run": "mamba2d.train.evaluate",
    "compare_runs": "mamba2d.train.evaluate",
    "classification_metrics": "mamba2d.train.metrics",
    "concordance_index": "mamba2d.train.metrics",
    "segmentation_metrics": "mamba2d.train.metrics",
    "open_slide": "mamba2d.wsi.slides",
    "tissue_mask": "mamba2d.wsi.tissue",
    "plan_tiles": "mamba2d.wsi.tiling",
    "build_encoder": "mamba2d.wsi.encoders",
    "EfficientNetLite0Encoder": "mamba2d.wsi.encoders",
    "extract_slides": "mamba2d.wsi.extract",
    "VMamba2D": "mamba2d.vision.vmamba",
    "UperNet": "mamba2d.vision.segmentation",
    "VisionSegmenter": "mamba2d.vision.segmentation",
    "BenchmarkConfig": "mamba2d.bench.config",
    "build_benchmark": "mamba2d.bench.dataset",
    "run_demo": "mamba2d.bench.demo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mamba2d' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["MILOutput", "Mamba2D", "Mamba2DBlock", "PatchGrid", "SRMamba", "ScanLayout", "TwoDMambaMIL",
           "__version__", "build_model", "nll_survival_loss", "patch_grid", "selective_scan_1d",
           "selective_scan_2d"]
__all__ += [*BUILDERS, *_LAZY]
