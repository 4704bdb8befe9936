"""The paper's own label and split files train end to end (feature bags are stand-ins written
here, one small bag per labelled slide). The files are read from ../shared/official-splits."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mamba2d.cli import main
from mamba2d.data.bags import slide_stem

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-splits"
pytestmark = pytest.mark.skipif(not OFFICIAL.is_dir(), reason="../shared/official-splits is not present")


def _stand_in_bags(folder: Path, slide_ids, seed=0) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for sid in slide_ids:
        with h5py.File(folder / f"{slide_stem(sid)}.h5", "w") as f:
            f["features"] = rng.normal(size=(3, 8)).astype(np.float32)
            d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64))
            d.attrs["patch_size_level0"] = 512


def test_tcga_brca_subtyping_with_the_official_split(tmp_path):
    labels = OFFICIAL / "classification" / "TCGA-BRCA-label.csv"
    slides = pd.read_csv(labels)["slide_id"]
    _stand_in_bags(tmp_path / "feats", slides)
    out = tmp_path / "run"
    # The published split names slides with no IDC/ILC label and puts some patients in two parts:
    # --skip-bad drops the unknown ids with a warning; --allow-leakage keeps the split, with a warning.
    with pytest.warns(UserWarning) as record:
        rc = main(["train", "--features", str(tmp_path / "feats"), "--labels", str(labels),
                   "--label-col", "oncotree_code", "--classes", "IDC,ILC", "--splits",
                   str(OFFICIAL / "classification" / "TCGA-BRCA-split.csv"), "--model", "meanmil",
                   "--epochs", "1", "--skip-bad", "--allow-leakage", "--no-progress", "--out", str(out)])
    assert rc == 0
    messages = " ".join(str(w.message) for w in record)
    assert "leak" in messages.lower() or "more than one part" in messages.lower()
    result = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert (result["n_train"], result["n_val"], result["n_test"]) == (841, 96, 96)
    assert json.loads((out / "labels.json").read_text())["class_names"] == ["IDC", "ILC"]
    pred = pd.read_csv(out / "fold0_seed0" / "predictions_test.csv")
    assert len(pred) == 96 and set(pred["label_name"]) <= {"IDC", "ILC"}


def test_the_official_brca_split_is_refused_for_its_leakage_unless_allowed(tmp_path, capsys):
    labels = OFFICIAL / "classification" / "TCGA-BRCA-label.csv"
    _stand_in_bags(tmp_path / "feats", pd.read_csv(labels)["slide_id"])
    rc = main(["train", "--features", str(tmp_path / "feats"), "--labels", str(labels), "--label-col",
               "oncotree_code", "--classes", "IDC,ILC", "--splits",
               str(OFFICIAL / "classification" / "TCGA-BRCA-split.csv"), "--model", "meanmil", "--epochs",
                   "1",
               "--skip-bad", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "TCGA-BRCA-split" in err and "leakage" in err and "--allow-leakage" in err


def test_tcga_kirc_survival_with_the_official_five_folds(tmp_path):
    labels = OFFICIAL / "survival" / "KIRC.csv"
    frame = pd.read_csv(labels)
    _stand_in_bags(tmp_path / "feats", frame["slide_id"])
    out = tmp_path / "run"
    rc = main(["train", "--features", str(tmp_path / "feats"), "--labels", str(labels), "--task", "survival",
               "--splits", str(OFFICIAL / "survival" / "TCGA_KIRC_survival_kfold"), "--model", "meanmil",
               "--epochs", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["runs"]) == 5
    # The k-fold files have no test part, so each fold is evaluated on its validation part, and the
    # validation parts partition the cohort's cases.
    assert all(r["n_test"] == 0 and r["selection"] == "last epoch" for r in metrics["runs"])
    evaluated = pd.concat(pd.read_csv(out / f"fold{k}_seed0" / "predictions_val.csv") for k in range(5))
    assert sorted(evaluated["case_id"].unique()) == sorted(frame["case_id"].unique())
    assert metrics["val_summary"]["c_index"]["n"] == 5
