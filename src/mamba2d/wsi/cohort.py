"""Cohorts of slides across processes: which process extracts which slide, and the manifest.

Slides are split into shards by size (largest first, each to the shard with the fewest bytes so
far), so that the shards finish at about the same time; every process computes the same split
from the same slide list. A process is shard ``i`` of ``n`` by ``--shard i/n``, by a SLURM array
(``--shard slurm``), by its torchrun rank, or by both (a SLURM array of torchrun jobs: shard
``i * world + rank`` of ``n * world``).

Each finished (or failed) slide gets its own small JSON record, ``OUT/manifest/<slide_id>.json``,
written atomically by the process that did it; ``OUT/manifest.csv`` is merged from the records
under a file lock, so concurrent processes never lose one another's rows.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["MANIFEST_COLUMNS", "Shard", "assign_shards", "merge_manifest", "parse_shard", "read_record",
           "record_path", "write_record"]

MANIFEST_COLUMNS = ["slide_id", "path", "status", "n_patches", "seconds", "h5", "error", "patches_per_s",
                    "worker", "finished_at"]


@dataclass(frozen=True)
class Shard:
    """This process is shard ``index`` (0-based) of ``count``."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def within(self, rank: int, world: int) -> Shard:
        """The finer shard of rank ``rank`` of ``world`` processes inside this one."""
        return Shard(self.index * world + rank, self.count * world)


def parse_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> Shard:
    """``None`` -> 0/1; ``"i/n"`` (0 <= i < n); ``"slurm"``: from ``SLURM_ARRAY_TASK_ID`` and
    ``SLURM_ARRAY_TASK_COUNT`` (task ids counted from ``SLURM_ARRAY_TASK_MIN``, default 0), for a
    job array such as ``sbatch --array=0-9``. Raises ValueError naming ``--shard``."""
    env = os.environ if environ is None else environ
    if spec is None or spec == "":
        return Shard()
    if spec == "slurm":
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except KeyError as err:
            raise ValueError(f"--shard slurm: {err.args[0]} is not set (run it inside a SLURM job "
                             "array, e.g. sbatch --array=0-9)") from err
        except ValueError as err:
            raise ValueError(f"--shard slurm: the SLURM_ARRAY_* variables are not integers ({err})") from err
        index = task - first
        if not 0 <= index < count:
            raise ValueError(f"--shard slurm: task {task} is outside the array "
                             f"({first}..{first + count - 1}); use a contiguous array such as --array=0-9")
        return Shard(index, count)
    parts = spec.split("/")
    try:
        index, count = int(parts[0]), int(parts[1])
        if len(parts) != 2:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"--shard must be I/N (e.g. 0/4) or slurm, got {spec!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {spec}: need 0 <= I < N")
    return Shard(index, count)


def assign_shards(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions of ``sizes`` for each of ``count`` shards: largest first, each to the shard with
    the least total so far (ties: the lower shard), each shard's list in input order."""
    totals = [0] * count
    shards: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        k = min(range(count), key=lambda s: (totals[s], s))
        shards[k].append(i)
        totals[k] += int(sizes[i])
    return [sorted(s) for s in shards]


def record_path(out: str | Path, slide_id: str) -> Path:
    return Path(out) / "manifest" / f"{slide_id}.json"


def write_record(out: str | Path, record: dict[str, Any]) -> Path:
    """Atomically write one slide's record (``record["slide_id"]`` names it)."""
    from mamba2d.io import write_json

    return write_json(record_path(out, str(record["slide_id"])), record)


def read_record(out: str | Path, slide_id: str) -> dict[str, Any] | None:
    """The slide's record, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(record_path(out, slide_id).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def merge_manifest(out: str | Path, slide_ids: Sequence[str]) -> pd.DataFrame:
    """Write ``OUT/manifest.csv`` from the records of ``slide_ids`` (in that order; slides without
    a record are left out) and return it. Records of slides not in the list stay on disk but are
    not listed. Runs under an exclusive lock on ``OUT/manifest/.lock``."""
    from mamba2d.io import write_text

    out = Path(out)
    with _locked(out / "manifest" / ".lock"):
        rows = [r for r in (read_record(out, s) for s in slide_ids) if r is not None]
        frame = pd.DataFrame([{k: r.get(k) for k in MANIFEST_COLUMNS} for r in rows],
                             columns=MANIFEST_COLUMNS)
        write_text(out / "manifest.csv", frame.to_csv(index=False))
    return frame
