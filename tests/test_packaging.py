"""The package declares what it imports, and the core install is enough for the core.

Imports are read statically (``ast``), so lazy imports inside functions count. The installed
check itself (a built wheel in a clean virtual environment) is ``make wheel-check``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mamba2d"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: Imports that are deliberately not declared, and why.
UNDECLARED = {
    "openslide": "an alternative slide reader, used instead of tiffslide when the user installed it",
}
#: Import names whose distribution is named differently, for packages that may not be installed here.
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "yaml": "pyyaml"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])


def _declared() -> dict[str, set[str]]:
    """Distribution names per extra ("" for the core), self-references expanded."""
    project = PYPROJECT["project"]
    raw = {"": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}
    for extra, reqs in raw.items():
        names = set()
        for req in reqs:
            name = _requirement_name(req)
            if name == "mamba2d":  # mamba2d[vision,wsi]: those extras' packages
                inner = re.search(r"\[(.*?)\]", req)
                for sub in inner.group(1).split(",") if inner else ():
                    names |= {_requirement_name(r) for r in raw[sub.strip()]}
            else:
                names.add(name)
        out[extra] = names
    return out


def _third_party_imports(paths: list[Path]) -> dict[str, list[str]]:
    """Top-level import name -> files importing it, for every non-stdlib, non-mamba2d import."""
    found: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("mamba2d", "__future__"):
                    continue
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    # Optional imports made through mamba2d.extras.require("module", "extra").
    for path in paths:
        for module, _extra in re.findall(r'require\("([\w.]+)", "(\w+)"\)', path.read_text()):
            found.setdefault(module.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def _distribution(top: str) -> str:
    if top in DISTRIBUTION:
        return DISTRIBUTION[top]
    dists = importlib.metadata.packages_distributions().get(top)
    return _norm(dists[0]) if dists else _norm(top)


def test_every_import_is_declared():
    declared = set().union(*_declared().values())
    missing = {}
    for top, files in _third_party_imports(sorted(SRC.rglob("*.py"))).items():
        if top not in UNDECLARED and _distribution(top) not in declared:
            missing[top] = sorted(set(files))
    assert missing == {}, "declare these in pyproject.toml (core or an extra)"


def test_a_core_install_trains_and_names_the_missing_extra(tmp_path):
    # A fresh interpreter in which every optional package fails to import, as on a core install:
    # the package, the training and evaluation modules and the command line load; a slide command
    # ends with one line naming the extra to install.
    project = PYPROJECT["project"]
    optional = set().union(*(map(_requirement_name, project["optional-dependencies"][e])
                             for e in ("wsi", "vision", "triton", "tensorboard")))
    # Pillow stays: matplotlib (core) needs it itself.
    blocked = sorted({top for top in _third_party_imports(sorted(SRC.rglob("*.py")))
                      if _distribution(top) in optional - {"pillow"}} | {"openslide"})
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "s1.svs").write_bytes(b"not read")
    code = f"""
import importlib.abc, io, sys
from contextlib import redirect_stderr

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
import mamba2d, mamba2d.train.engine, mamba2d.train.evaluate
from mamba2d.cli import main
assert main(["train", "--list-models"]) == 0
err = io.StringIO()
with redirect_stderr(err):
    code = main(["extract", "--no-progress", "--slides", {str(tmp_path / "slides")!r},
                 "--out", {str(tmp_path / "out")!r}])
lines = err.getvalue().strip().splitlines()
assert code == 2 and len(lines) == 1 and "install mamba2d[wsi]" in lines[0], (code, lines)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
assert not loaded, loaded
"""
    env = {**os.environ, "PYTHONPATH": str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2dmambamil" in done.stdout


def test_extras_cover_what_require_asks_for():
    declared = _declared()
    for path in SRC.rglob("*.py"):
        for module, extra in re.findall(r'require\("([\w.]+)", "(\w+)"\)', path.read_text()):
            assert extra in declared, f"{path}: no extra [{extra}]"
            dist = _distribution(module.split(".")[0])
            assert dist in declared[extra], f"{path}: {module} is not in [{extra}]"


def test_metadata_license_and_typed_marker():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["mamba2d"]
    assert {"wsi", "vision", "test"} <= set(project["optional-dependencies"])
    citation = (ROOT / "CITATION.cff").read_text()
    assert "2412.00678" in citation and "2DMamba" in citation
    assert (ROOT / "CHANGELOG.md").is_file()


def test_a_missing_extra_is_one_line_naming_it():
    from mamba2d.extras import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"^no_such_module_x is not installed: install mamba2d\[wsi\] "
                                                r"\(pip install 'mamba2d\[wsi\]'\)$") as err:
        require("no_such_module_x.sub", "wsi")
    assert isinstance(err.value, ValueError)  # the CLI prints ValueErrors as one line
    assert require("json", "wsi").__name__ == "json"
