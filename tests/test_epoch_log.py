"""Per-epoch reporting: plain log lines with --no-progress, a history.csv that grows every epoch,
and TensorBoard scalars with --tensorboard."""

from __future__ import annotations

import builtins

import pandas as pd
import pytest
from test_train_pipeline import _cohort, _train  # noqa: I001

from mamba2d.train.epochlog import EpochLog, format_epoch_line


def test_no_progress_prints_one_plain_line_per_epoch(tmp_path, capsys):
    root = _cohort(tmp_path)
    assert _train(root, root / "run", "--folds", "2", "--epochs", "3", "--model", "meanmil",
                  "--val-fraction", "0.25") == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if " epoch " in ln]
    assert len(lines) == 2 * 3
    assert lines[0].startswith("fold 0 seed 0 epoch 1/3: train_loss ")
    for stream in (captured.out, captured.err):
        assert "\r" not in stream and "\x1b" not in stream
    history = pd.read_csv(root / "run" / "fold1_seed0" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]


def test_history_is_written_after_every_epoch(tmp_path):
    log = EpochLog(tmp_path, "fold 0 seed 0", 5)
    history = []
    for epoch in range(2):
        record = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_auc": float("nan"), "lr": 1e-4,
                  "train_seconds": 0.5}
        history.append(record)
        log.epoch(record, history)
        assert len(pd.read_csv(tmp_path / "history.csv")) == epoch + 1
    assert format_epoch_line("f", 1, 5, history[1]) == \
        "f epoch 2/5: train_loss 0.5000, val_auc n/a, lr 0.0001, 0.5 s"


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EpochLog(tmp_path / "fold0_seed0", "fold 0 seed 0", 2, tensorboard=True)
    history = []
    for epoch in range(2):
        history.append({"epoch": epoch, "train_loss": 2.0 - epoch, "val_auc": 0.5 + 0.1 * epoch})
        log.epoch(history[-1], history)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "fold0_seed0"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert [round(e.value, 6) for e in acc.Scalars("val/auc")] == [0.5, 0.6]


def test_tensorboard_missing_is_a_named_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        EpochLog(tmp_path, "f", 1, tensorboard=True)
