"""Faults and fuzz: every bad input is caught when the data is loaded, before any training, with one
line naming the file and the field; --skip-bad skips the slide instead; a run killed with SIGKILL
resumes to the same result; pickles are never unpickled."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from test_train_pipeline import PS, _cohort, _split_csv, _write_bag  # noqa: I001

from mamba2d.cli import main

TRAIN = ("--folds", "2", "--epochs", "1", "--no-progress", "--device", "cpu")


@pytest.fixture
def cohort(tmp_path):
    return _cohort(tmp_path)


def _train(cohort, *extra, out="run", model="2dmambamil"):
    argv = ["train", "--features", str(cohort / "feats"), "--labels", str(cohort / "labels.csv"), "--out",
            str(cohort / out), "--model", model, *TRAIN, *extra]
    if model == "2dmambamil":
        argv += ["--model-arg", "backend=torch"]
    return main(argv)


def _one_line_error(capsys, rc, *named):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in named:
        assert text in err, (text, err)
    return err


def _nothing_trained(cohort, out="run"):
    return not list((cohort / out).glob("fold*/last.pt"))


def _bag_with(cohort, name, transform):
    """Rewrite one slide's bag after ``transform(features, coords)``."""
    import h5py

    path = cohort / "feats" / f"{name}.h5"
    with h5py.File(path) as f:
        feats, coords = f["features"][()], f["coords"][()]
    feats, coords = transform(feats.copy(), coords.copy())
    _write_bag(path, feats, coords)
    return path


@pytest.mark.parametrize("stray", [1_024_000, 10**9])
def test_a_stray_coordinate_is_refused_at_load_time_and_can_be_skipped(cohort, capsys, stray):
    def move(feats, coords):
        coords[0] = (stray, stray)
        return feats, coords

    _bag_with(cohort, "slide03", move)
    _one_line_error(capsys, _train(cohort), "slide03.h5", f"x={stray}", "--max-grid-cells")
    assert _nothing_trained(cohort)
    with pytest.warns(UserWarning, match="skipping slide slide03"):
        assert _train(cohort, "--skip-bad", out="skipped") == 0
    assert "slide03" in json.loads((cohort / "skipped" / "skipped_slides.json").read_text())


def test_coordinates_that_are_no_tiling_are_refused_for_grid_models_only(cohort, capsys):
    def scatter(feats, coords):
        return feats, coords + np.arange(len(coords))[:, None] * 37

    _bag_with(cohort, "slide07", scatter)
    _one_line_error(capsys, _train(cohort), "slide07.h5", "coords", "not tilings")
    assert _train(cohort, model="abmil", out="abmil") == 0  # coords do not matter to ABMIL


def test_huge_finite_features_name_their_own_file(cohort, capsys):
    def blow_up(feats, coords):
        feats[1, 2] = 3e38
        return feats, coords

    _bag_with(cohort, "slide03", blow_up)
    err = _one_line_error(capsys, _train(cohort, model="abmil"), "slide03.h5", "features", "3e+38")
    assert "slide14" not in err
    assert _nothing_trained(cohort)


def test_a_label_typo_is_an_error_with_the_class_list_and_a_warning_without(cohort, capsys):
    labels = pd.read_csv(cohort / "labels.csv")
    labels.loc[4, "label"] = "banana"
    labels.to_csv(cohort / "labels.csv", index=False)
    _one_line_error(capsys, _train(cohort, "--classes", "class0,class1", model="abmil"),
                    "labels.csv", "'label'", "banana", "slide04")
    classes = cohort / "classes.txt"
    classes.write_text("# the two classes\nclass0\nclass1\n")
    with pytest.warns(UserWarning, match="dropping 1 slide"):
        assert _train(cohort, "--classes", str(classes), "--skip-bad", model="abmil", out="kept") == 0
    assert json.loads((cohort / "kept" / "labels.json").read_text())["class_names"] == ["class0", "class1"]


def test_train_test_overlap_is_an_error(cohort, capsys):
    ids = [f"slide{i:02d}" for i in range(16)]
    _split_csv(cohort / "split.csv", ids[:10], ids[10:13], [ids[13], ids[14], ids[2]])
    rc = main(["train", "--features", str(cohort / "feats"), "--labels", str(cohort / "labels.csv"),
               "--splits", str(cohort / "split.csv"), "--model", "abmil", "--out", str(cohort / "run"),
               "--epochs", "1", "--no-progress"])
    _one_line_error(capsys, rc, "split", "leakage", "slide02")
    assert _nothing_trained(cohort)


