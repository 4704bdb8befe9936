"""Training and evaluation of MIL models on feature bags, readable top to bottom.

``run_training(cfg)`` does the whole job: read labels and bags, make or read the splits, then for
every fold and seed train one model (AdamW, cosine learning rate, one slide per step, model
selection on validation AUC or C-index), evaluate its best checkpoint, and write the results.

Run directory::

    RUN/config.yaml              the resolved configuration
    RUN/labels.json              class names (or survival bin edges per fold)
    RUN/splits/splits_K.csv       the splits used (generated ones are saved for reuse)
    RUN/fold{K}_seed{S}/         one trained model: last.pt (resume), best.pt, history.csv,
                                 predictions_{val,test}.csv, metrics.json, *.png plots
    RUN/metrics.json             every fold and seed, plus mean ± std
    RUN/summary.csv              one row per fold and seed

Determinism: every random draw (model initialisation, slide order, dropout) is seeded from
(seed, fold, epoch), so a run resumed from ``last.pt`` ends with the same weights and metrics as
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mamba2d.data.bags import FeatureBagSet, GridCheck
from mamba2d.data.labels import LabelTable, read_labels
from mamba2d.data.splits import (
    Split,
    kfold_splits,
    read_split_csv,
    read_split_dir,
    resolve_split,
    splits_from_labels,
    write_split_csv,
)
from mamba2d.io import load_checkpoint, save_checkpoint, write_json, write_text
from mamba2d.mil import MODELS, build_model
from mamba2d.mil.grid import PatchGrid
from mamba2d.train import plots
from mamba2d.train.config import TrainConfig
from mamba2d.train.distributed import DistInfo, barrier, distributed_session, gather, on_main, shard
from mamba2d.train.epochlog import EpochLog
from mamba2d.train.losses import nll_survival_loss
from mamba2d.train.metrics import classification_metrics, summarise, survival_metrics
from mamba2d.train.rundir import absolute_config, claim_run_folder, write_marker
from mamba2d.train.runtime import bf16_autocast, progress_bar

# Models with their own auxiliary loss, and how it is weighted against the task loss
# (task weight, aux weight): CLAM's 0.7 / 0.3, DTFD-MIL's tier-1 + tier-2 sum.
AUX_WEIGHTS = {"clam_sb": (0.7, 0.3), "dtfd": (1.0, 1.0)}
SELECTION_METRIC = {"classification": "auc", "survival": "c_index"}


@dataclass
class RunData:
    """A labelled set of slides: ``table.frame`` rows and their bags, and how bags go on grids."""

    table: LabelTable
    bags: FeatureBagSet
    grid: GridCheck | None = None

    def bag(self, row: int):
        return self.bags[self.bags.index_of(self.table.frame["slide_id"].iat[row])]

    def placed(self, bag) -> PatchGrid | None:
        """The bag's grid for models that scan one (None otherwise), kept with the bag when bags are
        cached in memory (placing 100k patches costs tens of ms, every step)."""
        if self.grid is None:
            return None
        if not self.bags.cache:
            return bag.grid(self.grid.snap, self.grid.max_cells)
        cache = self.__dict__.setdefault("_grids", {})
        if bag.slide_id not in cache:
            cache[bag.slide_id] = bag.grid(self.grid.snap, self.grid.max_cells)
        return cache[bag.slide_id]


# --------------------------------------------------------------------------------------------------
# Data


def uses_grid(model_name: str) -> bool:
    """Whether the model reads the patches' 2D layout (then bags are placed on grids at load time)."""
    return bool(getattr(MODELS.get(model_name), "uses_grid", False))


def grid_check(cfg: TrainConfig) -> GridCheck | None:
    if not uses_grid(cfg.model):
        return None
    snap = cfg.model_args.get("snap", "error" if cfg.grid_snap == "strict" else "auto")
    return GridCheck(snap=snap, max_cells=cfg.model_args.get("max_grid_cells", cfg.max_grid_cells))


