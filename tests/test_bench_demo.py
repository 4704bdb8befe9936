"""``mamba2d demo`` end to end on a tiny benchmark (fake encoder), and the study's variant list."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from bench_cases import TINY, FakeEncoder
from PIL import Image

from mamba2d.bench.demo import (
    DEMO_VARIANTS,
    STUDY_SURVIVAL_VARIANTS,
    STUDY_VARIANTS,
    DemoSettings,
    lesion_attention_summary,
    run_demo,
    variant_slug,
)
from mamba2d.mil import MODELS

TINY_FIELDS = {k: getattr(TINY, k) for k in ("n_train", "n_val", "n_test", "grid_min", "grid_max",
                                              "lesion_min", "lesion_max", "pool_per_class")}


def _settings(**kw) -> DemoSettings:
    variants = {"2dmambamil conv2d": DEMO_VARIANTS["2dmambamil conv2d"], "abmil": DEMO_VARIANTS["abmil"]}
    return DemoSettings(variants=variants, epochs=2, benchmark_overrides=TINY_FIELDS, n_heatmaps=2, **kw)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    summary = run_demo(root / "out", _settings(tasks=("classification", "survival")),
                       benchmark_dir=root / "bench", device="cpu", progress=False, encoder=FakeEncoder(),
                       log=lines.append)
    return root, summary, "\n".join(lines)


def test_demo_prints_and_writes_the_comparison(demo_run):
    root, summary, printed = demo_run
    report = root / "out" / "report"
    table = pd.read_csv(report / "comparison.csv")
    assert list(table["model"]) == ["2dmambamil conv2d", "abmil"]
    for col in ("auc_mean", "accuracy_mean", "macro_f1_mean"):
        assert table[col].between(0, 1).all()
    assert "| 2dmambamil conv2d |" in printed and "| model | AUC | accuracy | macro-F1 |" in printed
    surv = pd.read_csv(report / "comparison_survival.csv")
    assert surv["c_index_mean"].between(0, 1).all()
    saved = json.loads((report / "metrics.json").read_text())
    assert set(saved["tasks"]) == {"classification", "survival"}
    assert set(saved["tasks"]["classification"]) == {"2dmambamil conv2d", "abmil"}
    assert saved["timings"]["total_s"] > 0 and saved["settings"]["epochs"] == 2


def test_demo_roc_and_heatmaps_are_real_images(demo_run):
    root, summary, _ = demo_run
    report = root / "out" / "report"
    with Image.open(report / "roc.png") as im:
        assert im.size[0] > 200 and np.asarray(im.convert("L")).std() > 5
    assert len(summary["heatmaps"]) == 2
    for h in summary["heatmaps"]:
        assert 0 <= h["lesion_share_of_attention"] <= 1 and 0 < h["lesion_share_of_tiles"] < 1
        with Image.open(h["png"]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        # A mosaic with a colour overlay: many distinct colours, not a blank canvas.
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    ratio = lesion_attention_summary(summary["heatmaps"])
    assert np.isfinite(ratio) and ratio >= 0


def test_demo_rerun_reuses_finished_runs(demo_run):
    root, summary, _ = demo_run
    run_dir = root / "out" / "runs" / "classification-2dmambamil_conv2d"
    ckpt = next(run_dir.glob("fold*_seed*/best.pt"))
    before = ckpt.stat().st_mtime_ns
    again = run_demo(root / "out", _settings(), benchmark_dir=root / "bench", device="cpu",
                     progress=False, encoder=FakeEncoder(), log=lambda *_: None)
    assert ckpt.stat().st_mtime_ns == before
    first = summary["tasks"]["classification"]["abmil"]["test_summary"]["auc"]["mean"]
    assert again["tasks"]["classification"]["abmil"]["test_summary"]["auc"]["mean"] == pytest.approx(first)


def test_study_covers_every_registered_model():
    assert {model for model, _ in STUDY_VARIANTS.values()} == set(MODELS)
    assert set(STUDY_SURVIVAL_VARIANTS) <= set(STUDY_VARIANTS)
    full = DemoSettings.full()
    assert full.seeds == (0, 1, 2, 3, 4) and full.epochs == 20
    assert full.tasks == ("classification", "survival")
    assert set(full.jobs("classification")) == set(STUDY_VARIANTS)
    assert set(full.jobs("survival")) == set(STUDY_SURVIVAL_VARIANTS)
    slugs = [variant_slug(n) for n in STUDY_VARIANTS]
    assert len(set(slugs)) == len(slugs) and all(s.replace("_", "").isalnum() for s in slugs)


def test_demo_trains_each_model_at_its_default_recipe(demo_run):
    from mamba2d.mil.recipes import recipe_for
    from mamba2d.train.config import TrainConfig

    root, _, _ = demo_run
    cfg = TrainConfig.load(root / "out" / "runs" / "classification-2dmambamil_conv2d" / "config.yaml")
    default = recipe_for("2dmambamil")
    assert cfg.lr == default.lr and cfg.model_args["conv"] == default.model_args["conv"] == "2d"
    assert TrainConfig.load(root / "out" / "runs" / "classification-abmil" / "config.yaml").lr == \
        recipe_for("abmil").lr


def test_study_rows_name_their_convolution_whatever_the_recipe():
    from mamba2d.bench.demo import STUDY_VARIANTS

    for name, (model, args) in STUDY_VARIANTS.items():
        if model == "2dmambamil":
            assert args["conv"] == ("1d" if "conv1d" in name else "2d"), name
