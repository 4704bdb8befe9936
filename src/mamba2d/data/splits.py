"""Train / validation / test splits: read, make (case-level stratified k-fold), write, resolve.

A split names slides or cases; :func:`resolve_split` turns it into rows of a
:class:`~mamba2d.data.labels.LabelTable` and checks it for unknown ids and leakage.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from mamba2d.data.bags import slide_stem
from mamba2d.data.labels import LabelError, LabelTable, read_table

__all__ = [
    "PARTS", "Split", "SplitError", "kfold_splits", "read_split_csv", "read_split_dir", "resolve_split",
    "split_from_column", "splits_from_labels", "write_split_csv",
]

PARTS: tuple[str, str, str] = ("train", "val", "test")


class SplitError(ValueError):
    """A split file is unreadable, or a split does not fit its label table (unknown ids, leakage...)."""


@dataclass(frozen=True)
class Split:
    """Ids in each part of one split: slide ids or case ids (or a mix), normalised by ``slide_stem``
    (repeats dropped, first occurrence kept).

    ``name`` identifies the split in messages; ``source`` is the file it came from, if any.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    name: str
    source: Path | None = None

    def __post_init__(self) -> None:
        # Normalise here, so a Split built by hand matches one read from a file.
        for part in PARTS:
            object.__setattr__(self, part, _unique_ids(getattr(self, part)))

    def part(self, part: str) -> tuple[str, ...]:
        """The ids of ``part`` (``train``, ``val`` or ``test``)."""
        if part not in PARTS:
            raise KeyError(f"no split part {part!r}; parts are {PARTS}")
        return getattr(self, part)

    @property
    def label(self) -> str:
        """How messages name this split: its name and, if any, its file."""
        return f"split {self.name!r}" + (f" ({self.source})" if self.source is not None else "")


def _unique_ids(values: Iterable[object]) -> tuple[str, ...]:
    """Normalised, non-empty ids in first-seen order; repeats collapse (UCEC's case-id splits list a
    case once per slide)."""
    seen: dict[str, None] = {}
    for v in values:
        if v is None or pd.isna(v):
            continue
        text = slide_stem(str(v))
        if text:
            seen.setdefault(text, None)
    return tuple(seen)


def read_split_csv(path: str | Path) -> Split:
    """Read a ``,train,val,test`` split CSV (CLAM style: an index column, one column per part, shorter
    columns padded with empty cells; a part may be all empty). Column names match in any case."""
    path = Path(path)
    try:
        frame = read_table(path, what="split")
    except LabelError as exc:
        raise SplitError(str(exc)) from exc
    cols = {str(c).strip().lower(): c for c in frame.columns}
    missing = [p for p in PARTS if p not in cols]
    if missing:
        raise SplitError(f"{path}: split file lacks column(s) {missing}; "
                         f"columns found: {list(frame.columns)}")
    parts = {p: _unique_ids(frame[cols[p]]) for p in PARTS}
    return Split(parts["train"], parts["val"], parts["test"], name=path.stem, source=path)


