"""Label tables: the official CSVs, column detection, bad input, survival bins."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mamba2d.data.labels import LabelError, LabelTable, read_labels, survival_bins

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-splits"


@pytest.fixture(scope="module")
def official() -> Path:
    if not OFFICIAL.is_dir():
        pytest.skip(f"official split files not found at {OFFICIAL}")
    return OFFICIAL


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# Official files


@pytest.mark.parametrize("name, n_rows, classes, slide0, has_split", [
    ("BRACS.csv", 547, ["AT", "BT", "MT"], "BRACS_743", True),
    ("DHMC.csv", 563, ["Benign", "Chromophobe", "Clearcell", "Oncocytoma", "Papillary"], "DHMC_0001", True),
    ("PANDA.csv", 10616, ["0", "1", "2", "3", "4", "5"], "0005f7aaab2800f6170c399693a96917", False),
    ("TCGA-NSCLC-label.csv.zip", 958, ["LUAD", "LUSC"],
     "TCGA-05-4250-01Z-00-DX1.90f67fdf-dff9-46ca-af71-0978d7c221ba", False),
])
def test_official_classification(official: Path, name: str, n_rows: int, classes: list[str], slide0: str,
                                 has_split: bool) -> None:
    table = read_labels(official / "classification" / name, "classification")
    frame = table.frame
    assert table.task == "classification" and len(table) == n_rows and table.class_names == classes
    assert frame["slide_id"].iloc[0] == slide0 and frame["slide_id"].is_unique
    assert frame["label"].dtype == np.int64 and sorted(frame["label"].unique()) == list(range(len(classes)))
    assert (frame["label_name"] == [classes[i] for i in frame["label"]]).all()
    assert ("split" in frame.columns) == has_split
    assert not frame.isna().any().any()
    if has_split:
        assert set(frame["split"]) == {"train", "val", "test"}


def test_official_nsclc_zip_and_cases(official: Path) -> None:
    # The zip's only member is named '../tcga_lung_subset.csv.zip' but is a plain CSV.
    table = read_labels(official / "classification" / "TCGA-NSCLC-label.csv.zip", "classification")
    assert table.frame["case_id"].nunique() == 862
    assert (table.frame["case_id"] == table.frame["slide_id"].str[:12]).all()
    assert table.frame["label_name"].value_counts().to_dict() == {"LUAD": 492, "LUSC": 466}


def test_official_brca(official: Path) -> None:
    path = official / "classification" / "TCGA-BRCA-label.csv"
    every = read_labels(path, "classification")  # oncotree_code, every code present (incl. '-')
    assert len(every) == 1099 and len(every.class_names) == 12 and "-" in every.class_names
    # 162 rows lack a case_id: the TCGA barcode stands in, so a patient's slides stay together.
    assert (every.frame["case_id"] == every.frame["slide_id"].str[:12]).all()
    assert every.frame["case_id"].nunique() == 1034
    with pytest.raises(LabelError, match=r"TCGA-BRCA-label\.csv: column 'oncotree_code' has labels outside "
                                         r"the classes \['IDC', 'ILC'\] \(--classes\): .*'MDLC': 25"
                                         r".*--skip-bad"):
        read_labels(path, "classification", class_order=["IDC", "ILC"])
    with pytest.warns(UserWarning, match=r"dropping 66 slide\(s\)"):
        subtyping = read_labels(path, "classification", class_order=["IDC", "ILC"], drop_other=True)
    assert len(subtyping) == 1033 and subtyping.class_names == ["IDC", "ILC"]
    assert subtyping.frame["label"].value_counts().to_dict() == {0: 822, 1: 211}
    # The same file as a survival table: 162 rows have no time.
    with pytest.raises(LabelError, match=r"column 'survival_months' has no survival time for slide\(s\) "
                                         r"\['TCGA-A8-A08R.* and 157 more"):
        read_labels(path, "survival")


@pytest.mark.parametrize("name, n_rows, n_cases", [
    ("KIRC", 498, 498), ("KIRP", 261, 261), ("LUAD", 455, 455), ("STAD", 363, 363), ("UCEC", 539, 480),
])
def test_official_survival(official: Path, name: str, n_rows: int, n_cases: int) -> None:
    table = read_labels(official / "survival" / f"{name}.csv", "survival")
    frame = table.frame
    assert table.task == "survival" and table.class_names == []
    assert list(frame.columns) == ["slide_id", "case_id", "survival_months", "censorship"]
    assert len(frame) == n_rows and frame["case_id"].nunique() == n_cases
    assert frame["censorship"].dtype == np.int64 and set(frame["censorship"]) == {0, 1}
    assert frame["survival_months"].dtype == np.float64 and (frame["survival_months"] > 0).all()
    raw = pd.read_csv(official / "survival" / f"{name}.csv")
    np.testing.assert_array_equal(frame["survival_months"], raw["survival_months"])
    np.testing.assert_array_equal(frame["censorship"], raw["censorship"])


# --------------------------------------------------------------------------------------------------
# Column detection and conversions


def test_aliases_and_index_column(tmp_path: Path) -> None:
    path = _csv(tmp_path, ",image_id,patient_id,class,Data Split\n0,a.svs,p1,2,TRAIN\n1,b.ndpi,p1,10,val\n"
                          "2,c,p2,2,Test\n")
    table = read_labels(path, "classification")
    assert list(table.frame.columns) == ["slide_id", "case_id", "label", "label_name", "split"]
    assert table.frame["slide_id"].tolist() == ["a", "b", "c"]
    assert table.frame["case_id"].tolist() == ["p1", "p1", "p2"]
    assert table.class_names == ["2", "10"]  # numeric order, not text order
    assert table.frame["split"].tolist() == ["train", "val", "test"]


def test_explicit_columns_label_map_and_order(tmp_path: Path) -> None:
    path = _csv(tmp_path, "wsi,grade,label\ns1,low,x\ns2,high,x\ns3,mid,x\n")
    table = read_labels(path, "classification", slide_col="wsi", label_col="grade",
                        label_map={"mid": "high"}, class_order=["low", "high"])
    assert table.frame["label"].tolist() == [0, 1, 1]
    assert table.frame["label_name"].tolist() == ["low", "high", "high"]
    assert table.frame["case_id"].tolist() == ["s1", "s2", "s3"]  # no case column: each slide its own case
    mapping = table.to_json_dict()
    assert json.loads(json.dumps(mapping))["label_to_index"] == {"low": 0, "high": 1}


def test_whole_number_labels_as_floats(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,isup_grade\na,1.0\nb,0\nc,1\n")
    assert read_labels(path, "classification").class_names == ["0", "1"]


def test_survival_days_and_event(tmp_path: Path) -> None:
    path = _csv(tmp_path, "slide_id,case_id,survival_days,event\na,A,30.4375,1\nb,B,365.25,0\n")
    table = read_labels(path, "survival")
    np.testing.assert_allclose(table.frame["survival_months"], [1.0, 12.0])
    assert table.frame["censorship"].tolist() == [0, 1]  # censorship = 1 - event
    path = _csv(tmp_path, "slide_id,time,censored\na,3,True\nb,4,false\n", "bool.csv")
    assert read_labels(path, "survival").frame["censorship"].tolist() == [1, 0]


def test_duplicates(tmp_path: Path) -> None:
    same = _csv(tmp_path, "slide_id,label\na.svs,x\na,x\nb,y\n")
    assert read_labels(same, "classification").frame["slide_id"].tolist() == ["a", "b"]
    clash = _csv(tmp_path, "slide_id,label\na.svs,x\na,y\nb,y\n", "clash.csv")
    with pytest.raises(LabelError, match=r"clash\.csv: slide\(s\) listed more than once with different "
                                         r"label/case_id: \['a'\]"):
        read_labels(clash, "classification")


def test_nested_zip(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("labels.csv", "slide_id,label\na,x\nb,y\n")
    outer = tmp_path / "labels.csv.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.writestr("../inner.zip", inner.getvalue())
    table = read_labels(outer, "classification")
    assert table.frame["slide_id"].tolist() == ["a", "b"] and table.class_names == ["x", "y"]


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("text, task, message", [
    ("name,label\na,x\n", "classification",
     r"bad\.csv: no slide column; tried \['slide_id', 'image_id', 'File Name', 'slide'\], columns found: "
     r"\['name', 'label'\]"),
    ("slide_id,kind\na,x\n", "classification", r"bad\.csv: no label column; tried \['label', .*'kind'\]"),
    ("slide_id,label\na,x\nb,\nc,\n", "classification",
     r"bad\.csv: column 'label' has no label for slide\(s\) \['b', 'c'\]"),
    ("slide_id,label\na,x\n,y\n", "classification",
     r"bad\.csv: column 'slide_id' has empty slide ids \(rows \[1\]\)"),
    ("slide_id,survival_months,censorship\na,3,0\nb,,1\n", "survival",
     r"bad\.csv: column 'survival_months' has no survival time for slide\(s\) \['b'\]"),
    ("slide_id,survival_months,censorship\na,3,0\nb,-1,1\n", "survival",
     r"bad\.csv: column 'survival_months' has negative survival times for slide\(s\) \['b'\]"),
    ("slide_id,survival_months,censorship\na,3,0\nb,soon,1\n", "survival",
     r"bad\.csv: column 'survival_months' has non-numeric times for slide\(s\) \['b'\]"),
    ("slide_id,survival_months,censorship\na,3,0\nb,4,2\n", "survival",
     r"bad\.csv: column 'censorship' must be 0 or 1, got \['2'\] for slide\(s\) \['b'\]"),
    ("slide_id,survival_months,censorship\na,3,0\nb,4,\n", "survival",
     r"bad\.csv: column 'censorship' has no value for slide\(s\) \['b'\]"),
    ("slide_id,survival_months\na,3\n", "survival", r"bad\.csv: no censorship column; tried"),
    ("slide_id,label,split\na,x,train\nb,y,holdout\n", "classification",
     r"bad\.csv: column 'split' holds \['holdout'\], expected train/val/test"),
    ("slide_id,label\n", "classification", r"bad\.csv: no rows"),
])
def test_bad_tables(tmp_path: Path, text: str, task: str, message: str) -> None:
    path = _csv(tmp_path, text, "bad.csv")
    with pytest.raises(LabelError, match=message):
        read_labels(path, task)  # type: ignore[arg-type]


def test_bad_files_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=r"missing\.csv: label file does not exist"):
        read_labels(tmp_path / "missing.csv", "classification")
    path = _csv(tmp_path, "slide_id,label\na,x\n")
    with pytest.raises(LabelError, match=r"labels\.csv: no label column 'grade'; "
                                         r"columns found: \['slide_id', 'label'\]"):
        read_labels(path, "classification", label_col="grade")
    with pytest.raises(LabelError, match="task must be"):
        read_labels(path, "regression")  # type: ignore[arg-type]
    with pytest.raises(LabelError, match="class_order repeats"):
        read_labels(path, "classification", class_order=["x", "x"])
    bad_zip = tmp_path / "bad.csv.zip"
    bad_zip.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(LabelError, match=r"bad\.csv\.zip: not a readable zip file"):
        read_labels(bad_zip, "classification")
    two = tmp_path / "two.csv.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("a.csv", "slide_id,label\n")
        zf.writestr("b.csv", "slide_id,label\n")
    with pytest.raises(LabelError, match=r"two\.csv\.zip: a label zip must hold exactly one file"):
        read_labels(two, "classification")


# --------------------------------------------------------------------------------------------------
# Survival bins


def test_survival_bins_known_quantiles() -> None:
    # Uncensored times 1..5 have quartiles 1, 2, 3, 4, 5; the outer edges become 0 and +inf.
    times = np.array([1, 2, 3, 4, 5, 0.5, 2.0, 4.5, 100.0])
    cens = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    edges, bins = survival_bins(times, cens, n_bins=4)
    np.testing.assert_allclose(edges, [0, 2, 3, 4, np.inf])
    # Left-closed: 2.0 starts bin 1; times outside the fitted range go to the outer bins.
    assert bins.tolist() == [0, 1, 2, 3, 3, 0, 1, 3, 3]
    assert bins.dtype == np.int64
    # Same inner edges as pandas.qcut on the uncensored times (as Patch-GCN / MCAT compute them).
    _, qedges = pd.qcut(pd.Series([1.0, 2, 3, 4, 5]), q=4, retbins=True)
    np.testing.assert_allclose(edges[1:-1], qedges[1:-1])


def test_survival_bins_fit_on_training_rows() -> None:
    times = np.array([1, 2, 3, 4, 5, 50, 60, 70, 80, 90], dtype=float)
    cens = np.zeros(10, dtype=int)
    train = np.arange(10) < 5
    edges, bins = survival_bins(times, cens, n_bins=4, fit_mask=train)
    np.testing.assert_allclose(edges, [0, 2, 3, 4, np.inf])  # the held-out times don't move the edges
    assert bins.tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3]
    with pytest.raises(LabelError, match=r"2 uncensored time\(s\) to fit 4 bins"):
        survival_bins(times, np.r_[1, 1, 1, 0, 0, np.zeros(5, int)], n_bins=4, fit_mask=train)
    with pytest.raises(LabelError, match="tied survival times"):
        survival_bins(np.ones(8), np.zeros(8, int), n_bins=4)
    with pytest.raises(LabelError, match="censorship must be 0 or 1"):
        survival_bins(times, np.full(10, 2))
    with pytest.raises(LabelError, match="fit_mask has 3 entries"):
        survival_bins(times, cens, fit_mask=[True, False, True])


def test_with_bins_and_case_level_edges(tmp_path: Path) -> None:
    rows = ["slide_id,case_id,survival_months,censorship"]
    # Case c0 has three slides: counted once when the edges are fitted per case.
    rows += [f"c0_s{i},c0,1.0,0" for i in range(3)]
    rows += [f"c{i}_s0,c{i},{float(i + 1)},0" for i in range(1, 9)]
    table = read_labels(_csv(tmp_path, "\n".join(rows) + "\n"), "survival")
    edges = table.bin_edges_from(n_bins=2)
    np.testing.assert_allclose(edges, [0, 5.0, np.inf])  # median of 1..9; per slide it would be 4
    binned = table.with_bins(edges)
    assert "bin" not in table.frame.columns and binned.n_classes == 2
    assert binned.frame["bin"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    saved = json.loads(json.dumps(binned.to_json_dict()))
    assert saved["bin_edges"][-1] == "inf" and float(saved["bin_edges"][-1]) == np.inf
    train_only = table.bin_edges_from(n_bins=2, rows=np.arange(3, 11))
    np.testing.assert_allclose(train_only, [0, 5.5, np.inf])
    classification = LabelTable("classification", table.frame, ["a"], table.source)
    with pytest.raises(LabelError, match="need a survival table"):
        classification.with_bins(edges)
    with pytest.raises(LabelError, match="increasing"):
        table.with_bins([0, 5, 5, np.inf])
