"""Run folders that cannot lose or mislabel results.

Every folder a mamba2d command writes results into carries a marker, ``.mamba2d-run.json``: which
command made it (``kind``), and whether its work is ``running``, ``failed`` or ``complete``. The
rules, for every command:

- a command writes only into a folder that does not exist, is empty, or is its own: a run of the
  same kind with the same configuration (continued where it stopped);
- ``--resume`` continues the run in the folder named on the command line, with that run's saved
  configuration; a flag that contradicts it is refused rather than ignored;
- outputs of one command (``eval``, ``predict``, ``heatmap``) never go inside another's run folder;
- paths are saved absolute, so a run folder can be used from any working directory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mamba2d.io import write_json

MARKER = ".mamba2d-run.json"
#: Settings that may differ between the calls of one run: where it runs and how it reports.
VOLATILE_FIELDS = frozenset({"device", "progress", "stop_after_epochs", "workers", "tensorboard", "cache",
                             "tuned"})


class RunDirError(ValueError):
    """A command would write into a folder that is not its own."""


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_marker(folder: Path, kind: str, status: str, **extra: Any) -> None:
    """Create or update the marker of ``folder`` (its creation time is kept)."""
    folder = Path(folder)
    old = read_marker(folder) or {}
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    from mamba2d import __version__

    marker = {"kind": kind, "status": status, "created": old.get("created", now), "updated": now,
              "mamba2d": __version__, "command": " ".join(sys.argv), **extra}
    write_json(folder / MARKER, marker)


def is_run_folder(folder: Path) -> bool:
    """A folder written by a mamba2d training command (a marker, or a run from before markers)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") in ("train", "vision-train")
    return (folder / "config.yaml").is_file() and any(folder.glob("fold*_seed*"))


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def config_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for every non-volatile setting that differs."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if key in VOLATILE_FIELDS:
            continue
        a, b = saved.get(key), wanted.get(key)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def claim_run_folder(out: Path, kind: str, config: dict[str, Any], *, resume: bool,
                     reuse_finished: bool = False) -> str:
    """Check that a training command may write into ``out`` and mark it as running.

    ``config``: the run's configuration as saved (absolute paths). ``resume``: the folder must hold a
    run already (the caller loaded its configuration). ``reuse_finished``: an identical finished run
    is accepted as it is (the demo reuses its runs); otherwise it is refused, since training again
    would overwrite its results. Returns ``"new"``, ``"continue"`` or ``"finished"``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder")
    marker = read_marker(out) if out.is_dir() else None
    if not out.exists() or not _entries(out) or _dead_run(out, marker, kind):
        if resume:
            raise RunDirError(f"--resume needs --out RUN_DIR of an earlier run; {out} holds none")
        return _start(out, kind, config)
    saved_path = out / "config.yaml"
    if marker is None and not is_run_folder(out):
        shown = ", ".join(_entries(out)[:5])
        raise RunDirError(f"--out {out} is not empty ({shown}) and is not a mamba2d run; choose an empty or "
                          f"new folder")
    if marker is not None and marker.get("kind") != kind:
        raise RunDirError(f"--out {out} holds the output of `mamba2d {marker.get('kind')}`, not a "
                          f"`mamba2d {kind}` run; choose another folder")
    if not saved_path.is_file():
        raise RunDirError(f"--out {out} is marked as a run but has no config.yaml; choose another folder")
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    diffs = config_differences(_absolute_paths(saved, out), config)
    status = (marker or {}).get("status", "unknown")
    if diffs:
        if resume:
            raise RunDirError(f"--resume continues {out} with its saved settings; these flags contradict "
                              f"them: {'; '.join(diffs)}. Leave them out, or start a new run with another "
                              f"--out")
        raise RunDirError(f"--out {out} holds another run ({'; '.join(diffs[:3])}); pass --resume to "
                          f"continue it as it was, or choose another --out")
    if status == "complete" and not resume and not reuse_finished:
        raise RunDirError(f"--out {out} already holds this finished run (see its metrics.json); choose "
                          f"another --out to train again")
    write_marker(out, kind, "running")
    return "finished" if status == "complete" else "continue"


def _start(out: Path, kind: str, config: dict[str, Any]) -> str:
    import yaml

    from mamba2d.io import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_marker(out, kind, "running")
    return "new"


def _dead_run(out: Path, marker: dict[str, Any] | None, kind: str) -> bool:
    """A run of this kind that failed before it trained anything: nothing in it is worth keeping,
    so the same command (fixed) may start over there instead of asking for --resume."""
    if marker is None or marker.get("kind") != kind or marker.get("status") != "failed":
        return False
    return not any(out.glob("last.pt")) and not any(out.glob("*/last.pt"))


def _absolute_paths(saved: dict[str, Any], run: Path) -> dict[str, Any]:
    """A saved configuration with relative paths (runs from before absolute paths) made absolute,
    relative to the current working directory (that of the original call is unknown)."""
    out = dict(saved)
    for key in PATH_FIELDS:
        if key in out:
            out[key] = _resolved(key, out[key])
    if "out" in out:
        out["out"] = str(run.resolve())
    return out


#: Configuration fields that hold paths (saved absolute).
PATH_FIELDS = ("features", "labels", "out", "splits", "patches_dir", "data", "config")


def absolute_config(cfg: Any) -> None:
    """Resolve the path fields of a configuration dataclass in place (``data`` only when it is a
    folder, since vision-train also takes the name ``fashion-mnist``)."""
    for f in dataclasses.fields(cfg):
        if f.name in PATH_FIELDS:
            setattr(cfg, f.name, _resolved(f.name, getattr(cfg, f.name)))


def _resolved(key: str, value: Any) -> Any:
    """A path setting made absolute; other values (None, and vision-train's data name
    ``fashion-mnist`` when no such folder exists) as they are."""
    if not isinstance(value, str) or not value:
        return value
    if key == "data" and not Path(value).exists():
        return value
    return str(Path(value).expanduser().resolve())


@contextmanager
def marked_run(out: Path, kind: str, enabled: bool = True) -> Iterator[None]:
    """Mark ``out`` complete when the body finishes, failed (with the error) when it raises."""
    try:
        yield
    except BaseException as err:
        if enabled and Path(out).is_dir():
            write_marker(out, kind, "failed", error=f"{type(err).__name__}: {err}"[:500])
        raise
    if enabled:
        write_marker(out, kind, "complete")


def claim_output_folder(out: Path, kind: str, inside_forbidden: Iterable[Path] = ()) -> None:
    """A folder for a command's outputs: new or empty, and not inside a run folder.

    ``inside_forbidden``: folders (the run being read) that ``out`` may not be or lie inside.
    """
    out = Path(out).resolve()
    for run in inside_forbidden:
        run = Path(run).resolve()
        if out == run or run in out.parents:
            raise RunDirError(f"--out {out} is inside the run {run}; `mamba2d {kind}` writes its results "
                              f"into a folder of their own, so that the run's own results stay as they are")
    for parent in [out, *out.parents]:
        if parent.is_dir() and is_run_folder(parent):
            raise RunDirError(f"--out {out} is inside the run folder {parent}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or _entries(out)):
        raise RunDirError(f"--out {out} already exists and is not empty; `mamba2d {kind}` never overwrites "
                          f"results it did not create: choose a new folder, or remove that one")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, kind, "running")


def refuse_existing_file(path: Path, what: str = "--out") -> None:
    """Results files are never overwritten: refuse a path that exists already."""
    if Path(path).exists():
        raise RunDirError(f"{what} {path} already exists; mamba2d never overwrites results it did not "
                          f"create: choose another name, or remove it")
