"""What a training run reports after every epoch: a plain log line, a live history CSV, and
optionally TensorBoard scalars.

The log line (``--no-progress``) is one line per epoch, no carriage returns or colour codes, so
that it reads well in a SLURM log file. ``history.csv`` is rewritten atomically after every epoch,
so a run's curves can be followed (and plotted) while it trains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mamba2d.io import write_text

# The metrics a log line shows, in this order, when the record has them.
_SHOWN = ("train_loss", "val_loss", "val_auc", "val_accuracy", "val_c_index", "lr", "train_seconds")


def format_epoch_line(name: str, epoch: int, epochs: int, record: dict[str, Any]) -> str:
    """``fold 0 seed 0 epoch 3/20: train_loss 0.512, val_auc 0.810, lr 9.1e-05, 12.3 s``."""
    parts = []
    for key in _SHOWN:
        if key not in record:
            continue
        value = record[key]
        if key == "train_seconds":
            parts.append(f"{value:.1f} s")
        elif key == "lr":
            parts.append(f"lr {value:.2g}")
        elif isinstance(value, float) and math.isnan(value):
            parts.append(f"{key} n/a")
        else:
            parts.append(f"{key} {value:.4f}")
    return f"{name} epoch {epoch + 1}/{epochs}: " + ", ".join(parts)


class EpochLog:
    """Per-epoch reporting for one trained model (one fold and seed) in ``out_dir``.

    ``lines``: print a plain line per epoch (used when progress bars are off). ``tensorboard``:
    also write scalars to ``out_dir/../tensorboard/<out_dir name>`` (needs the tensorboard package).
    ``enabled``: False on every rank but 0.
    """

    def __init__(self, out_dir: Path, name: str, epochs: int, *, enabled: bool = True, lines: bool = False,
                 tensorboard: bool = False) -> None:
        self.out_dir, self.name, self.epochs = Path(out_dir), name, epochs
        self.enabled, self.lines = enabled, lines
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ValueError("--tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)") from err
            self.writer = SummaryWriter(str(self.out_dir.parent / "tensorboard" / self.out_dir.name))

    def epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Report ``record`` (the epoch just finished); ``history`` is every epoch so far."""
        if not self.enabled:
            return
        write_text(self.out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
        if self.lines:
            print(format_epoch_line(self.name, int(record["epoch"]), self.epochs, record), flush=True)
        if self.writer is not None:
            step = int(record["epoch"]) + 1
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace("_", "/", 1), float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