def load_data(cfg: TrainConfig) -> RunData:
    """Read the label table and the bags it names, and check every bag (and, for models that scan
    the grid, its grid) before training starts; with ``skip_bad``, drop slides that fail."""
    table = read_labels(cfg.labels, cfg.task, slide_col=cfg.slide_col, label_col=cfg.label_col,
                        case_col=cfg.case_col, class_order=cfg.classes, drop_other=cfg.skip_bad)
    bags = FeatureBagSet(cfg.features, table.frame["slide_id"], patch_size=cfg.patch_size,
                         coords_dir=cfg.patches_dir, cache=cfg.cache, skip_bad=cfg.skip_bad)
    check = grid_check(cfg)
    bags.validate(grid=check)
    kept = table.frame["slide_id"].isin(set(bags.slide_ids))
    if not kept.all():
        table = LabelTable(table.task, table.frame[kept].reset_index(drop=True), table.class_names,
                           table.source, table.bin_edges)
    if len(table) == 0:
        raise ValueError(f"no usable slides: every slide in {cfg.labels} was skipped")
    return RunData(table, bags, check)


def split_rows(cfg: TrainConfig, split: Split, table: LabelTable) -> dict[str, list[int]]:
    """The rows of each part of ``split``: unknown ids and leakage are errors unless ``skip_bad`` /
    ``allow_leakage`` say otherwise (then warnings)."""
    return resolve_split(split, table, unknown="drop" if cfg.skip_bad else "error",
                         leakage="warn" if cfg.allow_leakage else "error")


def make_splits(cfg: TrainConfig, table: LabelTable) -> list[Split]:
    """The splits to train on: a split CSV or folder, generated K folds, or the label file's split column."""
    if cfg.splits:
        path = Path(cfg.splits)
        if path.is_dir():
            return read_split_dir(path)
        return [read_split_csv(path)]
    if cfg.folds:
        return kfold_splits(table, k=cfg.folds, seed=cfg.seeds[0], val_fraction=cfg.val_fraction)
    split = splits_from_labels(table)
    if split is None:
        raise ValueError(f"no splits: pass --splits CSV or --folds K, or add a 'split' column to "
                         f"{cfg.labels}")
    return [split]


# --------------------------------------------------------------------------------------------------
# One model


def _seed(seed: int, fold: int, epoch: int = -1) -> int:
    return (seed * 1_000_003 + fold * 10_007 + epoch + 1) % (2**63 - 1)


def _n_outputs(cfg: TrainConfig, table: LabelTable) -> int:
    return table.n_classes if cfg.task == "classification" else cfg.n_bins


def _autocast(cfg: TrainConfig, device: torch.device):
    return bf16_autocast(cfg.precision, device)


def _slide_loss(cfg: TrainConfig, model: nn.Module, out, frame: pd.DataFrame, row: int) -> torch.Tensor:
    if cfg.task == "classification":
        target = torch.tensor([int(frame["label"].iat[row])], device=out.logits.device)
        loss = F.cross_entropy(out.logits.float()[None], target)
    else:
        bins = torch.tensor([int(frame["bin"].iat[row])], device=out.logits.device)
        cens = torch.tensor([float(frame["censorship"].iat[row])], device=out.logits.device)
        loss = nll_survival_loss(out.logits.float()[None], bins, cens, alpha=cfg.alpha_surv)
    if out.aux_loss is not None:
        w_task, w_aux = AUX_WEIGHTS.get(cfg.model, (1.0, 1.0))
        loss = w_task * loss + w_aux * out.aux_loss.float()
    return loss


def forward_bag(model: nn.Module, bag, device: torch.device, label: int | None = None,
                grid: GridCheck | PatchGrid | None = None):
    """Run ``model`` on one :class:`~mamba2d.data.bags.Bag`. ``grid``: the bag's placed grid, or how
    the pipeline places bags on grids, for models that scan them (``None`` for the others).
    ``label``: for models with an auxiliary loss that needs it."""
    kwargs: dict[str, Any] = {} if label is None else {"label": torch.tensor(label, device=device)}
    if isinstance(grid, GridCheck):  # placed as at load time, where its problems were reported
        grid = bag.grid(grid.snap, grid.max_cells)
    if grid is not None:
        kwargs["grid"] = grid
    return model(bag.features.to(device), bag.coords.to(device).float(), bag.patch_size_level0, **kwargs)


def _epoch_order(cfg: TrainConfig, frame: pd.DataFrame, rows: list[int], gen: torch.Generator) -> list[int]:
    if cfg.balanced_sampling and cfg.task == "classification":
        labels = frame["label"].to_numpy()[rows]
        counts = np.bincount(labels)
        weights = torch.tensor(1.0 / counts[labels], dtype=torch.float64)
        picks = torch.multinomial(weights, len(rows), replacement=True, generator=gen)
        return [rows[i] for i in picks.tolist()]
    return [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]