def read_split_dir(directory: str | Path) -> list[Split]:
    """All ``splits_<k>.csv`` in ``directory``, in numeric order of k (``splits_10`` after ``splits_9``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SplitError(f"{directory}: split folder does not exist")
    found = []
    for path in directory.iterdir():
        match = re.fullmatch(r"splits_(\d+)\.csv", path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    if not found:
        raise SplitError(f"{directory}: no splits_<k>.csv files")
    return [read_split_csv(p) for _, p in sorted(found)]


def write_split_csv(split: Split, path: str | Path) -> None:
    """Write ``split`` as a ``,train,val,test`` CSV that :func:`read_split_csv` reads back.

    Atomic: written to a temporary file in the same folder, then renamed over ``path``, so a crash
    never leaves a half-written split for a later run to train on.
    """
    path = Path(path)
    n = max(len(split.train), len(split.val), len(split.test))
    frame = pd.DataFrame({p: list(split.part(p)) + [""] * (n - len(split.part(p))) for p in PARTS})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            frame.to_csv(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_from_column(table: LabelTable, values: Sequence[str] | pd.Series, name: str | None = None) -> Split:
    """A split from one part name per row of ``table.frame`` (``train``/``val``/``test``, any case).

    ``values``: (len(table),) part names aligned with the frame's rows. The ids are slide ids.
    """
    parts = [str(v).strip().lower() for v in values]
    if len(parts) != len(table.frame):
        raise SplitError(f"{table.source}: {len(parts)} split values for {len(table.frame)} slides")
    aliases = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
    parts = [aliases.get(p, p) for p in parts]
    bad = sorted({p for p in parts if p not in PARTS})
    if bad:
        raise SplitError(f"{table.source}: split values {bad[:5]} are not train/val/test")
    slides = table.frame["slide_id"].tolist()
    by_part = {p: tuple(s for s, q in zip(slides, parts, strict=True) if q == p) for p in PARTS}
    return Split(by_part["train"], by_part["val"], by_part["test"],
                 name=name or f"{table.source.name}:split", source=table.source)


def splits_from_labels(table: LabelTable) -> Split | None:
    """The split given by the label file's own split column (BRACS ``split``, DHMC ``Data Split``),
    or None when it has none (PANDA, the TCGA files)."""
    if "split" not in table.frame.columns:
        return None
    return split_from_column(table, table.frame["split"])


# --------------------------------------------------------------------------------------------------
# K-fold


def _case_strata(table: LabelTable, cases: list[str], k: int) -> np.ndarray:
    """One stratum per case: its (most common) class, or for survival (bin, censorship), coarsened
    to bin alone then censorship alone until every stratum has at least ``k`` cases."""
    frame = table.frame
    if table.task == "classification":
        # A case whose slides disagree goes by its most common label (ties: the lower index).
        modal = frame.groupby("case_id")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
        return modal.loc[cases].to_numpy()
    first = frame.drop_duplicates("case_id").set_index("case_id").loc[cases]
    candidates = []
    if "bin" in first.columns:
        candidates.append(first["bin"].to_numpy() * 2 + first["censorship"].to_numpy())
        candidates.append(first["bin"].to_numpy())
    candidates.append(first["censorship"].to_numpy())
    for strata in candidates:
        if np.unique(strata, return_counts=True)[1].min() >= k:
            return strata
    return candidates[-1]


def kfold_splits(table: LabelTable, k: int = 5, seed: int = 0, val_fraction: float = 0.1) -> list[Split]:
    """``k`` case-level stratified folds: fold i tests on the i-th part of the cases, validates on a
    stratified ``val_fraction`` of the other cases, and trains on the rest.

    All slides of a case land in the same part. Stratified by class (classification), or by survival
    bin and censorship (survival; censorship alone before :meth:`LabelTable.with_bins`). The same
    ``seed`` gives the same folds. Ids in the returned splits are slide ids, sorted.
    """
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise SplitError(f"{table.source}: k must be an int >= 2, got {k!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"{table.source}: val_fraction must be in [0, 1), got {val_fraction}")
    frame = table.frame
    cases = sorted(frame["case_id"].unique().tolist())
    if len(cases) < k:
        raise SplitError(f"{table.source}: {len(cases)} case(s) cannot fill {k} folds")
    strata = _case_strata(table, cases, k)
    slides_of = frame.groupby("case_id")["slide_id"].agg(list).to_dict()
    case_arr = np.asarray(cases, dtype=object)

    def slides(case_ids: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(s for c in case_ids for s in slides_of[c]))

    folder = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    with warnings.catch_warnings():
        # Tiny strata only weaken the balance, which the caller cannot act on mid-loop.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            folds = list(folder.split(case_arr, strata))
        except ValueError as exc:
            raise SplitError(f"{table.source}: cannot make {k} stratified folds of {len(cases)} cases: "
                             f"{exc}") from exc
    for i, (rest_idx, test_idx) in enumerate(folds):
        # At least one case stays for training however large val_fraction is.
        n_val = min(int(round(val_fraction * len(rest_idx))), len(rest_idx) - 1)
        if n_val == 0:
            train_idx, val_idx = rest_idx, rest_idx[:0]
        else:
            try:
                train_idx, val_idx = train_test_split(rest_idx, test_size=n_val, random_state=seed + i,
                                                      stratify=strata[rest_idx])
            except ValueError:
                # A stratum with one case (or fewer val slots than strata): fall back to a plain draw.
                train_idx, val_idx = train_test_split(rest_idx, test_size=n_val, random_state=seed + i)
        out.append(Split(slides(case_arr[train_idx]), slides(case_arr[val_idx]), slides(case_arr[test_idx]),
                         name=f"kfold{k}-seed{seed}-fold{i}"))
    return out


# --------------------------------------------------------------------------------------------------
# Resolving a split against a label table


def _listing(ids: Sequence[str], n: int = 5) -> str:
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return f"{list(ids[:n])}{more}"


def resolve_split(split: Split, table: LabelTable, *, unknown: Literal["error", "drop"] = "error",
                  leakage: Literal["error", "warn"] = "error") -> dict[str, list[int]]:
    """Rows of ``table.frame`` (positions, ascending) in each part of ``split``.

    Each id is matched as a slide id first, else as a case id, which brings in all of the case's
    slides. Checks, all :class:`SplitError` naming the split:

    * ids matching no labelled slide or case (``unknown="drop"`` drops them with a warning instead;
      official splits name slides that have no label, e.g. TCGA-BRCA);
    * leakage: a slide, or a case's slides, in two parts (``leakage="warn"`` only warns, to
      reproduce published splits that have it: TCGA-BRCA, TCGA-NSCLC, TCGA-UCEC kfold);
    * an empty training part, or (classification) one with fewer than 2 classes.
    """
    if unknown not in ("error", "drop") or leakage not in ("error", "warn"):
        raise SplitError(f"unknown must be 'error'/'drop' and leakage 'error'/'warn', got {unknown!r}, "
                         f"{leakage!r}")
    frame = table.frame
    slide_row = {s: i for i, s in enumerate(frame["slide_id"])}
    case_rows = frame.groupby("case_id", sort=False).indices
    rows: dict[str, list[int]] = {}
    missing: list[str] = []
    for part in PARTS:
        found: set[int] = set()
        for ident in split.part(part):
            if ident in slide_row:
                found.add(slide_row[ident])
            elif ident in case_rows:
                found.update(int(r) for r in case_rows[ident])
            else:
                missing.append(ident)
        rows[part] = sorted(found)
    if missing:
        msg = (f"{split.label}: {len(missing)} id(s) match no labelled slide or case in {table.source}: "
               f"{_listing(missing)}")
        if unknown == "error":
            raise SplitError(msg + "; pass unknown='drop' to leave them out")
        warnings.warn(msg + "; left out", stacklevel=2)

    problems = []
    cases = frame["case_id"].to_numpy()
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1:]:
            both = sorted(set(rows[a]) & set(rows[b]))
            if both:
                problems.append(f"{len(both)} slide(s) in both {a} and {b}: "
                                f"{_listing(frame['slide_id'].iloc[both].tolist())}")
            shared = sorted(set(cases[rows[a]]) & set(cases[rows[b]]))
            if shared:
                problems.append(f"{len(shared)} case(s) with slides in both {a} and {b}: {_listing(shared)}")
    if problems:
        msg = f"{split.label}: leakage between parts: " + "; ".join(problems)
        if leakage == "error":
            raise SplitError(msg + "; fix the split, or keep it knowingly with --allow-leakage "
                             "(leakage='warn')")
        warnings.warn(msg, stacklevel=2)

    if not rows["train"]:
        raise SplitError(f"{split.label}: the training part is empty (after matching {table.source})")
    if table.task == "classification":
        present = sorted(set(frame["label"].iloc[rows["train"]].tolist()))
        if len(present) < 2:
            names = [table.class_names[c] for c in present]
            raise SplitError(f"{split.label}: the training part has only class(es) {names}; "
                             f"a classifier needs at least 2")
    return rows
