"""Splits: official split files against their label files, k-fold, round trips, and every check."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from mamba2d.data.labels import LabelTable, read_labels
from mamba2d.data.splits import (
    Split,
    SplitError,
    kfold_splits,
    read_split_csv,
    read_split_dir,
    resolve_split,
    split_from_column,
    splits_from_labels,
    write_split_csv,
)

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-splits"


@pytest.fixture(scope="module")
def official() -> Path:
    if not OFFICIAL.is_dir():
        pytest.skip(f"official split files not found at {OFFICIAL}")
    return OFFICIAL


def _labels(tmp_path: Path, rows: list[str], name: str = "labels.csv") -> LabelTable:
    header = "slide_id,case_id,label"
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return read_labels(path, "classification")


def _toy(tmp_path: Path) -> LabelTable:
    """Cases A..D, two slides each for A and B; classes x and y."""
    return _labels(tmp_path, ["a1,A,x", "a2,A,x", "b1,B,y", "b2,B,y", "c1,C,x", "d1,D,y"])


# --------------------------------------------------------------------------------------------------
# Official files


def test_official_brca_split(official: Path) -> None:
    split = read_split_csv(official / "classification" / "TCGA-BRCA-split.csv")
    assert (len(split.train), len(split.val), len(split.test)) == (845, 98, 98)
    assert split.name == "TCGA-BRCA-split"
    assert split.train[0] == "TCGA-A7-A6VV-01Z-00-DX1.07AE0E16-A883-4C86-BC74-4E13081175F2"
    with pytest.warns(UserWarning, match="dropping 66"):
        table = read_labels(official / "classification" / "TCGA-BRCA-label.csv", "classification",
                            class_order=["IDC", "ILC"], drop_other=True)
    # 4 split slides are not in the label file and 4 more are labelled '-': 8 unknown.
    with pytest.raises(SplitError, match=r"split 'TCGA-BRCA-split' \(.*TCGA-BRCA-split\.csv\): 8 id\(s\) "
                                         r"match no labelled slide or case in .*TCGA-BRCA-label\.csv: "
                                         r".* and 3 more"):
        resolve_split(split, table)
    # The published split also puts slides of one patient in different parts.
    leak = r"leakage between parts: 9 case\(s\) with slides in both train and val"
    with pytest.warns(UserWarning, match="8 id"), pytest.raises(SplitError, match=leak):
        resolve_split(split, table, unknown="drop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = resolve_split(split, table, unknown="drop", leakage="warn")
    assert len(caught) == 2
    assert {p: len(r) for p, r in rows.items()} == {"train": 841, "val": 96, "test": 96}


def test_official_nsclc_split(official: Path) -> None:
    table = read_labels(official / "classification" / "TCGA-NSCLC-label.csv.zip", "classification")
    split = read_split_csv(official / "classification" / "TCGA-NSCLC-split.csv")
    assert (len(split.train), len(split.val), len(split.test)) == (847, 93, 93)
    with pytest.raises(SplitError, match=r"75 id\(s\) match no labelled slide"):
        resolve_split(split, table)


@pytest.mark.parametrize("name, file, sizes", [
    ("BRACS", "BRACS.csv", (395, 65, 87)), ("DHMC", "DHMC.csv", (391, 23, 149)),
])
def test_official_split_columns(official: Path, name: str, file: str, sizes: tuple[int, int, int]) -> None:
    table = read_labels(official / "classification" / file, "classification")
    split = splits_from_labels(table)
    assert split is not None and (len(split.train), len(split.val), len(split.test)) == sizes
    rows = resolve_split(split, table)
    assert tuple(len(rows[p]) for p in ("train", "val", "test")) == sizes
    assert sorted(rows["train"] + rows["val"] + rows["test"]) == list(range(len(table)))


def test_panda_has_no_split(official: Path) -> None:
    table = read_labels(official / "classification" / "PANDA.csv", "classification")
    assert splits_from_labels(table) is None


@pytest.mark.parametrize("cohort", ["KIRC", "KIRP", "LUAD", "STAD"])
def test_official_survival_kfold(official: Path, cohort: str) -> None:
    table = read_labels(official / "survival" / f"{cohort}.csv", "survival")
    splits = read_split_dir(official / "survival" / f"TCGA_{cohort}_survival_kfold")
    assert [s.name for s in splits] == [f"splits_{k}" for k in range(5)]
    vals: list[int] = []
    for split in splits:
        assert split.test == ()  # the kfold files leave test empty: validation is the held-out fold
        rows = resolve_split(split, table)  # case ids, expanded to slides
        assert len(rows["train"]) + len(rows["val"]) == len(table)
        assert not set(rows["train"]) & set(rows["val"])
        vals += rows["val"]
    assert sorted(vals) == list(range(len(table)))  # the validation folds partition the cohort


def test_official_ucec_kfold_leaks(official: Path) -> None:
    table = read_labels(official / "survival" / "UCEC.csv", "survival")
    split = read_split_dir(official / "survival" / "TCGA_UCEC_survival_kfold")[0]
    # The file lists a case once per slide (repeats collapse) and puts 15 cases in both parts.
    assert (len(split.train), len(split.val)) == (388, 107)
    with pytest.raises(SplitError, match=r"splits_0.*leakage between parts: .*15 case\(s\) with slides "
                                         r"in both train and val"):
        resolve_split(split, table)
    with pytest.warns(UserWarning, match="leakage"):
        rows = resolve_split(split, table, leakage="warn")
    assert len(set(rows["train"]) | set(rows["val"])) == len(table)


# --------------------------------------------------------------------------------------------------
# Reading and writing


def test_read_split_csv_padding_and_normalising(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(",Train,Val,Test\n0,a.svs,0012,\n1,b,,\n2,a,,\n")
    split = read_split_csv(path)
    assert split == Split(("a", "b"), ("0012",), (), name="s", source=path)


def test_write_round_trip(tmp_path: Path) -> None:
    split = Split(("TCGA-A1-0001-01Z-00-DX1.ABC", "x", "y"), ("v",), (), name="fold0")
    path = tmp_path / "splits_0.csv"
    path.write_text("stale")
    write_split_csv(split, path)
    back = read_split_csv(path)
    assert (back.train, back.val, back.test) == (split.train, split.val, split.test)
    assert path.read_text().splitlines()[0] == ",train,val,test"
    assert [p.name for p in tmp_path.iterdir()] == ["splits_0.csv"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError):
        write_split_csv(split, tmp_path / "no_dir" / "s.csv")


def test_read_split_dir_numeric_order(tmp_path: Path) -> None:
    for k in (10, 2, 0, 1):
        write_split_csv(Split((f"t{k}",), (), (), name=""), tmp_path / f"splits_{k}.csv")
    (tmp_path / "splits_x.csv").write_text(",train,val,test\n")
    assert [s.train for s in read_split_dir(tmp_path)] == [("t0",), ("t1",), ("t2",), ("t10",)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SplitError, match=r"empty: no splits_<k>\.csv files"):
        read_split_dir(empty)
    with pytest.raises(SplitError, match="split folder does not exist"):
        read_split_dir(tmp_path / "nowhere")


def test_read_split_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match=r"none\.csv: split file does not exist"):
        read_split_csv(tmp_path / "none.csv")
    path = tmp_path / "cols.csv"
    path.write_text(",train,valid\n0,a,b\n")
    with pytest.raises(SplitError, match=r"cols\.csv: split file lacks column\(s\) \['val', 'test'\]"):
        read_split_csv(path)


def test_split_from_column(tmp_path: Path) -> None:
    table = _toy(tmp_path)
    split = split_from_column(table, ["Train", "train", "VALIDATION", "test", "training", "Test"], name="col")
    assert split.train == ("a1", "a2", "c1") and split.val == ("b1",) and split.test == ("b2", "d1")
    with pytest.raises(SplitError, match=r"split values \['holdout'\]"):
        split_from_column(table, ["train"] * 5 + ["holdout"])
    with pytest.raises(SplitError, match="2 split values for 6 slides"):
        split_from_column(table, ["train", "val"])
    assert splits_from_labels(table) is None


# --------------------------------------------------------------------------------------------------
# resolve_split


def test_resolve_slide_and_case_ids(tmp_path: Path) -> None:
    table = _toy(tmp_path)
    # 'A' is a case (both its slides); 'd1.svs' is a slide; 'B' a case.
    rows = resolve_split(Split(("A", "d1.svs"), ("B",), ("c1",), name="mix"), table)
    assert rows == {"train": [0, 1, 5], "val": [2, 3], "test": [4]}


def test_resolve_errors(tmp_path: Path) -> None:
    table = _toy(tmp_path)
    ghosts = tuple(f"ghost{i}" for i in range(7))
    with pytest.raises(SplitError, match=r"split 'g': 7 id\(s\) match no labelled slide or case in "
                                         r".*labels\.csv: \['ghost0', .*'ghost4'\] and 2 more"):
        resolve_split(Split(("A", "B", *ghosts), (), (), name="g"), table)
    with pytest.warns(UserWarning, match="7 id"):
        rows = resolve_split(Split(("A", "B", *ghosts), (), (), name="g"), table, unknown="drop")
    assert rows["train"] == [0, 1, 2, 3]
    with pytest.raises(SplitError, match=r"split 'o': leakage between parts: 1 slide\(s\) in both train "
                                         r"and test: \['c1'\]"):
        resolve_split(Split(("A", "B", "c1"), (), ("c1", "d1"), name="o"), table)
    with pytest.raises(SplitError, match=r"leakage between parts: 1 case\(s\) with slides in both train "
                                         r"and val: \['A'\]"):
        resolve_split(Split(("a1", "B"), ("a2",), (), name="case"), table)
    with pytest.raises(SplitError, match="the training part is empty"):
        resolve_split(Split((), ("A",), ("B",), name="e"), table)
    with pytest.raises(SplitError, match=r"the training part has only class\(es\) \['x'\]"):
        resolve_split(Split(("A", "C"), ("B",), (), name="one"), table)
    with pytest.raises(SplitError, match="unknown must be"):
        resolve_split(Split(("A",), (), (), name=""), table, unknown="ignore")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# kfold_splits


def _cohort(tmp_path: Path, n_cases: int = 60) -> LabelTable:
    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_cases):
        label = "pos" if c % 3 == 0 else "neg"  # 1/3 positive
        rows += [f"case{c:03d}_s{s},case{c:03d},{label}" for s in range(1 + int(rng.integers(0, 3)))]
    return _labels(tmp_path, rows, name="cohort.csv")


def test_kfold_case_level_and_stratified(tmp_path: Path) -> None:
    table = _cohort(tmp_path)
    case_of = dict(zip(table.frame["slide_id"], table.frame["case_id"], strict=True))
    label_of = dict(zip(table.frame["case_id"], table.frame["label"], strict=True))
    folds = kfold_splits(table, k=5, seed=3, val_fraction=0.2)
    assert len(folds) == 5
    test_cases: list[str] = []
    for split in folds:
        parts = {p: {case_of[s] for s in split.part(p)} for p in ("train", "val", "test")}
        assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
        assert not parts["val"] & parts["test"]
        assert set().union(*parts.values()) == set(label_of)  # every case used once per fold
        n_slides = sum(len(split.part(p)) for p in ("train", "val", "test"))
        assert n_slides == len(table)  # all slides of a case follow it
        assert len(parts["test"]) == 12 and len(parts["val"]) == round(0.2 * 48)
        assert sum(label_of[c] for c in parts["test"]) == 4  # 1/3 of 12 in the positive class
        test_cases += sorted(parts["test"])
        resolve_split(split, table)  # no leakage, both classes in training
    assert sorted(test_cases) == sorted(label_of)  # the test folds partition the cases
    assert kfold_splits(table, k=5, seed=3, val_fraction=0.2) == folds  # deterministic in the seed
    assert kfold_splits(table, k=5, seed=4, val_fraction=0.2) != folds
    assert all(s.val == () for s in kfold_splits(table, k=3, seed=0, val_fraction=0.0))


def test_kfold_survival(official: Path) -> None:
    table = read_labels(official / "survival" / "KIRC.csv", "survival")
    folds = kfold_splits(table, k=5, seed=0)
    binned = table.with_bins(table.bin_edges_from(4))
    folds_binned = kfold_splits(binned, k=5, seed=0)
    assert folds_binned != folds  # bins join censorship in the strata
    cens = dict(zip(table.frame["slide_id"], table.frame["censorship"], strict=True))
    rate = np.mean(list(cens.values()))
    for split in folds_binned:
        rows = resolve_split(split, binned)
        assert len(rows["test"]) in (99, 100) and len(rows["val"]) == 40
        assert abs(np.mean([cens[s] for s in split.test]) - rate) < 0.02


def test_kfold_errors(tmp_path: Path) -> None:
    table = _toy(tmp_path)
    with pytest.raises(SplitError, match="k must be an int >= 2"):
        kfold_splits(table, k=1)
    with pytest.raises(SplitError, match=r"4 case\(s\) cannot fill 5 folds"):
        kfold_splits(table, k=5)
    with pytest.raises(SplitError, match="val_fraction"):
        kfold_splits(table, k=2, val_fraction=1.0)
