"""Configuration values are converted by their field's type in one place, whatever form YAML (1.1)
or the command line gives them, and a value that cannot be is named with its file and field."""

from __future__ import annotations

import pytest
from test_train_pipeline import _cohort  # noqa: I001

from mamba2d.cli import main
from mamba2d.train.config import TrainConfig, VisionTrainConfig, parse_model_args, parse_scalar


@pytest.mark.parametrize("text, value", [
    ("lr: 1e-3", 1e-3), ("lr: 2e-4", 2e-4), ("lr: 1.0e-3", 1e-3), ("lr: .5", 0.5), ("lr: 3", 3.0),
    ("lr: '5e-5'", 5e-5),
])
def test_yaml_1_1_float_forms_load_as_numbers(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    for cls in (TrainConfig, VisionTrainConfig):
        cfg = cls.load(path)
        assert isinstance(cfg.lr, float) and cfg.lr == pytest.approx(value)


@pytest.mark.parametrize("text, want", [
    ("seeds: [0, 1, 2]", [0, 1, 2]), ("seeds: 0,1,2", [0, 1, 2]), ("seeds: 3", [3]), ("seeds: 0-4", [0, 1, 2,
     3, 4]),
    ("seeds: ['1', 2.0]", [1, 2]),
])
def test_lists(tmp_path, text, want):
    (tmp_path / "c.yaml").write_text(text)
    assert TrainConfig.load(tmp_path / "c.yaml").seeds == want


@pytest.mark.parametrize("text, want", [("cache: yes", True), ("cache: 'no'", False), ("cache: true", True),
                                        ("cache: 'True'", True), ("cache: 0", False), ("cache: off", False)])
def test_booleans(tmp_path, text, want):
    (tmp_path / "c.yaml").write_text(text)
    assert TrainConfig.load(tmp_path / "c.yaml").cache is want


def test_paths_numbers_and_nulls(tmp_path):
    (tmp_path / "c.yaml").write_text("features: 2024\nlabels: ~/x.csv\nclip_grad: null\n"
                                     "max_grid_cells: 1.0e6\n"
                                     "epochs: '20'\nclasses: IDC,ILC\n"
                                     "model_args: {d_model: 256, scan: raster}\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml")
    assert cfg.features == "2024" and cfg.labels == "~/x.csv" and cfg.clip_grad is None
    assert cfg.max_grid_cells == 1_000_000 and cfg.epochs == 20 and cfg.classes == ["IDC", "ILC"]
    assert cfg.model_args == {"d_model": 256, "scan": "raster"}


@pytest.mark.parametrize("text, named", [
    ("lr: fast", "c.yaml: lr: expected a number, got 'fast'"),
    ("epochs: 2.5", "c.yaml: epochs: expected an integer, got 2.5"),
    ("cache: maybe", "c.yaml: cache: expected true or false"),
    ("model_args: [1, 2]", "c.yaml: model_args: expected a mapping"),
    ("seeds: [0, x]", "c.yaml: seeds[1]: expected an integer"),
    ("epochs: true", "c.yaml: epochs: expected an integer, got True"),
    ("optimizer: null", "c.yaml: optimizer: a value is required"),
])
def test_bad_values_name_the_file_and_field(tmp_path, text, named):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        TrainConfig.load(tmp_path / "c.yaml")
    assert named in str(err.value)


def test_model_args_on_the_command_line():
    assert parse_model_args(["lr=1e-3", "d=256", "flag=true", "scan=raster", "x=null"]) == \
        {"lr": 1e-3, "d": 256, "flag": True, "scan": "raster", "x": None}
    assert parse_scalar("2e-4") == 2e-4 and parse_scalar("[1, 2]") == [1, 2]


def test_a_yaml_config_with_1e_3_trains(tmp_path, capsys):
    root = _cohort(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"features: {root / 'feats'}\nlabels: {root / 'labels.csv'}\n"
                   f"lr: 1e-3\nweight_decay: 1e-5\n"
                   f"folds: 2\nepochs: 1\nmodel: meanmil\nprogress: no\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    saved = TrainConfig.load(tmp_path / "run" / "config.yaml")
    assert saved.lr == 1e-3 and saved.weight_decay == 1e-5 and saved.progress is False
