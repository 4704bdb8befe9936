"""What every training loop needs from its surroundings: progress bars and mixed precision."""

from __future__ import annotations

import sys
import warnings

import torch


def progress_bar(it, show: bool, desc: str, **kw):
    """A tqdm bar on stderr (disabled when ``show`` is False, e.g. on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True, **kw)


def bf16_autocast(precision: str, device: torch.device):
    """bf16 autocast on GPU for ``precision`` "auto" or "bf16"; fp32 otherwise, and always on the
    CPU (a warning says so when bf16 was asked for there)."""
    if precision == "bf16" and device.type != "cuda":
        warnings.warn("bf16 autocast is used on GPU only; running in fp32 on the CPU", stacklevel=3)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and precision in ("auto", "bf16"))
