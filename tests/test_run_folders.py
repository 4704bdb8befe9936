"""Run folders cannot lose or mislabel results: every command writes only into a folder of its own,
--resume continues the run named on the command line with its own settings, and saved paths are
absolute."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_train_pipeline import _cohort, _train  # noqa: I001  (tests/ is on sys.path)

from mamba2d.cli import main

QUICK = ("--folds", "2", "--epochs", "1", "--model", "meanmil")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(capsys, argv, pattern):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and pattern in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def cohort(tmp_path):
    return _cohort(tmp_path)


@pytest.fixture
def run(cohort):
    out = cohort / "run"
    assert _train(cohort, out, *QUICK) == 0
    return out


def test_saved_paths_are_absolute_and_the_run_is_marked_complete(cohort, run, monkeypatch, tmp_path):
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("features", "labels", "out"):
        assert os.path.isabs(saved[key]), key
    marker = json.loads((run / ".mamba2d-run.json").read_text())
    assert marker["kind"] == "train" and marker["status"] == "complete"
    # From another working directory (as under SLURM), eval finds everything the run names.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--run", str(run), "--out", "ev"]) == 0
    assert (elsewhere / "ev" / "metrics.json").is_file()


def test_the_same_command_twice_never_overwrites_the_finished_run(cohort, run, capsys):
    before = _snapshot(run)
    assert _train(cohort, run, *QUICK) == 2
    assert "already holds this finished run" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_another_configuration_is_refused_and_names_the_difference(cohort, run, capsys):
    before = _snapshot(run)
    assert _train(cohort, run, "--folds", "2", "--epochs", "3", "--model", "meanmil") == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "epochs: 1 -> 3" in err and "--resume" in err
    assert _snapshot(run) == before


def test_train_never_writes_into_a_folder_that_is_not_a_run(cohort, capsys):
    out = cohort / "mine"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    before = _snapshot(out)
    assert _train(cohort, out, *QUICK) == 2
    assert "is not empty" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resume_writes_to_the_folder_given_and_refuses_contradicting_flags(cohort, capsys):
    first = cohort / "first"
    assert _train(cohort, first, *QUICK, "--epochs", "2", "--stop-after-epochs", "1") == 0
    # The run folder is moved (or its original path reused by someone else): resuming the moved copy
    # writes there, and never to the path saved in its config.yaml.
    moved = cohort / "moved"
    shutil.copytree(first, moved)
    other = _snapshot(first)
    _fails(capsys, ["train", "--resume", "--out", str(moved), "--epochs", "5", "--no-progress"],
           "contradict them: epochs: 2 -> 5")
    assert main(["train", "--resume", "--out", str(moved), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((moved / "metrics.json").read_text())["runs"][0]["epochs_run"] == 2
    assert _snapshot(first) == other
    assert yaml.safe_load((moved / "config.yaml").read_text())["out"] in (str(first.resolve()),
                                                                        str(moved.resolve()))


def test_a_run_that_failed_before_training_restarts_with_the_same_command(cohort, capsys):
    out = cohort / "r"
    labels = cohort / "labels.csv"
    good = labels.read_text()
    labels.write_text(good.replace("class1", "class1\n", 1).replace("\n\n", "\n,,,,\n", 1))
    assert _train(cohort, out, *QUICK) == 2
    capsys.readouterr()
    assert json.loads((out / ".mamba2d-run.json").read_text())["status"] == "failed"
    labels.write_text(good)
    assert _train(cohort, out, *QUICK) == 0
    assert json.loads((out / ".mamba2d-run.json").read_text())["status"] == "complete"


def test_eval_and_compare_never_write_into_a_run_or_over_results(cohort, run, capsys):
    before = _snapshot(run)
    _fails(capsys, ["eval", "--run", str(run), "--out", str(run)], "is inside the run")
    _fails(capsys, ["eval", "--run", str(run), "--out", str(run / "eval")], "is inside the run")
    taken = cohort / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    _fails(capsys, ["eval", "--run", str(run), "--out", str(taken)], "never overwrites")
    assert (taken / "notes.txt").read_text() == "keep me"
    assert _snapshot(run) == before
    table = cohort / "table.csv"
    table.write_text("mine")
    _fails(capsys, ["compare", str(run), "--out", str(table)], "already exists")
    assert table.read_text() == "mine"


def test_metrics_json_is_strict_json(cohort, capsys):
    # One class in every validation part: the validation AUC is undefined at every epoch.
    out = cohort / "r"
    assert _train(cohort, out, *QUICK) == 0

    def refuse(token):
        raise AssertionError(f"non-JSON token {token} in metrics.json")

    for path in [out / "metrics.json", *out.glob("fold*/metrics.json")]:
        json.loads(path.read_text(), parse_constant=refuse)