@torch.no_grad()
def predict(model: nn.Module, data: RunData, table: LabelTable, rows: list[int], info: DistInfo,
            cfg: TrainConfig) -> pd.DataFrame:
    """One row of predictions per slide in ``rows`` (all ranks get all rows)."""
    model.eval()
    frame = table.frame
    records = []
    for row in shard(rows, info):
        bag = data.bag(row)
        with _autocast(cfg, info.device):
            out = forward_bag(model, bag, info.device, grid=data.placed(bag))
        if not torch.isfinite(out.logits).all():
            raise ValueError(f"{bag.path}: the model's output for slide {frame['slide_id'].iat[row]} is not "
                             f"finite; training diverged (try a lower --lr)")
        rec: dict[str, Any] = {"row": row, "slide_id": frame["slide_id"].iat[row],
                               "case_id": frame["case_id"].iat[row]}
        if table.task == "classification":
            probs = out.probs.float().cpu().numpy()
            rec.update(label=int(frame["label"].iat[row]), label_name=frame["label_name"].iat[row],
                       pred=int(probs.argmax()), pred_name=table.class_names[int(probs.argmax())])
            rec.update({f"prob_{name}": float(p) for name, p in zip(table.class_names, probs, strict=True)})
        else:
            rec.update(survival_months=float(frame["survival_months"].iat[row]),
                       censorship=int(frame["censorship"].iat[row]), bin=int(frame["bin"].iat[row]),
                       risk=float(out.risk.float()))
            rec.update({f"survival_{k}": float(s) for k, s in enumerate(out.survival.float().cpu())})
        records.append(rec)
    merged = [r for part in gather(records, info) for r in part]
    return pd.DataFrame(merged).sort_values("row").drop(columns="row").reset_index(drop=True) \
        if merged else pd.DataFrame()


def score(pred: pd.DataFrame, table: LabelTable) -> dict[str, Any]:
    """Metrics of a predictions frame: slide-level classification, or case-level C-index (a case's
    risk is the mean over its slides)."""
    if pred.empty:
        return {}
    if table.task == "classification":
        probs = pred[[f"prob_{c}" for c in table.class_names]].to_numpy()
        return classification_metrics(pred["label"].to_numpy(), probs, table.class_names)
    cases = case_risks(pred)
    return survival_metrics(cases["time"].to_numpy(), 1 - cases["censorship"].to_numpy(),
                            cases["risk"].to_numpy())


