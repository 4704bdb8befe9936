"""Label tables: slide-level classification labels or survival times, read from CSV.

Columns are found by name (see the ``*_ALIASES`` tuples) unless given; slide ids are normalised
with :func:`mamba2d.data.bags.slide_stem`. See ``docs/data-formats.md`` for the accepted files.
"""

from __future__ import annotations

import io
import math
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mamba2d.data.bags import slide_stem

__all__ = [
    "CASE_ALIASES", "CENSOR_ALIASES", "EVENT_ALIASES", "LABEL_ALIASES", "LabelError", "LabelTable",
    "SLIDE_ALIASES", "SPLIT_ALIASES", "TIME_ALIASES", "read_labels", "survival_bins",
]

SLIDE_ALIASES: tuple[str, ...] = ("slide_id", "image_id", "File Name", "slide")
CASE_ALIASES: tuple[str, ...] = ("case_id", "patient_id", "case")
LABEL_ALIASES: tuple[str, ...] = ("label", "Diagnosis", "isup_grade", "oncotree_code", "class")
TIME_ALIASES: tuple[str, ...] = ("survival_months", "survival_days", "time")
CENSOR_ALIASES: tuple[str, ...] = ("censorship", "censored")
#: Event indicators (1 = event observed); censorship is taken as 1 - event.
EVENT_ALIASES: tuple[str, ...] = ("event", "status")
SPLIT_ALIASES: tuple[str, ...] = ("split", "Data Split", "set")

#: Days per month, to report ``survival_days`` columns in months (365.25 / 12).
DAYS_PER_MONTH = 30.4375

_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# TCGA patient barcode: project, tissue source site, participant (e.g. TCGA-3C-AALI).
_TCGA_CASE = re.compile(r"^(TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4})(-|$)")
_ZIP_MAGIC = b"PK\x03\x04"


class LabelError(ValueError):
    """A label file is missing, unreadable, or has missing, invalid or conflicting values."""


