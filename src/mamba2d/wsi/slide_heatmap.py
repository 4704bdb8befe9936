"""``mamba2d heatmap``: one trained model's attention drawn over the whole slide it was computed on.

Given a run directory from ``mamba2d train``, the slide file and its feature bag, :func:`run_heatmap`
runs the model on the bag, paints each patch's attention weight onto a thumbnail (or a pyramid
level) of the slide, and writes three files:

    OUT.png       the slide beside the attention overlay, with a colour bar and the prediction
    OUT.csv       x,y,width,height,score per patch (level-0 pixels; the raw attention weights)
    OUT.geojson   the same patches as square tiles with an "attention" measurement, for QuPath

:func:`run_heatmaps` does the same for every slide listed in a CSV, into one output folder.
A slide that was in the chosen model's training part is flagged (a warning, and in the title):
its attention shows what the model fitted, not what it would find on a new slide.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba2d.data.bags import read_bag
from mamba2d.wsi.heatmaps import (
    export_scores_csv,
    export_scores_geojson,
    parse_level,
    patches_outside,
    save_slide_heatmap_png,
    slide_heatmap,
)

__all__ = ["find_model_dir", "run_heatmap", "run_heatmaps", "training_slides"]

_MODEL_DIR = re.compile(r"fold(\d+)_seed(\d+)")


def find_model_dir(run: str | Path, fold_seed: str | None = None) -> Path:
    """The ``RUN/fold*_seed*`` folder whose ``best.pt`` to use: ``fold_seed`` (e.g. "fold0_seed0")
    when given, else the first by fold then seed. Raises ValueError naming the run when none fits."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory (expected the --out folder of `mamba2d train`)")
    found = {p.parent.name: p.parent for p in run.glob("fold*_seed*/best.pt")
             if _MODEL_DIR.fullmatch(p.parent.name)}
    if not found:
        raise ValueError(f"{run}: no fold*_seed*/best.pt; is this a finished `mamba2d train` run directory?")
    if fold_seed is not None:
        if fold_seed not in found:
            raise ValueError(f"{run}: no {fold_seed}/best.pt; the run has {', '.join(_ordered(found))}")
        return found[fold_seed]
    return found[_ordered(found)[0]]


def _ordered(names) -> list[str]:
    # Numeric order, so fold10 comes after fold2.
    return sorted(names, key=lambda n: tuple(int(g) for g in _MODEL_DIR.fullmatch(n).groups()))


def _run_config(run: Path):
    """The run's saved TrainConfig, or None for a folder without one."""
    from mamba2d.train.config import TrainConfig

    if not (run / "config.yaml").is_file():
        return None
    return TrainConfig.load(run / "config.yaml")


def training_slides(run: str | Path, model_dir: Path) -> set[str]:
    """Slide ids in the training part of the split that ``model_dir`` (``foldK_seedS``) was trained on,
    ids of cases expanded to their slides through the run's label file when it is still there."""
    from mamba2d.data.splits import read_split_csv

    run = Path(run)
    match = _MODEL_DIR.fullmatch(model_dir.name)
    split_file = run / "splits" / f"splits_{match.group(1)}.csv" if match else None
    if split_file is None or not split_file.is_file():
        return set()
    train = set(read_split_csv(split_file).train)
    cfg = _run_config(run)
    if cfg is not None and cfg.labels and Path(cfg.labels).is_file():
        from mamba2d.data.labels import read_labels

        try:
            frame = read_labels(cfg.labels, cfg.task, slide_col=cfg.slide_col, label_col=cfg.label_col,
                                case_col=cfg.case_col).frame
        except ValueError:
            return train
        train |= set(frame.loc[frame["case_id"].isin(train), "slide_id"])
    return train