def case_risks(pred: pd.DataFrame) -> pd.DataFrame:
    """Survival predictions per case: its time and censorship, and the mean risk of its slides."""
    return pred.groupby("case_id", sort=False).agg(
        time=("survival_months", "first"), censorship=("censorship", "first"), risk=("risk", "mean"))


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics; None (an undefined metric read back from JSON) counts as NaN."""
    return {k: float("nan") if v is None else float(v) for k, v in metrics.items()
            if v is None or (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool))}


def model_card(cfg: TrainConfig, data: RunData, table: LabelTable) -> dict[str, Any]:
    """What is needed to rebuild a trained model and read its outputs, stored in best.pt."""
    card: dict[str, Any] = {"model_name": cfg.model, "model_args": dict(cfg.model_args), "task": cfg.task,
                            "in_dim": data.bags.feature_dim, "n_outputs": _n_outputs(cfg, table),
                            "class_names": list(table.class_names)}
    if table.bin_edges is not None:
        card["bin_edges"] = [float(e) for e in table.bin_edges]
    return card


def rebuild_model(card: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """The model described by a best.pt checkpoint, with its weights loaded, in eval mode."""
    model = build_model(card["model_name"], in_dim=int(card["in_dim"]), n_classes=int(card["n_outputs"]),
                        task=card["task"], **card.get("model_args", {}))
    model.load_state_dict(card["model"])
    return model.to(device).eval()


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (the default, as 2DMamba and MambaMIL), or SGD with momentum 0.9 (CLAM's ``--opt sgd``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _is_better(value: float, best: float) -> bool:
    return not math.isnan(value) and value > best


def train_one(cfg: TrainConfig, data: RunData, split: Split, fold: int, seed: int, out_dir: Path,
              info: DistInfo) -> dict[str, Any]:
    """Train and evaluate one model on one split; resumable from ``out_dir/last.pt``."""
    result_path = out_dir / "result.json"
    if result_path.is_file():  # finished in an earlier call
        import json

        return json.loads(result_path.read_text())

    table = data.table
    rows = split_rows(cfg, split, table)
    if cfg.task == "survival":  # bins from this fold's training patients only
        table = table.with_bins(table.bin_edges_from(cfg.n_bins, rows["train"]))
    frame = table.frame
    # Select on validation only when a separate test part exists: without one (e.g. the published
    # survival k-fold splits) the validation part is the held-out evaluation set, so selecting on it
    # would report an optimistic score; the last epoch is used instead.
    select_on_val = len(rows["val"]) > 0 and len(rows["test"]) > 0

    torch.manual_seed(_seed(seed, fold))
    model = build_model(cfg.model, in_dim=data.bags.feature_dim, n_classes=_n_outputs(cfg, table),
                        task=cfg.task, **cfg.model_args).to(info.device)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(shard(rows["train"], info, equal=True)) / cfg.accumulate)
    total_steps = max(1, cfg.epochs * steps_per_epoch)

    state = {"epoch": -1, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    if (out_dir / "last.pt").is_file():
        ckpt = load_checkpoint(out_dir / "last.pt", map_location=info.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = {k: ckpt[k] for k in state}
    net: nn.Module = model
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    show = cfg.progress and info.is_main
    log = EpochLog(out_dir, f"fold {fold} seed {seed}", cfg.epochs, enabled=info.is_main,
                   lines=not cfg.progress, tensorboard=cfg.tensorboard)
    epochs = progress_bar(range(state["epoch"] + 1, cfg.epochs), show, f"fold {fold} seed {seed}",
                       initial=state["epoch"] + 1, total=cfg.epochs)
    stopped_early = False
    for epoch in epochs:
        if cfg.stop_after_epochs is not None and epoch >= cfg.stop_after_epochs:
            return {"interrupted_at_epoch": epoch}
        # --- train one epoch
        started = time.perf_counter()
        torch.manual_seed(_seed(seed, fold, epoch))  # dropout and other draws inside the model
        gen = torch.Generator().manual_seed(_seed(seed, fold, epoch))
        order = shard(_epoch_order(cfg, frame, rows["train"], gen), info, equal=True)
        net.train()
        running, step = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        slides = progress_bar(order, show, f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="slide")
        for i, row in enumerate(slides):
            wants_label = cfg.model in AUX_WEIGHTS and cfg.task == "classification"
            label = int(frame["label"].iat[row]) if wants_label else None
            bag = data.bag(row)
            with _autocast(cfg, info.device):
                out = forward_bag(net, bag, info.device, label, data.placed(bag))
            loss = _slide_loss(cfg, model, out, frame, row)
            if not torch.isfinite(loss):
                raise ValueError(f"{bag.path}: the loss on slide {frame['slide_id'].iat[row]} is not finite "
                                 f"at epoch {epoch + 1} (check this slide's features, or lower --lr)")
            (loss / cfg.accumulate).backward()
            running += float(loss.detach())
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(order):
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps_per_epoch + step) / total_steps))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if cfg.clip_grad is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        train_loss = sum(gather(running, info)) / max(1, sum(gather(len(order), info)))

        # --- validate and select
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr,
                                  "train_seconds": round(time.perf_counter() - started, 3)}
        val_score = float("nan")
        if rows["val"]:
            val_metrics = score(predict(model, data, table, rows["val"], info, cfg), table)
            record.update({f"val_{k}": v for k, v in _scalar_metrics(val_metrics).items()})
            val_score = float(val_metrics.get(SELECTION_METRIC[cfg.task], float("nan")))
        value = val_score if select_on_val else float(epoch)  # else the last epoch is selected
        state["history"].append(record)
        state["epoch"] = epoch
        if _is_better(value, state["best_score"]):
            state.update(best_score=value, best_epoch=epoch, bad_epochs=0)
            if info.is_main:
                save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch,
                                                      **model_card(cfg, data, table)})
        else:
            state["bad_epochs"] += 1
        if info.is_main:
            save_checkpoint(out_dir / "last.pt", {"model": model.state_dict(),
                                                  "optimizer": optimizer.state_dict(), **state})
        log.epoch(record, state["history"])
        barrier(info)
        if show:
            epochs.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_score:.3f}")
        if cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping:
            stopped_early = True
            break

    # --- evaluate the selected model
    selection = f"val {SELECTION_METRIC[cfg.task]}" if select_on_val else "last epoch"
    if state["best_epoch"] < 0:  # the validation metric was never defined (e.g. one class in val)
        warnings.warn(f"{out_dir.name}: validation {SELECTION_METRIC[cfg.task]} was undefined at every "
                      f"epoch; using the last epoch's model", stacklevel=2)
        selection, state["best_epoch"] = "last epoch (validation metric undefined)", state["epoch"]
        if info.is_main:
            save_checkpoint(out_dir / "best.pt", {"model": model.state_dict(), "epoch": state["epoch"],
                                                  **model_card(cfg, data, table)})
        barrier(info)
    best = load_checkpoint(out_dir / "best.pt", map_location=info.device)
    model.load_state_dict(best["model"])
    result: dict[str, Any] = {
        "fold": fold, "seed": seed, "split": split.name, "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"] + 1, "stopped_early": stopped_early,
        "selection": selection,
        "n_train": len(rows["train"]), "n_val": len(rows["val"]), "n_test": len(rows["test"])}
    if cfg.task == "survival":
        result["bin_edges"] = [e if math.isfinite(e) else "inf" for e in table.bin_edges]
    for part in ("val", "test"):
        if not rows[part]:
            continue
        pred = predict(model, data, table, rows[part], info, cfg)
        metrics = score(pred, table)
        result[part] = metrics
        if info.is_main:
            write_text(out_dir / f"predictions_{part}.csv", pred.to_csv(index=False))
            _plots(table, pred, metrics, out_dir, part)
    log.close()
    if info.is_main:
        write_text(out_dir / "history.csv", pd.DataFrame(state["history"]).to_csv(index=False))
        plots.save_training_curves(state["history"], out_dir / "training_curves.png")
        write_json(out_dir / "metrics.json", result)
        write_json(result_path, result)
    barrier(info)
    return result


def tune_candidates(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The settings ``--tune`` tries: every lr of ``tune_lrs`` (or the configured lr) times both
    convolutions (or the configured one)."""
    lrs = cfg.tune_lrs if "lr" in (cfg.tune or []) else [cfg.lr]
    convs = ["1d", "2d"] if "conv" in (cfg.tune or []) else [None]
    return [{"lr": lr, **({"conv": conv} if conv else {})} for conv in convs for lr in lrs]


