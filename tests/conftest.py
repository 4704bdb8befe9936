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
