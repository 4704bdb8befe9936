"""Evaluation figures: each writes a real, non-blank PNG atomically and leaves pyplot alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.metrics import roc_auc_score

from mamba2d.train.metrics import classification_metrics
from mamba2d.train.plots import (
    macro_roc,
    save_confusion_matrix,
    save_km_by_risk,
    save_roc_comparison,
    save_roc_curves,
    save_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path, directory: Path) -> None:
    """``path`` is a decodable, non-uniform PNG and the only thing written into ``directory``."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)  # (H, W, 3 or 4) floats in [0, 1]
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # Count distinct 8-bit colours through a void view: far cheaper than np.unique(axis=0).
    pixels = np.ascontiguousarray((image * 255).round().astype(np.uint8).reshape(-1, image.shape[-1]))
    colours = np.unique(pixels.view(np.dtype((np.void, pixels.shape[-1]))))
    assert len(colours) > 10, "image is (nearly) blank"
    assert [p.name for p in directory.iterdir()] == [path.name], "temporary files left behind"


def _classification(n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=120)
    logits = rng.normal(size=(120, n_classes)) + 1.5 * np.eye(n_classes)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def _survival(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = np.round(rng.exponential(24.0 * np.exp(-0.8 * risk)), 1) + 0.1  # months
    event = rng.random(n) < 0.7
    return time, event, risk


@pytest.mark.parametrize("n_classes", [2, 4])
def test_roc_curves(tmp_path: Path, n_classes: int) -> None:
    y, probs = _classification(n_classes)
    out = save_roc_curves(y, probs, [f"class {i}" for i in range(n_classes)], tmp_path / "roc.png")
    assert out == tmp_path / "roc.png"
    _assert_png(out, tmp_path)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_macro_roc_matches_sklearn_and_is_a_curve(n_classes: int) -> None:
    y, probs = _classification(n_classes, seed=n_classes)
    fpr, tpr, auc = macro_roc(y, probs)
    expected = (roc_auc_score(y, probs[:, 1]) if n_classes == 2
                else roc_auc_score(y, probs, average="macro", multi_class="ovr"))
    assert auc == pytest.approx(expected, rel=1e-12)
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == pytest.approx(1.0)
    assert (np.diff(tpr) >= -1e-12).all() and (tpr >= fpr - 0.5).all()
    # The area under the averaged, interpolated curve is close to the mean of the exact AUCs.
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc, abs=0.02)


def test_roc_comparison(tmp_path: Path) -> None:
    curves = {"model a": _classification(3, seed=1), "model b": _classification(3, seed=2)}
    _assert_png(save_roc_comparison(curves, tmp_path / "roc.png"), tmp_path)
    with pytest.raises(ValueError):
        save_roc_comparison({"bad": (np.array([0, 1]), np.ones((3, 2)) / 2)}, tmp_path / "bad.png")


def test_roc_curves_class_absent(tmp_path: Path) -> None:
    y, probs = _classification(3)
    y[y == 2] = 0
    _assert_png(save_roc_curves(y, probs, None, tmp_path / "roc.png"), tmp_path)


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix(tmp_path: Path, normalize: bool) -> None:
    y, probs = _classification(4)
    y[y == 3] = 0  # an empty row: shown as "-" when normalised
    cm = classification_metrics(y, probs)["confusion_matrix"]
    out = save_confusion_matrix(cm, ["a", "b", "c", "d"], tmp_path / "cm.png", normalize=normalize)
    _assert_png(out, tmp_path)


def test_confusion_matrix_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square"):
        save_confusion_matrix(np.ones((2, 3)), None, tmp_path / "cm.png")
    with pytest.raises(ValueError, match="class_names"):
        save_confusion_matrix(np.ones((2, 2)), ["a"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("n_groups", "show_at_risk"), [(2, True), (3, False), (3, True)])
def test_km_by_risk(tmp_path: Path, n_groups: int, show_at_risk: bool) -> None:
    time, event, risk = _survival()
    out = save_km_by_risk(time, event, risk, tmp_path / "km.png", n_groups=n_groups,
                          show_at_risk=show_at_risk)
    _assert_png(out, tmp_path)


def test_km_by_risk_single_group(tmp_path: Path) -> None:
    time, event, _ = _survival()
    # Constant risk: everyone lands in one group and no log-rank test is possible, yet it still draws.
    _assert_png(save_km_by_risk(time, event, np.zeros_like(time), tmp_path / "km.png"), tmp_path)


def test_training_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1) + 0.05, "val_auc": 0.6 + 0.03 * e,
         "lr": 1e-4 * 0.8**e, "val_n": 40}
        for e in range(10)
    ]
    history[4].pop("val_auc")  # a missing metric leaves a gap, not a crash
    history[5]["note"] = "checkpoint"  # non-numeric entries are ignored
    _assert_png(save_training_curves(history, tmp_path / "sub" / "curves.png"), tmp_path / "sub")
    with pytest.raises(ValueError, match="empty"):
        save_training_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no numeric"):
        save_training_curves([{"epoch": 0, "val_n": 3, "note": "x"}], tmp_path / "x.png")


def test_overwrite_and_failed_render_leave_no_temp_files(tmp_path: Path) -> None:
    y, probs = _classification(2)
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    save_roc_curves(y, probs, None, target)
    _assert_png(target, tmp_path)
    # An unknown format fails inside savefig; neither the target nor a temporary file appears.
    with pytest.raises(ValueError):
        save_roc_curves(y, probs, None, tmp_path / "roc.notaformat")
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_pyplot_is_not_imported(tmp_path: Path) -> None:
    # A fresh interpreter, since this test session may have imported pyplot through other packages.
    src = Path(__file__).resolve().parents[1] / "src"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(src)!r})
        import numpy as np
        from mamba2d.train import plots
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 50)
        probs = rng.random((50, 2))
        plots.save_roc_curves(y, probs, None, {str(tmp_path / "roc.png")!r})
        plots.save_km_by_risk(rng.random(50) + 0.1, y == 1, probs[:, 1], {str(tmp_path / "km.png")!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["km.png", "roc.png"]


def test_segmentation_examples_png_and_shape_errors(tmp_path):
    from mamba2d.train.plots import save_segmentation_examples

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (3, 32, 48))
    path = save_segmentation_examples(rng.random((3, 32, 48)), truth, np.roll(truth, 1, axis=2),
                                      ["background", "a", "b", "c"], tmp_path / "ex.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one shape"):
        save_segmentation_examples(rng.random((3, 32, 48)), truth[:2], truth, ["x"] * 4, tmp_path / "bad.png")
