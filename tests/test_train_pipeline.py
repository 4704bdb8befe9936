"""The training pipeline end to end through the CLI: run directory contents, resume equality,
survival, YAML configs, eval and compare, and bad input named in one line."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mamba2d.cli import main
from mamba2d.train.metrics import concordance_index

PS = 256
DIM = 16


def _write_bag(path, feats, coords, patch_size=PS):
    with h5py.File(path, "w") as f:
        f["features"] = feats
        d = f.create_dataset("coords", data=coords)
        d.attrs["patch_size"] = patch_size
        d.attrs["patch_level"] = 0
        d.attrs["downsample"] = [1.0, 1.0]


def _cohort(root, n=16, seed=0, n_classes=2):
    """n slides with a learnable signal in feature 0, CLAM h5 bags, and a label CSV with survival."""
    rng = np.random.default_rng(seed)
    (root / "feats").mkdir(parents=True)
    rows = []
    for i in range(n):
        y = i % n_classes
        n_patch = int(rng.integers(4, 20))
        cells = rng.choice(36, n_patch, replace=False)
        coords = np.stack([cells % 6, cells // 6], 1).astype(np.int64) * PS
        feats = rng.normal(size=(n_patch, DIM)).astype(np.float32)
        feats[:, 0] += 2.0 * y
        _write_bag(root / "feats" / f"slide{i:02d}.h5", feats, coords)
        rows.append(dict(case_id=f"case{i:02d}", slide_id=f"slide{i:02d}.svs", label=f"class{y}",
                         survival_months=float(5 + 30 * (1 - y) + rng.exponential(5)),
                         censorship=int(rng.random() < 0.3)))
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def _split_csv(path, train, val, test):
    n = max(len(train), len(val), len(test))
    cols = {k: list(v) + [""] * (n - len(v)) for k, v in (("train", train), ("val", val), ("test", test))}
    pd.DataFrame(cols).to_csv(path)  # the official format: an index column, then train,val,test


@pytest.fixture
def cohort(tmp_path):
    return _cohort(tmp_path)


def _train(root, out, *extra):
    args = ["train", "--features", str(root / "feats"), "--labels", str(root / "labels.csv"), "--out",
            str(out), "--no-progress", *extra]
    return main(args)


def test_classification_run_directory(cohort, capsys):
    out = cohort / "run"
    assert _train(cohort, out, "--folds", "2", "--epochs", "2", "--model", "abmil", "--lr", "1e-3",
                  "--val-fraction", "0.25") == 0
    printed = capsys.readouterr().out
    assert "| abmil |" in printed and "±" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["runs"]) == 2 and metrics["test_summary"]["auc"]["n"] == 2
    for fold in (0, 1):
        d = out / f"fold{fold}_seed0"
        for name in ("best.pt", "last.pt", "history.csv", "predictions_test.csv", "metrics.json",
                     "roc_test.png", "confusion_test.png", "training_curves.png"):
            assert (d / name).is_file(), name
        pred = pd.read_csv(d / "predictions_test.csv")
        assert {"slide_id", "label", "pred", "prob_class0", "prob_class1"} <= set(pred.columns)
        assert np.allclose(pred[["prob_class0", "prob_class1"]].sum(axis=1), 1, atol=1e-5)
        assert (d / "roc_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The generated splits are saved, and partition the cases: every slide is tested exactly once.
    tested = pd.concat(pd.read_csv(out / f"fold{k}_seed0" / "predictions_test.csv") for k in (0, 1))
    assert sorted(tested["slide_id"]) == [f"slide{i:02d}" for i in range(16)]
    assert (out / "splits" / "splits_0.csv").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "abmil" and saved["folds"] == 2 and saved["lr"] == 1e-3
    assert json.loads((out / "labels.json").read_text())["class_names"] == ["class0", "class1"]
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files
    # The saved splits are reusable as they are: the same folds train again from the folder.
    assert _train(cohort, cohort / "again", "--splits", str(out / "splits"), "--epochs", "1",
                  "--model", "meanmil") == 0
    again = json.loads((cohort / "again" / "metrics.json").read_text())["runs"]
    assert [r["n_test"] for r in again] == [r["n_test"] for r in metrics["runs"]]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(cohort):
    common = ["--folds", "2", "--epochs", "3", "--model", "2dmambamil", "--model-arg", "backend=torch",
              "--val-fraction", "0.3"]
    assert _train(cohort, cohort / "a", *common) == 0
    assert _train(cohort, cohort / "b", *common, "--stop-after-epochs", "1") == 0
    assert not (cohort / "b" / "metrics.json").exists()
    assert main(["train", "--resume", "--out", str(cohort / "b"), "--no-progress"]) == 0
    a = json.loads((cohort / "a" / "metrics.json").read_text())
    b = json.loads((cohort / "b" / "metrics.json").read_text())
    assert a["runs"] == b["runs"]
    for fold in (0, 1):
        wa = torch.load(cohort / "a" / f"fold{fold}_seed0" / "best.pt", weights_only=True)["model"]
        wb = torch.load(cohort / "b" / f"fold{fold}_seed0" / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_result(cohort):
    common = ["--folds", "2", "--epochs", "2", "--model", "clam_sb", "--val-fraction", "0.3"]
    assert _train(cohort, cohort / "a", *common) == 0
    assert _train(cohort, cohort / "b", *common) == 0
    a = json.loads((cohort / "a" / "metrics.json").read_text())["runs"]
    b = json.loads((cohort / "b" / "metrics.json").read_text())["runs"]
    assert a == b


def test_clip_grad_changes_training_and_is_checked(cohort, capsys):
    common = ["--folds", "2", "--epochs", "1", "--model", "abmil", "--lr", "1e-2", "--seeds", "0"]
    assert _train(cohort, cohort / "clip_none", *common) == 0
    assert _train(cohort, cohort / "clip_tiny", *common, "--clip-grad", "1e-4") == 0
    assert _train(cohort, cohort / "clip_huge", *common, "--clip-grad", "1e9") == 0
    def weights(name):
        path = next((cohort / name).glob("fold0_seed0/last.pt"))
        return torch.load(path, weights_only=True)["model"]
    none, tiny, huge = weights("clip_none"), weights("clip_tiny"), weights("clip_huge")
    # A bound far above any gradient norm changes nothing; a tiny one changes every step.
    assert all(torch.equal(none[k], huge[k]) for k in none)
    assert any(not torch.allclose(none[k], tiny[k]) for k in none if none[k].is_floating_point())
    _expect_error(capsys, cohort, cohort / "clip_bad", "clip_grad", *common, "--clip-grad", "0")


def test_survival_run_matches_an_independent_c_index(cohort):
    out = cohort / "surv"
    test = [f"case{i:02d}" for i in range(0, 16, 4)]
    val = [f"case{i:02d}" for i in range(1, 16, 4)]
    train = [f"case{i:02d}" for i in range(16) if f"case{i:02d}" not in test + val]
    _split_csv(cohort / "split.csv", train, val, test)
    assert _train(cohort, out, "--task", "survival", "--splits", str(cohort / "split.csv"), "--epochs", "2",
                  "--model", "2dmambamil", "--model-arg", "backend=torch", "--lr", "1e-3") == 0
    d = out / "fold0_seed0"
    pred = pd.read_csv(d / "predictions_test.csv")
    result = json.loads((d / "metrics.json").read_text())
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    events = (1 - pred["censorship"]).astype(bool).to_numpy()
    want = sksurv_metrics.concordance_index_censored(events, pred["survival_months"].to_numpy(),
                                                     pred["risk"].to_numpy())
    assert result["test"]["c_index"] == pytest.approx(want[0], abs=1e-12)
    assert result["test"]["c_index"] == pytest.approx(concordance_index(
        pred["survival_months"], 1 - pred["censorship"], pred["risk"]))
    assert (d / "km_test.png").is_file()
    edges = result["bin_edges"]
    assert len(edges) == 5 and edges[0] == 0 and edges[-1] == "inf"


def test_yaml_config_and_flag_override(cohort):
    cfg = {"features": str(cohort / "feats"), "labels": str(cohort / "labels.csv"), "folds": 2, "epochs": 1,
           "model": "meanmil", "lr": 1e-3, "seeds": [0, 1], "val_fraction": 0.25}
    (cohort / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = cohort / "run"
    assert main(["train", "--config", str(cohort / "cfg.yaml"), "--model", "maxmil", "--out", str(out),
                 "--no-progress"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == "maxmil" and saved["seeds"] == [0, 1] and saved["epochs"] == 1
    assert sorted(p.name for p in out.glob("fold*_seed*")) == ["fold0_seed0", "fold0_seed1", "fold1_seed0",
                                                               "fold1_seed1"]


def test_eval_reproduces_and_compare_tabulates(cohort, capsys):
    run = cohort / "run"
    assert _train(cohort, run, "--folds", "2", "--epochs", "2", "--model", "abmil",
                  "--val-fraction", "0.25") == 0
    assert main(["eval", "--run", str(run), "--out", str(cohort / "ev")]) == 0
    trained = json.loads((run / "metrics.json").read_text())["test_summary"]["auc"]["values"]
    evaluated = json.loads((cohort / "ev" / "metrics.json").read_text())["test_summary"]["auc"]["values"]
    assert evaluated == pytest.approx(trained, abs=1e-12)
    # An external cohort: every labelled slide is scored by every model.
    other = _cohort(cohort / "external", n=8, seed=5)
    assert main(["eval", "--run", str(run), "--out", str(cohort / "ext"), "--features", str(other / "feats"),
                 "--labels", str(other / "labels.csv")]) == 0
    pred = pd.read_csv(cohort / "ext" / "fold0_seed0" / "predictions_external.csv")
    assert len(pred) == 8
    capsys.readouterr()
    assert main(["compare", str(run), str(cohort / "ev"), "--out", str(cohort / "table.csv")]) == 0
    assert "auc" in capsys.readouterr().out
    assert len(pd.read_csv(cohort / "table.csv")) == 2


# --- bad input: one line naming the file or field, exit code 2, nothing half-written


def _expect_error(capsys, root, out, pattern, *extra):
    rc = _train(root, out, "--folds", "2", "--epochs", "1", "--model", "meanmil", *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert pattern in err, err
    return err


def test_corrupt_h5_is_named(cohort, capsys):
    (cohort / "feats" / "slide03.h5").write_bytes(b"garbage, not hdf5")
    _expect_error(capsys, cohort, cohort / "r", "slide03.h5")
    assert not (cohort / "r" / "metrics.json").exists()


def test_skip_bad_warns_and_continues(cohort, capsys):
    (cohort / "feats" / "slide03.h5").write_bytes(b"garbage, not hdf5")
    with pytest.warns(UserWarning, match="slide03"):
        assert _train(cohort, cohort / "r", "--folds", "2", "--epochs", "1", "--model", "meanmil",
                      "--skip-bad") == 0
    assert "slide03" in json.loads((cohort / "r" / "skipped_slides.json").read_text())


def test_missing_dataset_is_named(cohort, capsys):
    with h5py.File(cohort / "feats" / "slide04.h5", "w") as f:
        f["coords"] = np.zeros((3, 2), dtype=np.int64)
    _expect_error(capsys, cohort, cohort / "r", "features")


@pytest.mark.parametrize("problem,pattern", [
    ("nan", "NaN"), ("empty", "empty"), ("duplicate", "duplicate"), ("dim", "D=")])
def test_bad_bag_contents_are_named(cohort, capsys, problem, pattern):
    feats = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    coords = np.arange(10, dtype=np.int64).reshape(5, 2) * PS
    if problem == "nan":
        feats[2, 3] = np.nan
    elif problem == "empty":
        feats, coords = feats[:0], coords[:0]
    elif problem == "duplicate":
        coords[3] = coords[1]
    else:
        feats = np.random.default_rng(0).normal(size=(5, DIM + 3)).astype(np.float32)
    _write_bag(cohort / "feats" / "slide05.h5", feats, coords)
    err = _expect_error(capsys, cohort, cohort / "r", pattern)
    assert "slide05" in err


def test_split_naming_unknown_slides(cohort, capsys):
    _split_csv(cohort / "split.csv", [f"slide{i:02d}" for i in range(10)] + ["ghost_slide"],
               ["slide10", "slide11"], ["slide12", "slide13"])
    rc = _train(cohort, cohort / "r", "--splits", str(cohort / "split.csv"), "--epochs", "1",
                "--model", "meanmil")
    err = capsys.readouterr().err
    assert rc == 2 and "ghost_slide" in err and "Traceback" not in err


def test_missing_label_column_is_named(cohort, capsys):
    pd.read_csv(cohort / "labels.csv").drop(columns="label").to_csv(cohort / "labels.csv", index=False)
    _expect_error(capsys, cohort, cohort / "r", "label")


def test_one_class_in_training_fold(cohort, capsys):
    ones = [f"slide{i:02d}" for i in range(1, 16, 2)]
    _split_csv(cohort / "split.csv", ones[:5], ["slide00", "slide02"], ["slide04", "slide06"])
    rc = _train(cohort, cohort / "r", "--splits", str(cohort / "split.csv"), "--epochs", "1",
                "--model", "meanmil")
    err = capsys.readouterr().err
    assert rc == 2 and "class" in err and "Traceback" not in err


def test_existing_run_needs_resume(cohort, capsys):
    assert _train(cohort, cohort / "r", "--folds", "2", "--epochs", "1", "--model", "meanmil") == 0
    _expect_error(capsys, cohort, cohort / "r", "--resume", "--lr", "1e-3")


def test_bad_flags_are_named(cohort, capsys):
    _expect_error(capsys, cohort, cohort / "r", "epochs", "--epochs", "0")
    assert main(["train", "--resume", "--out", str(cohort / "nothing")]) == 2
    assert "--resume" in capsys.readouterr().err


def _max_weight_gap(a_dir, b_dir) -> float:
    """Largest |a - b| / (1e-3 + |b|) over every weight of two runs' fold0_seed0/best.pt."""
    wa = torch.load(a_dir / "fold0_seed0" / "best.pt", weights_only=True)["model"]
    wb = torch.load(b_dir / "fold0_seed0" / "best.pt", weights_only=True)["model"]
    return max(float(((wa[k] - wb[k]).abs() / (1e-3 + wb[k].abs())).max()) for k in wa)