@dataclass
class LabelTable:
    """Slide labels, one row per slide.

    ``frame`` columns: ``slide_id`` (normalised stem), ``case_id`` (patient; see :func:`read_labels`
    for its fallback), then for classification ``label`` (int index into ``class_names``) and
    ``label_name`` (str), or for survival ``survival_months`` (float, months), ``censorship`` (int,
    1 = censored i.e. alive at last follow-up, 0 = event observed) and, after :meth:`with_bins`,
    ``bin`` (int in [0, n_bins - 1]). ``split`` (``train``/``val``/``test``) when the file had one.
    ``bin_edges``: the (n_bins + 1,) edges in months used by :meth:`with_bins`, else None.
    """

    task: Literal["classification", "survival"]
    frame: pd.DataFrame
    class_names: list[str]
    source: Path
    bin_edges: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def n_classes(self) -> int:
        """Number of classes (classification), or of survival bins once binned, else 0."""
        if self.task == "classification":
            return len(self.class_names)
        return len(self.bin_edges) - 1 if self.bin_edges is not None else 0

    def with_bins(self, edges: Sequence[float] | np.ndarray) -> LabelTable:
        """A copy with a ``bin`` column: each time's bin under ``edges`` (see :func:`survival_bins`)."""
        if self.task != "survival":
            raise LabelError(f"{self.source}: survival bins need a survival table, this one is {self.task}")
        edges_arr = _check_edges(edges, self.source)
        frame = self.frame.copy()
        frame["bin"] = _assign_bins(frame["survival_months"].to_numpy(dtype=np.float64), edges_arr)
        return replace(self, frame=frame, bin_edges=tuple(float(e) for e in edges_arr))

    def bin_edges_from(self, n_bins: int = 4, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Survival bin edges fitted on ``rows`` (positions in ``frame``; default all), one per case.

        Patch-GCN and MCAT take the quantiles over patients, so a case with several slides is counted
        once here (its first row among ``rows``).
        """
        if self.task != "survival":
            raise LabelError(f"{self.source}: survival bins need a survival table, this one is {self.task}")
        mask = np.zeros(len(self.frame), dtype=bool)
        if rows is None:
            mask[:] = True
        else:
            mask[np.asarray(rows, dtype=np.int64)] = True
        first_of_case = ~self.frame["case_id"].where(mask).duplicated() & mask
        edges, _ = survival_bins(self.frame["survival_months"].to_numpy(),
                                 self.frame["censorship"].to_numpy(), n_bins=n_bins,
                                 fit_mask=first_of_case.to_numpy(), name=str(self.source))
        return edges

    def to_json_dict(self) -> dict[str, Any]:
        """The label mapping as plain JSON types, to save beside a trained model.

        An infinite bin edge is written as the string ``"inf"`` (``float("inf")`` reads it back),
        because strict JSON has no infinity.
        """
        out: dict[str, Any] = {"task": self.task, "source": str(self.source), "n_slides": len(self.frame)}
        if self.task == "classification":
            out["class_names"] = list(self.class_names)
            out["label_to_index"] = {name: i for i, name in enumerate(self.class_names)}
        else:
            out["time_unit"] = "months"
            out["censorship"] = "1 = censored, 0 = event observed"
            if self.bin_edges is not None:
                out["bin_edges"] = [e if math.isfinite(e) else "inf" for e in self.bin_edges]
        return out


# --------------------------------------------------------------------------------------------------
# Reading


def _read_zip_bytes(data: bytes, where: str, depth: int = 0) -> bytes:
    """The CSV bytes inside a zip, unwrapping a zip inside the zip. Nothing is extracted to disk,
    so member names like ``../x.csv`` (TCGA-NSCLC-label.csv.zip has one) are harmless."""
    if depth > 3:
        raise LabelError(f"{where}: zips nested more than 3 deep")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [m for m in zf.infolist()
                       if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                       and not m.filename.rsplit("/", 1)[-1].startswith(".")]
            if len(members) != 1:
                names = [m.filename for m in members]
                raise LabelError(f"{where}: a label zip must hold exactly one file, found {names}")
            inner = zf.read(members[0])
            name = members[0].filename
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError) as exc:
        raise LabelError(f"{where}: not a readable zip file: {exc}") from exc
    # Decide by content, not by name: the NSCLC archive's member is named *.csv.zip but is plain CSV.
    if inner.startswith(_ZIP_MAGIC):
        return _read_zip_bytes(inner, f"{where}!{name}", depth + 1)
    return inner


def read_table(path: str | Path, what: str = "label") -> pd.DataFrame:
    """A ``.csv`` or zipped CSV (``.csv.zip``, possibly a zip inside the zip) as a DataFrame.

    Every cell is read as text (empty and NA-like cells as missing), so ids such as ``0012`` keep
    their zeros; callers convert numeric columns themselves. Unnamed columns (a saved pandas index,
    ``Unnamed: 0``) are dropped. ``what`` names the file's role in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: {what} file does not exist")
    try:
        if path.suffix.lower() == ".zip":
            frame = pd.read_csv(io.BytesIO(_read_zip_bytes(path.read_bytes(), str(path))), dtype=str)
        else:
            frame = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise LabelError(f"{path}: could not read the {what} CSV: {exc}") from exc
    unnamed = [c for c in frame.columns if re.fullmatch(r"Unnamed: \d+", str(c))]
    return frame.drop(columns=unnamed)


def _norm_col(name: object) -> str:
    return re.sub(r"[\s_]+", " ", str(name)).strip().lower()


def _find_column(frame: pd.DataFrame, given: str | None, aliases: Sequence[str], role: str, path: Path,
                 required: bool = True) -> str | None:
    """The column to use for ``role``: ``given`` exactly, else the first alias present.

    Aliases match ignoring case, spaces and underscores (``Data Split`` = ``data_split``).
    """
    if given is not None:
        if given not in frame.columns:
            raise LabelError(f"{path}: no {role} column {given!r}; columns found: {list(frame.columns)}")
        return given
    by_norm: dict[str, str] = {}
    for col in frame.columns:
        by_norm.setdefault(_norm_col(col), str(col))
    for alias in aliases:
        if _norm_col(alias) in by_norm:
            return by_norm[_norm_col(alias)]
    if required:
        raise LabelError(f"{path}: no {role} column; tried {list(aliases)}, columns found: "
                         f"{list(frame.columns)}; pass the column name explicitly")
    return None


def _first_ids(frame: pd.DataFrame, mask: pd.Series | np.ndarray, n: int = 5) -> str:
    ids = frame.loc[np.asarray(mask), "slide_id"].tolist()
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return f"{ids[:n]}{more}"


def _label_text(value: object) -> str:
    """A label cell as text; whole numbers written as floats (``2.0``: pandas writes an int column
    holding a NaN that way) lose the ``.0`` so they match ``2``."""
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+\.0*", text):
        return str(int(float(text)))
    return text


def _case_fallback(slide: str) -> str:
    """The case id for a row without one: the TCGA patient barcode if the slide is TCGA, else the slide.

    Using the barcode keeps a patient's slides together in case-level splits even when only some
    rows have a case id (TCGA-BRCA-label.csv lacks it on 162 rows).
    """
    match = _TCGA_CASE.match(slide)
    return match.group(1) if match else slide


def read_labels(path: str | Path, task: Literal["classification", "survival"], *,
                slide_col: str | None = None, label_col: str | None = None, case_col: str | None = None,
                time_col: str | None = None, censor_col: str | None = None,
                class_order: Sequence[str] | None = None, label_map: dict[str, str] | None = None,
                drop_other: bool = False) -> LabelTable:
    """Read a slide label CSV (``.csv`` or ``.csv.zip``) into a :class:`LabelTable`.

    Columns are found by alias unless given: slide :data:`SLIDE_ALIASES`, case :data:`CASE_ALIASES`,
    label :data:`LABEL_ALIASES`, time :data:`TIME_ALIASES`, censorship :data:`CENSOR_ALIASES`, split
    :data:`SPLIT_ALIASES`; the first alias in each list that exists wins. Without a censorship column,
    an event column (:data:`EVENT_ALIASES`, 1 = event) gives censorship = 1 - event. A
    ``survival_days`` column is converted to months (/ :data:`DAYS_PER_MONTH`); other time columns are
    taken as months.

    Case ids: missing ones (no column, or empty cells) become the TCGA patient barcode for TCGA
    slides, else the slide id, so every slide is its own case when nothing says otherwise.

    Classification: labels are compared as text after ``label_map`` (raw text -> class name; labels
    not in it pass through). ``class_names`` is ``class_order`` if given, else the sorted labels
    (numerically when all are numbers). With ``class_order``, a label outside it is an error, or,
    with ``drop_other=True``, its rows are dropped with a warning.

    Duplicate slide rows with equal labels are merged; conflicting ones are an error, as are missing
    labels or times, negative times and censorship outside {0, 1}. Errors are :class:`LabelError`,
    naming the file and the column.
    """
    path = Path(path)
    if task not in ("classification", "survival"):
        raise LabelError(f"{path}: task must be 'classification' or 'survival', got {task!r}")
    raw = read_table(path)
    s_col = _find_column(raw, slide_col, SLIDE_ALIASES, "slide", path)
    c_col = _find_column(raw, case_col, CASE_ALIASES, "case", path, required=False)
    sp_col = _find_column(raw, None, SPLIT_ALIASES, "split", path, required=False)
    assert s_col is not None
    if raw.empty:
        raise LabelError(f"{path}: no rows; the file has only the header {list(raw.columns)}")

    slides = raw[s_col]
    if slides.isna().any():
        rows = np.flatnonzero(slides.isna().to_numpy())[:5].tolist()
        raise LabelError(f"{path}: column {s_col!r} has empty slide ids (rows {rows})")
    frame = pd.DataFrame({"slide_id": [slide_stem(str(s)) for s in slides]})
    if c_col is not None:
        cases = raw[c_col]
        frame["case_id"] = [str(c).strip() if pd.notna(c) else _case_fallback(s)
                            for c, s in zip(cases, frame["slide_id"], strict=True)]
    else:
        frame["case_id"] = [_case_fallback(s) for s in frame["slide_id"]]

    class_names: list[str] = []
    if task == "classification":
        l_col = _find_column(raw, label_col, LABEL_ALIASES, "label", path)
        assert l_col is not None
        values = raw[l_col]
        if values.isna().any():
            raise LabelError(f"{path}: column {l_col!r} has no label for slide(s) "
                             f"{_first_ids(frame, values.isna())}")
        names = [_label_text(v) for v in values]
        if label_map:
            names = [label_map.get(n, n) for n in names]
        frame["label_name"] = names
        if class_order is not None:
            class_names = [str(c) for c in class_order]
            if len(set(class_names)) != len(class_names):
                raise LabelError(f"{path}: class_order repeats a class: {class_names}")
            other = ~frame["label_name"].isin(class_names)
            if other.any():
                counts = frame.loc[other, "label_name"].value_counts().to_dict()
                if not drop_other:
                    raise LabelError(f"{path}: column {l_col!r} has labels outside the classes {class_names} "
                                     f"(--classes): {counts}, e.g. slide(s) {_first_ids(frame, other)}; fix "
                                     f"them, or skip those slides with --skip-bad (drop_other=True)")
                warnings.warn(f"{path}: dropping {int(other.sum())} slide(s) whose {l_col!r} is not in "
                              f"{class_names}: {counts}", stacklevel=2)
                keep = ~other.to_numpy()
                if not keep.any():
                    raise LabelError(f"{path}: no slide's {l_col!r} is in class_order {class_names}")
                frame, raw = frame[keep].reset_index(drop=True), raw[keep].reset_index(drop=True)
        else:
            class_names = _sorted_labels(frame["label_name"].unique().tolist())
            _warn_rare_classes(frame, class_names, l_col, path)
        index = {name: i for i, name in enumerate(class_names)}
        frame["label"] = frame["label_name"].map(index).astype(np.int64)
        value_cols = ["label"]
    else:
        frame, raw, value_cols = _survival_columns(frame, raw, path, time_col, censor_col)

    if sp_col is not None:
        frame["split"] = _split_values(raw[sp_col], frame, sp_col, path)

    frame = _merge_duplicates(frame, value_cols, path)
    ordered = ["slide_id", "case_id"] + (["label", "label_name"] if task == "classification"
                                         else ["survival_months", "censorship"])
    ordered += [c for c in frame.columns if c not in ordered]
    return LabelTable(task=task, frame=frame[ordered].reset_index(drop=True), class_names=class_names,
                      source=path)


def _warn_rare_classes(frame: pd.DataFrame, class_names: list[str], col: str, path: Path) -> None:
    """Without an explicit class list a typo becomes a class of its own: say so when a class is far
    rarer than the others (one slide, or under 2% of the slides while another class has 10x more)."""
    counts = frame["label_name"].value_counts()
    biggest, n = int(counts.max()), len(frame)
    rare = [c for c in class_names
            if biggest >= 10 * counts[c] and (counts[c] == 1 or counts[c] < 0.02 * n)]
    if rare:
        shown = {c: int(counts[c]) for c in rare[:5]}
        common = {k: int(v) for k, v in counts.head(3).items()}
        warnings.warn(f"{path}: column {col!r}: class(es) {shown} are far rarer than the others ({common}); "
                      f"if one is a typo, give the classes with --classes A,B,... so that other labels are "
                      f"errors", stacklevel=3)


def _sorted_labels(labels: list[str]) -> list[str]:
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _survival_columns(frame: pd.DataFrame, raw: pd.DataFrame, path: Path, time_col: str | None,
                      censor_col: str | None) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    t_col = _find_column(raw, time_col, TIME_ALIASES, "survival time", path)
    assert t_col is not None
    times = pd.to_numeric(raw[t_col], errors="coerce")
    bad_text = times.isna() & raw[t_col].notna()
    if bad_text.any():
        raise LabelError(f"{path}: column {t_col!r} has non-numeric times for slide(s) "
                         f"{_first_ids(frame, bad_text)}")
    if times.isna().any():
        raise LabelError(f"{path}: column {t_col!r} has no survival time for slide(s) "
                         f"{_first_ids(frame, times.isna())}")
    if np.isinf(times).any():
        raise LabelError(f"{path}: column {t_col!r} has infinite survival times for slide(s) "
                         f"{_first_ids(frame, np.isinf(times))}")
    if (times < 0).any():
        raise LabelError(f"{path}: column {t_col!r} has negative survival times for slide(s) "
                         f"{_first_ids(frame, times < 0)}")
    if _norm_col(t_col) == "survival days":
        times = times / DAYS_PER_MONTH

    cen_col = _find_column(raw, censor_col, CENSOR_ALIASES, "censorship", path, required=False)
    flip = False
    if cen_col is None:
        cen_col = _find_column(raw, None, EVENT_ALIASES, "censorship", path, required=False)
        if cen_col is None:
            raise LabelError(f"{path}: no censorship column; tried {list(CENSOR_ALIASES)} and event "
                             f"columns {list(EVENT_ALIASES)}; columns found: {list(raw.columns)}")
        flip = True
    cells = raw[cen_col]
    if cells.isna().any():
        raise LabelError(f"{path}: column {cen_col!r} has no value for slide(s) "
                         f"{_first_ids(frame, cells.isna())}")
    words = {"true": "1", "false": "0"}
    flags = pd.to_numeric(cells.str.strip().str.lower().replace(words), errors="coerce")
    bad = ~flags.isin([0, 1])
    if bad.any():
        raise LabelError(f"{path}: column {cen_col!r} must be 0 or 1, got {sorted(set(cells[bad]))[:5]} "
                         f"for slide(s) {_first_ids(frame, bad)}")
    cens = flags.astype(np.int64)
    frame["survival_months"] = times.astype(np.float64).to_numpy()
    frame["censorship"] = (1 - cens if flip else cens).to_numpy()
    return frame, raw, ["survival_months", "censorship"]


def _split_values(values: pd.Series, frame: pd.DataFrame, col: str, path: Path) -> list[str]:
    """Split cells as ``train``/``val``/``test`` whatever their case (DHMC writes ``Train``)."""
    if values.isna().any():
        raise LabelError(f"{path}: column {col!r} has no split for slide(s) "
                         f"{_first_ids(frame, values.isna())}")
    out = [_SPLIT_VALUES.get(str(v).strip().lower(), "") for v in values]
    bad = np.array([o == "" for o in out])
    if bad.any():
        unknown = sorted({str(v) for v, b in zip(values, bad, strict=True) if b})
        raise LabelError(f"{path}: column {col!r} holds {unknown[:5]}, expected train/val/test "
                         f"(any case), for slide(s) {_first_ids(frame, bad)}")
    return out


def _merge_duplicates(frame: pd.DataFrame, value_cols: list[str], path: Path) -> pd.DataFrame:
    """One row per slide: equal duplicates merge, conflicting ones (labels, case or split) are errors."""
    dup = frame["slide_id"].duplicated(keep=False)
    if not dup.any():
        return frame
    check = value_cols + ["case_id"] + (["split"] if "split" in frame.columns else [])
    conflict = frame[dup].groupby("slide_id", sort=False)[check].nunique(dropna=False).gt(1).any(axis=1)
    if conflict.any():
        ids = conflict[conflict].index.tolist()
        raise LabelError(f"{path}: slide(s) listed more than once with different {'/'.join(check)}: "
                         f"{ids[:5]}" + (f" and {len(ids) - 5} more" if len(ids) > 5 else ""))
    return frame.drop_duplicates("slide_id", keep="first")


# --------------------------------------------------------------------------------------------------
# Survival bins


def _check_edges(edges: Sequence[float] | np.ndarray, source: object) -> np.ndarray:
    arr = np.asarray(edges, dtype=np.float64).reshape(-1)
    if arr.size < 2 or np.isnan(arr).any() or not (np.diff(arr) > 0).all():
        raise LabelError(f"{source}: bin edges must be at least 2 increasing numbers, got {arr.tolist()}")
    return arr


def _assign_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # Left-closed bins [e_k, e_{k+1}), as pandas.cut(right=False) in Patch-GCN / MCAT; times beyond
    # the outer edges are clipped into the first / last bin.
    bins = np.searchsorted(edges, times, side="right") - 1
    return np.clip(bins, 0, edges.size - 2).astype(np.int64)


def survival_bins(times: Sequence[float] | np.ndarray, censorship: Sequence[int] | np.ndarray,
                  n_bins: int = 4, fit_mask: Sequence[bool] | np.ndarray | None = None,
                  name: str = "survival_bins") -> tuple[np.ndarray, np.ndarray]:
    """Discretise survival times into ``n_bins`` bins at quantiles of the uncensored times.

    ``times``: (M,) survival times (months). ``censorship``: (M,) 1 = censored, 0 = event.
    ``fit_mask``: (M,) bool, the rows (the training set) whose uncensored times set the edges;
    default all rows. As in Patch-GCN / MCAT the inner edges are the (k / n_bins) quantiles
    (linear interpolation, as ``pandas.qcut``) of those times; the outer edges are then set to 0
    and +inf so that every time, of any split, falls in a bin.

    Bins are left-closed, ``[edges[k], edges[k+1])``, as ``pandas.cut(right=False)`` in those codes.
    Returns ``edges`` (n_bins + 1,) float64 and ``bins`` (M,) int64 in [0, n_bins - 1].
    Raises :class:`LabelError` with fewer than ``n_bins`` uncensored fitting times, or when ties
    make two edges equal (then use fewer bins).
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    c = np.asarray(censorship).reshape(-1)
    if c.shape != t.shape:
        raise LabelError(f"{name}: times and censorship lengths differ ({t.size} vs {c.size})")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise LabelError(f"{name}: n_bins must be a positive int, got {n_bins!r}")
    if np.isnan(t).any() or (t < 0).any():
        raise LabelError(f"{name}: survival times must be non-negative numbers")
    if not np.isin(c, (0, 1)).all():
        raise LabelError(f"{name}: censorship must be 0 or 1")
    mask = np.ones(t.size, dtype=bool) if fit_mask is None else np.asarray(fit_mask, dtype=bool).reshape(-1)
    if mask.shape != t.shape:
        raise LabelError(f"{name}: fit_mask has {mask.size} entries for {t.size} times")
    fit = t[mask & (c == 0)]
    if fit.size < n_bins:
        raise LabelError(f"{name}: {fit.size} uncensored time(s) to fit {n_bins} bins; need at least "
                         f"{n_bins} (use fewer bins, or more training patients)")
    edges = np.quantile(fit, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, np.inf
    if not (np.diff(edges) > 0).all():
        raise LabelError(f"{name}: tied survival times give equal bin edges {edges.tolist()}; "
                         f"use fewer than {n_bins} bins")
    return edges, _assign_bins(t, edges)
