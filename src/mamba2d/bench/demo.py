"""``mamba2d demo``: the whole product on the built-in spatial benchmark, in minutes on a CPU.

Builds (or reuses) the Fashion-MNIST mosaic benchmark, trains 2DMambaMIL, MambaMIL (1D) and ABMIL
through the same pipeline as ``mamba2d train``, prints a comparison table and writes a report:

    OUT/report/comparison.md, comparison.csv    mean ± std of the test metrics per model
    OUT/report/metrics.json                     the same, with every run's numbers and the settings
    OUT/report/roc.png                          macro one-vs-rest ROC of each model on the test slides
    OUT/report/heatmaps/<slide>.png             test mosaics with 2DMambaMIL's attention overlaid
    OUT/runs/<task>-<model>/                    each model's full run directory

``full=True`` runs the study: every registered model, classification and survival, five seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mamba2d.bench.config import BenchmarkConfig, default_benchmark_dir
from mamba2d.bench.dataset import build_benchmark
from mamba2d.bench.features import TileEncoder
from mamba2d.bench.render import lesion_cells, render_mosaic
from mamba2d.data.bags import read_bag
from mamba2d.io import load_checkpoint, write_json, write_text
from mamba2d.train import plots
from mamba2d.train.config import TrainConfig
from mamba2d.train.distributed import pick_device
from mamba2d.train.engine import rebuild_model, run_training
from mamba2d.train.evaluate import compare_runs
from mamba2d.wsi.heatmaps import save_overlay_png, score_grid, to_display
from mamba2d.wsi.slide_heatmap import find_model_dir

# A variant is a registered model with fixed arguments, under the name the tables show.
Variant = tuple[str, dict[str, Any]]

# The quick demo: every model at its default recipe (mamba2d.mil.recipes; 2DMambaMIL's default is
# the grid-respecting 3 x 3 convolution), except that MambaMIL runs at 2DMambaMIL's width (d_model
# 128 instead of the paper's 512), so the 1D-vs-2D comparison is between models of equal size and
# fits the CPU time budget, and that the quick demo trains 10 epochs.
DEMO_VARIANTS: dict[str, Variant] = {
    "2dmambamil conv2d": ("2dmambamil", {}),
    "mambamil d128": ("mambamil", {"d_model": 128}),
    "abmil": ("abmil", {}),
}

# The study (``--full``): every registered model at its published settings and one shared lr, and
# the 2DMambaMIL ablations, each of which changes one setting of "2dmambamil conv2d". The
# convolution is named in every 2DMambaMIL variant, so no recipe changes what a row measures.
STUDY_VARIANTS: dict[str, Variant] = {
    "2dmambamil conv2d": ("2dmambamil", {"conv": "2d"}),
    "2dmambamil conv1d (paper)": ("2dmambamil", {"conv": "1d"}),
    "2dmambamil conv2d, 1D scan": ("2dmambamil", {"conv": "2d", "scan": "raster"}),
    "2dmambamil conv1d, 1D scan": ("2dmambamil", {"conv": "1d", "scan": "raster"}),
    "2dmambamil conv2d, 4 directions": ("2dmambamil", {"conv": "2d", "directions": 4}),
    "2dmambamil conv2d, zero pad": ("2dmambamil", {"conv": "2d", "pad": "zeros"}),
    "2dmambamil conv2d, pools pads": ("2dmambamil", {"conv": "2d", "pool_pads": True}),
    **{name: (name, {}) for name in ("mambamil", "s4mil", "transmil", "abmil", "clam_sb", "dsmil", "dtfd",
                                      "meanmil", "maxmil")},
}
# Survival skips the ablations that only matter once the classification table shows they should.
STUDY_SURVIVAL_VARIANTS: tuple[str, ...] = tuple(
    n for n in STUDY_VARIANTS if n not in ("2dmambamil conv2d, 4 directions", "2dmambamil conv2d, zero pad",
                                           "2dmambamil conv2d, pools pads", "2dmambamil conv1d, 1D scan"))


def variant_slug(name: str) -> str:
    """A folder name for a variant: 'mambamil d128' -> 'mambamil_d128'."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