def test_ddp_on_two_cpu_processes_equals_gradient_accumulation(cohort):
    # Two gloo ranks with one slide each per step average the same two gradients as one process
    # accumulating two slides, so without dropout both runs follow the same trajectory. SGD keeps
    # that comparison meaningful: its weights move by lr x gradient, so float rounding in the
    # all-reduce stays at rounding size (Adam divides by the gradient's running RMS and turns the
    # rounding noise of near-zero gradients into full-size steps). A run whose all-reduce is removed
    # (each rank steps on its own slides) must land far outside the tolerance.
    import os
    import subprocess
    import sys
    from pathlib import Path

    train = [f"slide{i:02d}" for i in range(12)]
    _split_csv(cohort / "split.csv", train, ["slide12", "slide13"], ["slide14", "slide15"])
    common = ["train", "--features", str(cohort / "feats"), "--labels", str(cohort / "labels.csv"),
              "--splits", str(cohort / "split.csv"), "--epochs", "2", "--model", "2dmambamil",
              "--model-arg", "backend=torch", "--model-arg", "dropout=0.0", "--optimizer", "sgd",
              "--lr", "0.05", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    broken = str(Path(__file__).parent / "helpers" / "train_without_allreduce.py")
    for cmd, out in ((["-m", "mamba2d"], "ddp"), ([broken], "no_allreduce")):
        run = subprocess.run([*torchrun, *cmd, *common, "--out", str(cohort / out)],
                             capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    assert main([*common, "--accumulate", "2", "--out", str(cohort / "single")]) == 0

    # fp32 rounding differs between the two reductions by ~1e-7 relative per step; after 12 SGD
    # steps with momentum the gap measured 1e-5, the bound is 1e-3. Without the all-reduce it was 40.
    assert _max_weight_gap(cohort / "ddp", cohort / "single") < 1e-3
    assert _max_weight_gap(cohort / "no_allreduce", cohort / "single") > 1e-2
    a = json.loads((cohort / "ddp" / "metrics.json").read_text())["runs"][0]
    b = json.loads((cohort / "single" / "metrics.json").read_text())["runs"][0]
    assert a["n_test"] == b["n_test"] == 2 and a["best_epoch"] == b["best_epoch"]
    assert a["test"]["auc"] == pytest.approx(b["test"]["auc"], abs=1e-6)
