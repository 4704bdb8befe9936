"""``mamba2d predict``: a trained run's models on slides without labels.

Every model of the run (``fold*_seed*/best.pt``, or the one chosen) scores every slide; the
ensemble is the mean over models of the class probabilities (classification) or of the risk and
survival curve (survival). Output folder::

    OUT/predictions.csv          one row per slide: the ensemble (and the predicted class)
    OUT/<foldK_seedS>.csv        one row per slide: that model's outputs
    OUT/attention/<slide>.csv    with --attention: x, y, width, height and each model's weight
    OUT/metrics.json             what was run: models, slides, skipped slides
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mamba2d.data.bags import FeatureBagSet, discover_slides
from mamba2d.data.labels import read_table
from mamba2d.io import load_checkpoint, write_json, write_text
from mamba2d.train.config import TrainConfig
from mamba2d.train.distributed import pick_device
from mamba2d.train.engine import forward_bag, grid_check, rebuild_model
from mamba2d.train.rundir import claim_output_folder, write_marker
from mamba2d.train.runtime import bf16_autocast, progress_bar


def model_dirs(run: Path, fold_seed: str | None = None) -> list[Path]:
    """The run's trained models, ``fold*_seed*`` folders with a best.pt, in fold then seed order."""
    found = sorted((p.parent for p in Path(run).glob("fold*_seed*/best.pt")),
                   key=lambda d: tuple(int(x) for x in d.name.removeprefix("fold").split("_seed")))
    if not found:
        raise FileNotFoundError(f"{run}: no fold*_seed*/best.pt; is this a finished `mamba2d train` run?")
    if fold_seed is not None:
        found = [d for d in found if d.name == fold_seed]
        if not found:
            raise ValueError(f"{run}: no {fold_seed}/best.pt")
    return found


def _slide_list(features: Path, slides: str | None) -> list[str]:
    if slides is None:
        return discover_slides(features)
    table = read_table(slides, what="slide list")
    col = next((c for c in table.columns if str(c).strip().lower() in ("slide_id", "slide", "image_id")),
               table.columns[0])
    ids = [str(v) for v in table[col].dropna()]
    if not ids:
        raise ValueError(f"{slides}: column {col!r} lists no slide")
    return ids


def predict_run(run: str | Path, features: str | Path, out: str | Path, *, slides: str | None = None,
                patch_size: int | None = None, patches_dir: str | None = None, device: str = "auto",
                fold_seed: str | None = None, skip_bad: bool = False, attention: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Score the bags in ``features`` (all, or those listed in the ``slides`` CSV) with the models of
    ``run`` and write ``out`` (see the module docstring). Each bag is read once and scored by every
    model. Returns a summary dict."""
    run, features, out = Path(run), Path(features), Path(out)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: no config.yaml; is this a run directory written by `mamba2d train`?")
    cfg = TrainConfig.load(run / "config.yaml")
    dirs = model_dirs(run, fold_seed)
    ids = _slide_list(features, slides)
    claim_output_folder(out, "predict", inside_forbidden=[run])
    dev = pick_device(device)
    bags = FeatureBagSet(features, ids, patch_size=patch_size if patch_size is not None else cfg.patch_size,
                         coords_dir=patches_dir, skip_bad=skip_bad)
    grid = grid_check(cfg)
    bags.validate(grid=grid)
    cards = [load_checkpoint(d / "best.pt", map_location=dev) for d in dirs]
    if bags.feature_dim != int(cards[0]["in_dim"]):
        raise ValueError(f"{features}: features are {bags.feature_dim} wide but the run's models were "
                         f"trained on {int(cards[0]['in_dim'])}-wide features (another encoder?)")
    task, names = cards[0]["task"], list(cards[0].get("class_names") or [])
    models = {d.name: rebuild_model(card, dev) for d, card in zip(dirs, cards, strict=True)}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for stem in progress_bar(bags.slide_ids, progress, "predict", unit="slide"):
        bag = bags[bags.index_of(stem)]
        weights = {}
        for name, model in models.items():
            with torch.no_grad(), bf16_autocast(cfg.precision, dev):
                result = forward_bag(model, bag, dev, grid=grid)
            row: dict[str, Any] = {"slide_id": stem, "n_patches": bag.n_patches}
            if task == "classification":
                probs = result.probs.cpu().tolist()
                row.update({f"prob_{c}": float(p) for c, p in zip(names, probs, strict=True)})
            else:
                row["risk"] = float(result.risk)
                row.update({f"survival_{k}": float(s) for k, s in enumerate(result.survival.cpu().tolist())})
            rows[name].append(row)
            weights[name] = result.attention.float().cpu().numpy().reshape(-1)
        if attention:
            _write_attention(out / "attention" / f"{stem}.csv", bag, weights)
    for name, model_rows in rows.items():
        write_text(out / f"{name}.csv", pd.DataFrame(model_rows).to_csv(index=False))
    ensemble = _ensemble([pd.DataFrame(r) for r in rows.values()], task, names)
    write_text(out / "predictions.csv", ensemble.to_csv(index=False))
    summary = {"run": str(run.resolve()), "task": task, "models": list(models), "n_slides": len(ensemble),
               "skipped": dict(bags.skipped)}
    write_json(out / "metrics.json", summary)
    write_marker(out, "predict", "complete")
    return summary


def _ensemble(frames: list[pd.DataFrame], task: str, names: list[str]) -> pd.DataFrame:
    """Mean over models of every output column; the predicted class from the mean probabilities."""
    cols = [c for c in frames[0].columns if c not in ("slide_id", "n_patches")]
    mean = sum(f[cols].to_numpy(dtype=np.float64) for f in frames) / len(frames)
    out = frames[0][["slide_id", "n_patches"]].copy()
    out[cols] = mean
    if task == "classification":
        out.insert(1, "pred_name", [names[int(k)] for k in mean[:, : len(names)].argmax(axis=1)])
    out["n_models"] = len(frames)
    return out


def _write_attention(path: Path, bag, weights: dict[str, np.ndarray]) -> None:
    """Level-0 x, y, width, height of every patch, then one attention column per model."""
    coords = bag.coords.numpy()
    size = bag.patch_size_level0 or 0
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "width": size, "height": size})
    for model, w in weights.items():
        frame[f"attention_{model}"] = w
    write_text(path, frame.to_csv(index=False))