def run_heatmap(run: str | Path, slide: str | Path, features: str | Path, out: str | Path, *,
                level: str | int = "auto", max_side: int = 2048, alpha: float = 0.5, cmap: str = "jet",
                blur: bool | float = False, scale: str = "percentile", mpp: float | None = None,
                device: str = "auto", fold_seed: str | None = None,
                patch_size: int | None = None) -> dict[str, Any]:
    """Draw one model's attention for one slide; see the module docstring for the files written.

    ``run``: a ``mamba2d train`` run directory; ``fold_seed`` picks its model (default the first
    ``fold*_seed*``). ``slide``: the whole-slide image; ``features``: its bag (CLAM/TRIDENT .h5 or
    .pt, coordinates in the slide's level-0 pixels). ``out``: the PNG path; the CSV and GeoJSON
    go beside it with the same stem. ``level``, ``max_side``, ``scale``, ``blur``: see
    :func:`mamba2d.wsi.heatmaps.slide_heatmap`; ``alpha`` (overlay opacity in [0, 1]) and ``cmap``
    (a matplotlib colour map): see :func:`mamba2d.wsi.heatmaps.save_slide_heatmap_png`. ``mpp``:
    level-0 microns per pixel, for slides that lack it (used for the scale bar only).
    ``patch_size``: level-0 patch side, for feature files that lack it (default: the run's).

    Returns a dict with the prediction and the written paths. Every problem with the inputs raises
    ValueError or FileNotFoundError naming the file.
    """
    from matplotlib import colormaps

    from mamba2d.io import load_checkpoint
    from mamba2d.train.distributed import pick_device
    from mamba2d.train.engine import forward_bag, grid_check, rebuild_model
    from mamba2d.train.rundir import refuse_existing_file
    from mamba2d.wsi.slides import open_slide

    run, slide, features, out = Path(run), Path(slide), Path(features), Path(out)
    # Check the cheap options first, so a typo does not cost a model load and a slide read.
    if out.suffix.lower() != ".png":
        raise ValueError(f"{out}: the output must be a .png path (the .csv and .geojson go beside it)")
    for path in (out, out.with_suffix(".csv"), out.with_suffix(".geojson")):
        refuse_existing_file(path)
    level = parse_level(level)
    if cmap not in colormaps:
        raise ValueError(f"unknown colour map {cmap!r}; try jet, viridis, inferno, magma, coolwarm")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if scale not in ("percentile", "max"):
        raise ValueError(f"scale must be 'percentile' or 'max', got {scale!r}")
    for path, what in ((slide, "slide"), (features, "features")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such {what} file")

    model_dir = find_model_dir(run, fold_seed)
    dev = pick_device(device)
    card = load_checkpoint(model_dir / "best.pt", map_location=dev)
    cfg = _run_config(run)
    bag = read_bag(features, patch_size=patch_size)
    if bag.patch_size_level0 is None and cfg is not None and cfg.patch_size is not None:
        bag = read_bag(features, patch_size=cfg.patch_size)  # the run's --patch-size
    ps = bag.patch_size_level0
    if ps is None:
        raise ValueError(f"{features}: no level-0 patch size in the file (nor in {run}/config.yaml); "
                         "pass --patch-size")
    grid = grid_check(cfg) if cfg is not None else None
    if grid is not None and card["model_name"] != cfg.model:
        grid = None
    in_training = bag.slide_id in training_slides(run, model_dir)
    if in_training:
        warnings.warn(f"{bag.slide_id} was in the training part of {model_dir.name}: its attention shows "
                      f"what the model fitted, not what it finds on unseen slides (pick another fold with "
                      f"--fold-seed)", stacklevel=2)
    if bag.feature_dim != int(card["in_dim"]):
        raise ValueError(f"{features}: features are {bag.feature_dim} wide but the model in {model_dir} was "
                         f"trained on {int(card['in_dim'])}-wide features (another encoder?)")

    with open_slide(slide, mpp=mpp) as wsi:
        outside = patches_outside(bag.coords, ps, wsi.dimensions)
        if outside.any():
            x, y = (int(v) for v in bag.coords[int(np.flatnonzero(outside)[0])])
            raise ValueError(f"{features}: {int(outside.sum())} of {bag.n_patches} patches lie outside the "
                             f"slide {slide} ({wsi.dimensions[0]} x {wsi.dimensions[1]} level-0 px), first "
                             f"at x={x}, y={y}; are these the features of this slide?")
        model = rebuild_model(card, dev)
        with torch.no_grad():
            result = forward_bag(model, bag, dev, grid=grid)
        attention = result.attention.float().cpu().numpy().reshape(-1)
        if attention.shape[0] != bag.n_patches:
            raise ValueError(f"{model_dir}: the model returned {attention.shape[0]} attention weights for "
                             f"{bag.n_patches} patches")
        image, display, downsample = slide_heatmap(wsi, attention, bag.coords, ps, level=level,
                                                   max_side=max_side, scale=scale, blur=blur)
        mpp_canvas = wsi.mpp * downsample if wsi.mpp else None

    prediction = _prediction(card, result)
    name = f"{card['model_name']} {model_dir.name}"
    title = f"{bag.slide_id} - {name}: {prediction}" + (" [training slide]" if in_training else "")
    scale_label = "attention (percentile)" if scale == "percentile" else "attention / max"
    if blur is not False and blur is not None:
        scale_label += ", blurred"
    png = save_slide_heatmap_png(out, image, display, title, alpha=alpha, cmap=cmap, scale_label=scale_label,
                                 microns_per_pixel=mpp_canvas)
    csv = export_scores_csv(out.with_suffix(".csv"), bag.coords, ps, attention)
    geojson = export_scores_geojson(out.with_suffix(".geojson"), bag.coords, ps, attention)
    info: dict[str, Any] = {"slide_id": bag.slide_id, "model": name, "prediction": prediction,
                            "n_patches": bag.n_patches, "downsample": downsample,
                            "canvas": [int(image.shape[1]), int(image.shape[0])],
                            "png": png, "csv": csv, "geojson": geojson, "in_training": in_training}
    if result.probs is not None:
        names = card.get("class_names") or [str(k) for k in range(int(card["n_outputs"]))]
        info["probs"] = {c: float(p) for c, p in zip(names, result.probs.float().cpu().tolist(), strict=True)}
    if result.risk is not None:
        info["risk"] = float(result.risk)
    return info


def _prediction(card: dict[str, Any], result) -> str:
    """'predicted tumour (p = 0.87)' for classification, 'risk -2.315 (...)' for survival."""
    if result.probs is not None:
        probs = result.probs.float().cpu()
        k = int(probs.argmax())
        names = card.get("class_names") or []
        label = names[k] if k < len(names) else f"class {k}"
        return f"predicted {label} (p = {float(probs[k]):.2f})"
    if result.risk is not None:
        return f"risk {float(result.risk):.3f} (higher = shorter survival)"
    return "no prediction"


def run_heatmaps(run: str | Path, table: str | Path, out: str | Path, **options: Any) -> list[dict[str, Any]]:
    """:func:`run_heatmap` for every row of ``table``, a CSV with columns ``slide`` (the slide file)
    and ``features`` (its bag), and optionally ``slide_id``; relative paths are relative to the CSV.
    Writes ``out/<slide_id>.png`` (and .csv, .geojson) and ``out/heatmaps.csv`` (one row per slide:
    prediction, files, whether it was a training slide). ``options``: as :func:`run_heatmap`.
    A slide that fails is recorded with its error and the others go on; returns the rows."""
    import pandas as pd

    from mamba2d.data.bags import slide_stem
    from mamba2d.data.labels import read_table
    from mamba2d.io import write_text
    from mamba2d.train.rundir import claim_output_folder, write_marker

    table, out = Path(table), Path(out)
    frame = read_table(table, what="heatmap slide list")
    cols = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in ("slide", "features") if c not in cols]
    if missing:
        raise ValueError(f"{table}: needs columns slide and features (and optionally slide_id); missing "
                         f"{missing}, found {list(frame.columns)}")
    claim_output_folder(out, "heatmap", inside_forbidden=[run])
    rows = []
    for _, rec in frame.iterrows():
        slide = table.parent / str(rec[cols["slide"]]).strip()
        features = table.parent / str(rec[cols["features"]]).strip()
        sid = str(rec[cols["slide_id"]]).strip() if "slide_id" in cols else slide_stem(slide.name)
        row: dict[str, Any] = {"slide_id": sid, "slide": str(slide), "features": str(features)}
        try:
            info = run_heatmap(run, slide, features, out / f"{sid}.png", **options)
        except (ValueError, FileNotFoundError) as err:
            row["error"] = str(err)
            warnings.warn(f"heatmap of {sid} skipped: {err}", stacklevel=2)
        else:
            row.update(prediction=info["prediction"], in_training=info["in_training"],
                       n_patches=info["n_patches"], png=str(info["png"]))
        rows.append(row)
    write_text(out / "heatmaps.csv", pd.DataFrame(rows).to_csv(index=False))
    write_marker(out, "heatmap", "complete")
    return rows