def tune_one(cfg: TrainConfig, data: RunData, split: Split, fold: int, seed: int, out_dir: Path,
             info: DistInfo) -> dict[str, Any]:
    """Train every :func:`tune_candidates` setting on the training part, keep the one with the best
    validation score (the test part is never looked at) and report it as this fold's model.

    Each candidate trains in ``out_dir/tune/<setting>/`` (resumable like any model); the chosen one's
    files are copied into ``out_dir``. The result records the choice and every candidate's score.
    """
    rows = split_rows(cfg, split, data.table)
    if not rows["val"] or not rows["test"]:
        raise ValueError(f"{split.label}: --tune selects on the validation part, so the split needs both a "
                         f"validation and a test part (this one has {len(rows['val'])} and "
                         f"{len(rows['test'])} slides)")
    metric = SELECTION_METRIC[cfg.task]
    tried = []
    for setting in tune_candidates(cfg):
        slug = "_".join(f"{k}_{v}" for k, v in setting.items())
        args = {**cfg.model_args, **{k: v for k, v in setting.items() if k != "lr"}}
        trial = dataclasses.replace(cfg, lr=setting["lr"], model_args=args, tune=None)
        trial_dir = out_dir / "tune" / slug
        if info.is_main:
            trial_dir.mkdir(parents=True, exist_ok=True)
        barrier(info)
        res = train_one(trial, data, split, fold, seed, trial_dir, info)
        if "interrupted_at_epoch" in res:
            return res
        score = float(res["val"].get(metric) if res["val"].get(metric) is not None else float("nan"))
        tried.append({**setting, f"val_{metric}": score, "dir": str(trial_dir), "result": res})
    # The best validation score; ties go to the earlier (smaller lr, then conv 1d) setting.
    best = max(tried, key=lambda t: (not math.isnan(t[f"val_{metric}"]),
                                     t[f"val_{metric}"] if not math.isnan(t[f"val_{metric}"]) else 0.0,
                                     -tried.index(t)))
    result = dict(best["result"])
    result["tuned"] = {k: v for k, v in best.items() if k in ("lr", "conv")}
    result["tune_candidates"] = [{k: v for k, v in t.items() if k not in ("result", "dir")} for t in tried]
    if info.is_main:
        for path in Path(best["dir"]).iterdir():
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)
        write_json(out_dir / "metrics.json", result)
        write_json(out_dir / "result.json", result)
    barrier(info)
    return result


