"""--tune: settings chosen per fold on the validation part only, the choice recorded in the run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from test_train_pipeline import _cohort, _split_csv  # noqa: I001

from mamba2d.cli import main
from mamba2d.train.config import TrainConfig
from mamba2d.train.engine import tune_candidates


def _args(root, out, *extra):
    return ["train", "--features", str(root / "feats"), "--labels", str(root / "labels.csv"), "--splits",
            str(root / "split.csv"), "--out", str(out), "--epochs", "2", "--no-progress", *extra]


def test_tune_picks_the_best_validation_setting_and_records_it(tmp_path):
    root = _cohort(tmp_path, n=20)
    ids = [f"slide{i:02d}" for i in range(20)]
    _split_csv(root / "split.csv", ids[:12], ids[12:16], ids[16:])
    out = tmp_path / "run"
    assert main(_args(root, out, "--model", "2dmambamil", "--model-arg", "backend=torch", "--tune", "lr,conv",
                      "--tune-lrs", "1e-5,3e-3")) == 0
    result = json.loads((out / "fold0_seed0" / "metrics.json").read_text())
    tried = result["tune_candidates"]
    assert [(t["lr"], t["conv"]) for t in tried] == [(1e-5, "1d"), (3e-3, "1d"), (1e-5, "2d"), (3e-3, "2d")]
    top = max(t["val_auc"] for t in tried)
    best = next(t for t in tried if t["val_auc"] == top)  # ties go to the earlier setting
    assert result["tuned"] == {"lr": best["lr"], "conv": best["conv"]} and result["val"]["auc"] == top
    chosen = f"lr_{result['tuned']['lr']}_conv_{result['tuned']['conv']}"
    # The fold's model is the chosen candidate's, file for file.
    a = torch.load(out / "fold0_seed0" / "best.pt", weights_only=True)
    b = torch.load(out / "fold0_seed0" / "tune" / chosen / "best.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["model_args"]["conv"] == result["tuned"]["conv"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["tuned"] == {"fold0_seed0": result["tuned"]}
    summary = pd.read_csv(out / "summary.csv")
    assert summary["tuned_lr"].tolist() == [result["tuned"]["lr"]]


def test_tune_needs_a_test_part(tmp_path, capsys):
    root = _cohort(tmp_path)
    ids = [f"slide{i:02d}" for i in range(16)]
    _split_csv(root / "split.csv", ids[:12], ids[12:], [])
    assert main(_args(root, tmp_path / "run", "--model", "meanmil", "--tune", "lr")) == 2
    assert "needs both a validation and a test part" in capsys.readouterr().err


def test_tune_settings_are_checked():
    cfg = TrainConfig(features="f", labels="l", out="o", model="abmil", tune=["conv"])
    with pytest.raises(ValueError, match="conv is a 2dmambamil setting"):
        cfg.check()
    cfg = TrainConfig(features="f", labels="l", out="o", model="2dmambamil", tune=["lr"], tune_lrs=[1e-4,
                      1e-3])
    assert [c["lr"] for c in tune_candidates(cfg.check())] == [1e-4, 1e-3]
