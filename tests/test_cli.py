"""The ``mamba2d`` command line."""

import pytest

import mamba2d
from mamba2d.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out
    assert "bench" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert mamba2d.__version__ in capsys.readouterr().out


def test_selfcheck_succeeds(capsys):
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out