def test_an_infinite_survival_time_is_named(cohort, capsys):
    labels = pd.read_csv(cohort / "labels.csv")
    labels["survival_months"] = labels["survival_months"].astype(object)
    labels.loc[6, "survival_months"] = "inf"
    labels.to_csv(cohort / "labels.csv", index=False)
    _one_line_error(capsys, _train(cohort, "--task", "survival", model="abmil"),
                    "labels.csv", "'survival_months'", "infinite", "slide06")


@pytest.mark.parametrize("content", [
    b'slide_id,label\n"slide00,class0\nslide01,class1\n',  # an unclosed quote
    b"\xff\xfe\x00garbage\x00\x01",
    b"",
], ids=["unclosed-quote", "binary", "empty"])
def test_a_broken_label_csv_is_named(cohort, capsys, content):
    (cohort / "labels.csv").write_bytes(content)
    _one_line_error(capsys, _train(cohort, model="abmil"), "labels.csv")


@pytest.mark.parametrize("garbage", [b"", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64,
                                     np.random.default_rng(0).bytes(4096)], ids=["empty", "header", "random"])
def test_fuzzed_bag_files_are_named_and_skippable(cohort, capsys, garbage):
    (cohort / "feats" / "slide09.h5").write_bytes(garbage)
    _one_line_error(capsys, _train(cohort, model="abmil"), "slide09.h5")
    with pytest.warns(UserWarning, match="skipping slide slide09"):
        assert _train(cohort, "--skip-bad", model="abmil", out="skipped") == 0


class _Boom:
    """Unpickling this would run code; a safe loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_files_are_never_unpickled(cohort, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _train(cohort, model="abmil") == 0
    capsys.readouterr()
    run = cohort / "run"
    with open(run / "fold0_seed0" / "best.pt", "wb") as fh:
        pickle.dump({"model": _Boom()}, fh)
    _one_line_error(capsys, main(["eval", "--run", str(run), "--out", str(tmp_path / "ev")]), "best.pt",
                    "never unpickled")
    # A feature bag as a pickle (.pt) is refused the same way.
    pt = cohort / "pt"
    pt.mkdir()
    with open(pt / "slide00.pt", "wb") as fh:
        pickle.dump(_Boom(), fh)
    import h5py

    with h5py.File(cohort / "feats" / "slide00.h5") as f:
        coords = f["coords"][()]
    (cohort / "patches").mkdir()
    with h5py.File(cohort / "patches" / "slide00.h5", "w") as f:
        f.create_dataset("coords", data=coords).attrs["patch_size"] = PS
    from mamba2d.data.bags import BagError, read_bag

    with pytest.raises(BagError, match="slide00.pt: not a readable weights-only torch file.*never unpickled"):
        read_bag(pt / "slide00.pt")
    assert not (tmp_path / "pwned").exists()


def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_result(cohort):
    common = ["--features", str(cohort / "feats"), "--labels", str(cohort / "labels.csv"), "--folds", "2",
              "--epochs", "6", "--model", "abmil", "--val-fraction", "0.3", "--no-progress",
              "--device", "cpu"]
    assert main(["train", *common, "--out", str(cohort / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mamba2d", "train", *common, "--out",
                            str(cohort / "killed")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = cohort / "killed" / "fold0_seed0" / "history.csv"
    while time.time() < deadline and proc.poll() is None:
        if target.is_file() and len(target.read_text().splitlines()) >= 3:  # two epochs done
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(["train", "--resume", "--out", str(cohort / "killed"), "--no-progress"]) == 0
    a = json.loads((cohort / "whole" / "metrics.json").read_text())
    b = json.loads((cohort / "killed" / "metrics.json").read_text())
    assert a["runs"] == b["runs"]
    for fold in (0, 1):
        wa = torch.load(cohort / "whole" / f"fold{fold}_seed0" / "best.pt", weights_only=True)["model"]
        wb = torch.load(cohort / "killed" / f"fold{fold}_seed0" / "best.pt", weights_only=True)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list((cohort / "killed").rglob(".*.tmp"))  # no half-written file left behind as a result