@dataclass
class DemoSettings:
    """What the demo runs. The defaults are the quick demo; :meth:`full` is the study."""

    variants: dict[str, Variant] = field(default_factory=lambda: dict(DEMO_VARIANTS))
    tasks: tuple[str, ...] = ("classification",)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 10
    lr: float | None = None  # None: each model's default lr (its recipe)
    preset: str = "demo"
    benchmark_overrides: dict[str, Any] = field(default_factory=dict)  # BenchmarkConfig fields
    survival_variants: tuple[str, ...] | None = None  # None: all of ``variants``
    heatmap_variant: str = "2dmambamil conv2d"
    n_heatmaps: int = 3

    @classmethod
    def full(cls) -> DemoSettings:
        return cls(variants=dict(STUDY_VARIANTS), tasks=("classification", "survival"), seeds=(0, 1, 2, 3, 4),
                   epochs=20, lr=5e-4, survival_variants=STUDY_SURVIVAL_VARIANTS)

    def jobs(self, task: str) -> dict[str, Variant]:
        """The variants trained for ``task``."""
        keep = self.survival_variants if task == "survival" and self.survival_variants is not None else None
        return {n: v for n, v in self.variants.items() if keep is None or n in keep}


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, fmnist_dir: str | None = None,
             benchmark_dir: str | Path | None = None, device: str = "auto", progress: bool = True,
             encoder: TileEncoder | None = None, log=print) -> dict[str, Any]:
    """Run the demo (see the module docstring) into ``out``; returns the report's metrics.

    ``benchmark_dir``: where the benchmark of each task is built or found (``DIR/<task>``; default
    a per-configuration cache folder). ``encoder``: the tile encoder (default EfficientNet-lite0).
    A second call with the same ``out`` reuses finished training runs and resumes unfinished ones.
    """
    settings = settings or DemoSettings()
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. The benchmark: built once, then reused from its folder.
    bench_cfg = BenchmarkConfig.preset(settings.preset, fmnist_dir=fmnist_dir, **settings.benchmark_overrides)
    runs: dict[str, list[tuple[str, Path]]] = {}
    for task in settings.tasks:
        cfg = BenchmarkConfig.preset(settings.preset, fmnist_dir=fmnist_dir, task=task,
                                     **settings.benchmark_overrides)
        bdir = Path(benchmark_dir) / task if benchmark_dir else default_benchmark_dir(cfg)
        log(f"benchmark ({task}): {bdir}")
        t0 = time.perf_counter()
        info = build_benchmark(bdir, cfg, encoder=encoder, progress=progress)
        timings[f"benchmark_{task}_s"] = round(time.perf_counter() - t0, 1)
        counts = {part: info["counts"][part]["slides"] for part in ("train", "val", "test")}
        log(f"  {counts['train']} train / {counts['val']} val / {counts['test']} test slides, "
            f"images: {info['image_source']['name']}, built or checked in {timings[f'benchmark_{task}_s']} s")
        if task == "classification":
            bench_cfg, class_dir = cfg, bdir

        # 2. Train every model through the same pipeline as `mamba2d train`.
        runs[task] = []
        for name, (model, model_args) in settings.jobs(task).items():
            run_dir = out / "runs" / f"{task}-{variant_slug(name)}"
            train_cfg = TrainConfig(
                features=str(bdir / "features"), labels=str(bdir / "labels.csv"),
                splits=str(bdir / "splits.csv"), out=str(run_dir), task=task, model=model,
                epochs=settings.epochs, lr=settings.lr, seeds=list(settings.seeds), cache=True, device=device,
                progress=progress,
                model_args=dict(model_args))
            log(f"training {name} ({task}, {settings.epochs} epochs, seeds {list(settings.seeds)})")
            t0 = time.perf_counter()
            # Reuses a finished run directory and resumes one left by an interrupted demo.
            run_training(train_cfg, reuse_finished=True)
            timings[f"train_{task}_{variant_slug(name)}_s"] = round(time.perf_counter() - t0, 1)
            runs[task].append((name, run_dir))

    # 3. One table per task, and the report.
    report = out / "report"
    summary: dict[str, Any] = {"settings": settings.__dict__, "benchmark": bench_cfg.to_dict(), "tasks": {}}
    for task, named in runs.items():
        dirs = [d for _, d in named]
        table = compare_runs(dirs).drop(columns="run").assign(model=[n for n, _ in named])
        text = _headline_table(table, task)
        log(f"\n{task}, test slides ({len(settings.seeds)} seed{'s' * (len(settings.seeds) > 1)}):\n{text}")
        suffix = "" if task == "classification" else "_survival"
        write_text(report / f"comparison{suffix}.md", text + "\n")
        write_text(report / f"comparison{suffix}.csv", table.to_csv(index=False))
        summary["tasks"][task] = {n: json.loads((d / "metrics.json").read_text()) for n, d in named}
    if "classification" in runs:
        _roc_plot(runs["classification"], report / "roc.png")
        trained = dict(runs["classification"])
        if settings.heatmap_variant in trained:
            summary["heatmaps"] = _heatmaps(trained[settings.heatmap_variant], class_dir,
                                            report / "heatmaps", settings.n_heatmaps, device)
            for h in summary["heatmaps"]:
                log(f"heatmap {h['slide_id']} ({h['label']}, predicted {h['predicted']}): "
                    f"{h['lesion_share_of_attention']:.0%} of {settings.heatmap_variant}'s attention on the "
                    f"lesion tiles, which are {h['lesion_share_of_tiles']:.1%} of the tiles")
    timings["total_s"] = round(time.perf_counter() - started, 1)
    summary["timings"] = timings
    write_json(report / "metrics.json", summary)
    log(f"\nreport: {report}/ (comparison.md, roc.png, heatmaps/, metrics.json); "
        f"took {timings['total_s']:.0f} s")
    return summary


