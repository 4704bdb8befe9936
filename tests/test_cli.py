"""The ``mamba2d`` command line."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

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


CLI_DIR = Path(mamba2d.__file__).parent / "cli"
MAX_FUNCTION_LINES = 60


def _long_functions(folder: Path, limit: int) -> list[str]:
    """'file:line name (N lines)' for each function (methods and nested ones too) over ``limit`` lines."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_cli_functions_stay_short():
    """One module per subcommand keeps each parser and handler readable: none over 60 lines."""
    assert len(list(CLI_DIR.glob("*.py"))) >= 10, f"no command modules found in {CLI_DIR}"
    assert _long_functions(CLI_DIR, MAX_FUNCTION_LINES) == []


def test_long_function_check_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "cmd.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    want = [f"cmd.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert _long_functions(tmp_path, MAX_FUNCTION_LINES) == want


def _model_help(help_text: str) -> str:
    """The --model entry of `mamba2d vision-train --help`, on one line."""
    entry = help_text.split("\n  --model NAME", 1)[1].split("--drop-path", 1)[0]
    return " ".join(entry.split())


def test_vision_train_help_lists_every_builder(capsys):
    from mamba2d.vision import BUILDERS

    with pytest.raises(SystemExit):
        main(["vision-train", "--help"])
    listed = _model_help(capsys.readouterr().out)
    assert len(BUILDERS) == 6
    for name in BUILDERS:  # vmamba2d_tiny/small/base and the 1D twins
        assert re.search(rf"\b{name}\b", listed), (name, listed)


def test_the_parser_does_not_import_timm():
    # timm takes seconds to import; the model list in the help comes from mamba2d's own table.
    code = ("import sys\nfrom mamba2d.cli import build_parser\n"
            "build_parser()._subparsers._group_actions[0].choices['vision-train'].format_help()\n"
            "assert 'timm' not in sys.modules, 'building the parser imported timm'\n")
    src = str(CLI_DIR.parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
