"""`mamba2d predict`: a run's models on slides without labels, their ensemble, attention, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_train_pipeline import DIM, _cohort, _train, _write_bag  # noqa: I001

from mamba2d.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = _cohort(tmp_path_factory.mktemp("cohort"))
    run = root / "run"
    assert _train(root, run, "--folds", "2", "--epochs", "1", "--model", "2dmambamil", "--model-arg",
                  "backend=torch", "--seeds", "0,1") == 0
    # A new cohort without labels: three bags, one of them unknown to any label file.
    new = root / "new"
    new.mkdir()
    rng = np.random.default_rng(9)
    for i in range(3):
        cells = rng.choice(25, 7, replace=False)
        _write_bag(new / f"unlabelled_{i}.h5", rng.normal(size=(7, DIM)).astype(np.float32),
                   np.stack([cells % 5, cells // 5], 1).astype(np.int64) * 256)
    return root, run, new


def test_predict_scores_every_bag_with_every_model_and_averages(trained, tmp_path, capsys):
    root, run, new = trained
    out = tmp_path / "preds"
    assert main(["predict", "--run", str(run), "--features", str(new), "--out", str(out), "--attention",
                 "--no-progress"]) == 0
    assert "3 slides scored by 4 model(s)" in capsys.readouterr().out
    ens = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert sorted(ens.index) == ["unlabelled_0", "unlabelled_1", "unlabelled_2"]
    probs = ["prob_class0", "prob_class1"]
    per_model = [pd.read_csv(out / f"fold{f}_seed{s}.csv").set_index("slide_id") for f in (0, 1) for s in (0,
                             1)]
    mean = sum(m[probs] for m in per_model) / 4
    assert np.allclose(ens[probs].to_numpy(), mean.loc[ens.index].to_numpy(), atol=1e-12)
    assert np.allclose(ens[probs].sum(axis=1), 1.0, atol=1e-6)
    assert (ens["pred_name"] == ens[probs].idxmax(axis=1).str.removeprefix("prob_")).all()
    att = pd.read_csv(out / "attention" / "unlabelled_1.csv")
    assert len(att) == 7 and np.allclose(att.filter(like="attention_").sum(), 1.0, atol=1e-5)
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["models"] == ["fold0_seed0", "fold0_seed1", "fold1_seed0", "fold1_seed1"]


def test_predict_one_model_and_a_slide_list(trained, tmp_path):
    root, run, new = trained
    listing = tmp_path / "list.csv"
    pd.DataFrame({"slide_id": ["unlabelled_2.svs"]}).to_csv(listing, index=False)
    out = tmp_path / "one"
    assert main(["predict", "--run", str(run), "--features", str(new), "--out", str(out), "--slides",
                 str(listing), "--fold-seed", "fold1_seed0", "--no-progress"]) == 0
    ens = pd.read_csv(out / "predictions.csv")
    assert ens["slide_id"].tolist() == ["unlabelled_2"] and ens["n_models"].tolist() == [1]


def test_predict_names_bad_bags_and_can_skip_them(trained, tmp_path, capsys):
    root, run, new = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in new.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "broken.h5").write_bytes(b"not an hdf5 file")
    assert main(["predict", "--run", str(run), "--features", str(bad), "--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err
    assert "broken.h5" in err and len(err.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="skipping slide broken"):
        assert main(["predict", "--run", str(run), "--features", str(bad), "--out", str(tmp_path / "p2"),
                     "--skip-bad", "--no-progress"]) == 0
    assert len(pd.read_csv(tmp_path / "p2" / "predictions.csv")) == 3
    assert main(["predict", "--run", str(run), "--features", str(new), "--out", str(run / "p")]) == 2
    assert "inside the run" in capsys.readouterr().err