HEADLINE = {"classification": (("auc", "AUC"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
            "survival": (("c_index", "C-index"),)}


def _headline_table(table: pd.DataFrame, task: str) -> str:
    """Markdown: model and the task's headline metrics, mean ± std when there are several runs."""
    cols = HEADLINE[task]
    lines = ["| model | " + " | ".join(title for _, title in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for _, row in table.iterrows():
        cells = []
        for key, _ in cols:
            mean, std = row.get(f"{key}_mean", float("nan")), row.get(f"{key}_std", float("nan"))
            cells.append(f"{mean:.3f}" if row["n"] <= 1 or np.isnan(std) else f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _roc_plot(runs: list[tuple[str, Path]], path: Path) -> None:
    curves = {}
    for name, run in runs:
        pred = pd.concat(pd.read_csv(p) for p in sorted(run.glob("fold*_seed*/predictions_test.csv")))
        prob_cols = [c for c in pred.columns if c.startswith("prob_")]
        curves[name] = (pred["label"].to_numpy(), pred[prob_cols].to_numpy())
    plots.save_roc_comparison(curves, path, title="test slides, macro one-vs-rest ROC (all seeds)")


def _heatmaps(run_dir: Path, bench_dir: Path, folder: Path, n: int, device: str) -> list[dict[str, Any]]:
    """Overlay 2DMambaMIL's attention on test mosaics, one slide per class first, and measure how
    much attention lands on the lesion tiles (``lesion_share``) against their share of the tiles."""
    dev = pick_device(device)
    best = find_model_dir(run_dir) / "best.pt"
    model = rebuild_model(load_checkpoint(best, map_location=dev), dev)
    slides = pd.read_csv(bench_dir / "slides.csv")
    test = slides[slides["part"] == "test"]
    chosen = pd.concat([test[test["label"] == c].head(1) for c in sorted(test["label"].unique())])
    chosen = pd.concat([chosen, test.drop(chosen.index)]).head(n)
    names = json.loads((bench_dir / "benchmark.json").read_text())["class_names"]
    results = []
    for _, row in chosen.iterrows():
        sid = row["slide_id"]
        bag = read_bag(bench_dir / "features" / f"{sid}.h5")
        with torch.no_grad():
            out = model(bag.features.to(dev), bag.coords.to(dev).float(), bag.patch_size_level0)
        attention = out.attention.float().cpu().numpy()
        lesion = lesion_cells(bench_dir, sid)
        grid = score_grid(attention, bag.coords, bag.patch_size_level0, origin=(0, 0),
                          shape=(int(row["grid_h"]), int(row["grid_w"])))
        image = render_mosaic(bench_dir, sid, scale=2)
        pred = names[int(out.probs.argmax())] if out.probs is not None else "?"
        share = float(attention[lesion].sum())
        title = (f"{sid}: true {names[int(row['label'])]}, predicted {pred}; attention on lesions "
                 f"{share:.0%} (they are {lesion.mean():.1%} of tiles)")
        # Linear scale: the point is whether attention concentrates on the lesions.
        save_overlay_png(folder / f"{sid}.png", image, to_display(grid, scale="max"), title,
                         scale_label="attention / max")
        results.append({"slide_id": sid, "label": names[int(row["label"])], "predicted": pred,
                        "lesion_share_of_attention": round(share, 4),
                        "lesion_share_of_tiles": round(float(lesion.mean()), 4),
                        "png": str(folder / f"{sid}.png")})
    return results


def lesion_attention_summary(heatmaps: list[dict[str, Any]]) -> float:
    """Mean ratio of attention on lesion tiles to their share of tiles (1 = no preference)."""
    ratios = [h["lesion_share_of_attention"] / h["lesion_share_of_tiles"] for h in heatmaps
              if h["lesion_share_of_tiles"] > 0]
    return float(np.mean(ratios)) if ratios else float("nan")
