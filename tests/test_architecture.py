"""The layering rule (docs/architecture.md): a module imports only from its own layer or lower ones.

Read statically with ``ast``, so imports inside functions (the lazy ones) count as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mamba2d"

#: The layers, lowest first; each name is a top-level module or package of mamba2d. "mamba2d" is the
#: package itself (its __init__, the public facade), "__main__" is `python -m mamba2d`;
#: "__version__" is the version string, which the package's __init__ sets before any import.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("io", "extras", "__version__"),
    ("ops",),
    ("nn",),
    ("mil", "vision"),
    ("data", "train"),
    ("wsi",),
    ("bench",),
    ("cli", "__main__", "mamba2d"),
)
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _room(module: str) -> str:
    """'mamba2d.bench.demo' -> 'bench'; 'mamba2d' -> 'mamba2d'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mamba2d"


def _module_name(path: Path, src: Path = SRC) -> str:
    """src/mamba2d/bench/demo.py -> 'mamba2d.bench.demo'."""
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported mamba2d module) of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mamba2d"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mamba2d":
                continue
            if target == "mamba2d":  # `from mamba2d import x`: x may be a subpackage or a facade name
                for alias in node.names:
                    sub = f"mamba2d.{alias.name}"
                    found.append((node.lineno, sub if _room(sub) in LEVEL else "mamba2d"))

            else:
                found.append((node.lineno, target))
    return found


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    rooms = {_room(_module_name(p)) for p in _modules()}
    assert rooms - set(LEVEL) == set(), "add the new top-level module to LAYERS (and docs/architecture.md)"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in _modules():
        module = _module_name(path)
        level = LEVEL[_room(module)]
        for line, target in _imports(path, module):
            if LEVEL[_room(target)] > level:
                where = f"{path.relative_to(SRC.parent)}:{line}"
                violations.append(f"{where}: {module} ({_room(module)}) imports {target} ({_room(target)})")
    assert violations == []


def test_the_checker_sees_upward_imports(tmp_path):
    # The parser itself: an upward import written three ways (absolute, relative, inside a function)
    # is found, a downward one is not.
    pkg = tmp_path / "mamba2d" / "ops"
    pkg.mkdir(parents=True)
    bad = pkg / "bad.py"
    bad.write_text("from mamba2d.io import write_json\nfrom mamba2d import __version__\n"
                   "from ..train import engine\n"
                   "def f():\n    import mamba2d.bench.demo\n    from mamba2d import run_demo\n")
    targets = [t for _, t in _imports(bad, _module_name(bad, tmp_path / "mamba2d"))]
    assert targets == ["mamba2d.io", "mamba2d.__version__", "mamba2d.train", "mamba2d.bench.demo", "mamba2d"]
    assert [LEVEL[_room(t)] > LEVEL["ops"] for t in targets] == [False, False, True, True, True]


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_the_documented_order_is_the_tested_one(doc):
    text = (SRC.parents[1] / doc).read_text()
    assert "io <- ops <- nn <- mil/vision <- data/train <- wsi <- bench <- cli" in text
    for names in LAYERS:
        for name in names:
            if name not in ("mamba2d", "__main__", "extras", "__version__"):
                assert f"`{name}" in text, f"{doc} does not describe {name}"
