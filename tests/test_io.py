"""mamba2d.io: atomic writes that honour the umask, strict JSON, safe checkpoints."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mamba2d.io import (
    CheckpointError,
    JSONFileError,
    atomic_write,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_h5,
    write_json,
    write_text,
)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "want"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_writer_honours_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    paths = [
        write_text(tmp_path / "a.txt", "x"),
        write_json(tmp_path / "a.json", {"a": 1}),
        save_checkpoint(tmp_path / "a.pt", {"w": torch.zeros(2)}),
        write_h5(tmp_path / "a.h5", lambda f: f.create_dataset("x", data=np.arange(3))),
        atomic_write(tmp_path / "sub" / "a.bin", lambda p: p.write_bytes(b"1")),
    ]
    assert {p.name: oct(_mode(p)) for p in paths} == {p.name: oct(want) for p in paths}


def test_overwriting_takes_the_umask_not_the_old_mode(tmp_path, umask):
    umask(0o022)
    path = write_text(tmp_path / "a.txt", "old")
    os.chmod(path, 0o600)
    write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o644


def test_nan_and_infinities_are_written_as_null(tmp_path):
    obj = {"auc": float("nan"), "up": float("inf"), "down": -math.inf, "ok": 0.5,
           "arr": np.array([1.0, np.nan]), "np": np.float32("nan"), "t": torch.tensor([2.0, float("inf")]),
           "nested": [{"x": (np.int64(3), float("nan"))}], "path": Path("a/b")}
    path = write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
    want = {"auc": None, "up": None, "down": None, "ok": 0.5, "arr": [1.0, None], "np": None,
            "t": [2.0, None], "nested": [{"x": [3, None]}], "path": "a/b"}
    # The strict parser (no NaN constants) reads it, and so does read_json.
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert strict == want and read_json(path) == want
    back = read_json(path, null_as_nan=True)
    assert math.isnan(back["auc"]) and math.isnan(back["arr"][1]) and back["ok"] == 0.5
    assert math.isnan(back["nested"][0]["x"][1]) and back["nested"][0]["x"][0] == 3


def test_json_refuses_unknown_types_and_reports_bad_files(tmp_path):
    with pytest.raises(TypeError, match="set"):
        write_json(tmp_path / "x.json", {"s": {1, 2}})
    assert not list(tmp_path.iterdir())  # nothing left behind
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(JSONFileError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(JSONFileError, match=r"missing\.json: no such file"):
        read_json(tmp_path / "missing.json")


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "table.csv", "old\n")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("half of the new con")
        raise KeyboardInterrupt  # as when a run is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]

    def crash_in_h5(f: h5py.File) -> None:
        f.create_dataset("x", data=np.zeros(10))
        raise RuntimeError("disk full")

    h5 = write_h5(tmp_path / "bag.h5", lambda f: f.create_dataset("x", data=np.ones(3)))
    with pytest.raises(RuntimeError, match="disk full"):
        write_h5(h5, crash_in_h5)
    with h5py.File(h5, "r") as f:
        assert f["x"][()].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag.h5", "table.csv"]


def test_checkpoints_round_trip_and_are_byte_stable(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "epoch": 7, "names": ["a", "b"], "lr": 1e-3}
    a = save_checkpoint(tmp_path / "a.pt", state)
    b = save_checkpoint(tmp_path / "b.pt", state)
    back = load_checkpoint(a)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["epoch"] == 7
    assert back["names"] == ["a", "b"]
    # The archive is not named after the temporary file, so equal states give equal bytes.
    assert a.read_bytes() == b.read_bytes()


class _NotWeights:
    """A pickled Python object: what weights_only loading must refuse."""

    def __init__(self) -> None:
        self.value = 3


def test_bad_checkpoints_give_one_line_errors_naming_the_file(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotWeights()}, pickled)  # written by someone else, not by save_checkpoint
    with pytest.raises(CheckpointError, match=r"pickled\.pt: refused: it holds pickled Python objects "
                                              r"\(.*_NotWeights\), which are never unpickled") as err:
        load_checkpoint(pickled)
    assert "\n" not in str(err.value)

    full = save_checkpoint(tmp_path / "full.pt", {"w": torch.randn(100)}).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint") as err:
        load_checkpoint(truncated)
    assert "\n" not in str(err.value)

    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a checkpoint dict, found list"):
        load_checkpoint(listed)
    assert issubclass(CheckpointError, ValueError)  # the CLI prints ValueErrors as one line