def _plots(table: LabelTable, pred: pd.DataFrame, metrics: dict[str, Any], out_dir: Path, part: str) -> None:
    try:
        if table.task == "classification":
            probs = pred[[f"prob_{c}" for c in table.class_names]].to_numpy()
            plots.save_roc_curves(pred["label"].to_numpy(), probs, table.class_names,
                                  out_dir / f"roc_{part}.png")
            plots.save_confusion_matrix(metrics["confusion_matrix"], table.class_names,
                                        out_dir / f"confusion_{part}.png")
        else:
            cases = case_risks(pred)
            plots.save_km_by_risk(cases["time"].to_numpy(), 1 - cases["censorship"].to_numpy(),
                                  cases["risk"].to_numpy(), out_dir / f"km_{part}.png")
    except ValueError as err:  # e.g. one class only in a tiny part: the metrics are still written
        warnings.warn(f"{out_dir.name}: no {part} plot ({err})", stacklevel=2)


# --------------------------------------------------------------------------------------------------
# The whole run


def run_training(cfg: TrainConfig, *, resume: bool = False, reuse_finished: bool = False) -> dict[str, Any]:
    """Train every fold and seed of ``cfg``; returns (and writes) the run's metrics.

    The run folder ``cfg.out`` must be new or empty, or hold this very run (see
    :mod:`mamba2d.train.rundir`): an unfinished one is continued where it stopped. ``resume``: it
    must hold a run already (``cfg`` is its saved configuration). ``reuse_finished``: a finished
    identical run is returned as it is instead of refused.
    """
    cfg.check()
    absolute_config(cfg)
    with distributed_session(cfg.device) as info:
        out = Path(cfg.out)
        on_main(lambda: claim_run_folder(out, "train", cfg.to_dict(), resume=resume,
                                         reuse_finished=reuse_finished), info)
        try:
            result = _run(cfg, info)
        except BaseException as err:
            if info.is_main:
                write_marker(out, "train", "failed", error=f"{type(err).__name__}: {err}"[:500])
            raise
        if info.is_main:
            write_marker(out, "train", "stopped" if result.get("interrupted") else "complete")
        return result


def _run(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    out = Path(cfg.out)
    data = load_data(cfg)
    splits = make_splits(cfg, data.table)
    for split in splits:  # every split's problems before any fold trains
        split_rows(cfg, split, data.table)
    if info.is_main:
        write_json(out / "labels.json", data.table.to_json_dict())
        (out / "splits").mkdir(exist_ok=True)
        for k, split in enumerate(splits):
            write_split_csv(split, out / "splits" / f"splits_{k}.csv")
        if data.bags.skipped:
            write_json(out / "skipped_slides.json", data.bags.skipped)
    barrier(info)

    results = []
    for fold, split in enumerate(splits):
        for seed in cfg.seeds:
            run_dir = out / f"fold{fold}_seed{seed}"
            if info.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
            barrier(info)
            fit = tune_one if cfg.tune else train_one
            res = fit(cfg, data, split, fold, seed, run_dir, info)
            if "interrupted_at_epoch" in res:
                return {"interrupted": True}
            results.append(res)
    summary = summarise_results(results)
    if cfg.tune and info.is_main:  # the choices, in the run's own configuration
        cfg.tuned = {f"fold{r['fold']}_seed{r['seed']}": r["tuned"] for r in results}
        cfg.save(out / "config.yaml")
    if info.is_main:
        write_json(out / "metrics.json", {"task": cfg.task, "model": cfg.model, "runs": results, **summary})
        write_text(out / "summary.csv", results_table(results).to_csv(index=False))
    return {"runs": results, **summary}


def summarise_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds and seeds of every scalar val and test metric."""
    out: dict[str, Any] = {}
    for part in ("val", "test"):
        runs = [_scalar_metrics(r[part]) for r in results if part in r]
        if runs:
            out[f"{part}_summary"] = summarise(runs)
    return out


def results_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per fold and seed with its scalar val_ and test_ metrics."""
    rows = []
    for r in results:
        row = {"fold": r["fold"], "seed": r["seed"], "best_epoch": r["best_epoch"]}
        row.update({f"tuned_{k}": v for k, v in r.get("tuned", {}).items()})
        for part in ("val", "test"):
            row.update({f"{part}_{k}": v for k, v in _scalar_metrics(r.get(part, {})).items()})
        rows.append(row)
    return pd.DataFrame(rows)
