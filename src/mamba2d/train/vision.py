"""`mamba2d vision-train`: train a vision backbone for image classification or mosaic segmentation.

Built on timm: the model comes from timm's registry (the 2DVMamba builders are registered there),
and so do the data transforms and augmentation (random resized crop, flips, colour jitter,
AutoAugment, random erasing), mixup/cutmix, the losses, the optimizer (no weight decay on norms,
biases and the SSM's A, D and dt bias) and the warm-up + cosine schedule, stepped per update.
Segmentation puts an UperNet head on the backbone's four feature maps and reports mIoU.

Run directory::

    RUN/config.yaml       the resolved configuration (``--config RUN/config.yaml`` repeats it)
    RUN/history.csv       one row per epoch: losses, accuracy or mIoU, learning rate, seconds
    RUN/metrics.json      the final and best validation metrics (and of the EMA weights if kept)
    RUN/last.pt           everything needed to resume (model, EMA, optimizer, schedule, epoch)
    RUN/best.pt           the best weights (state dict; ``timm.create_model(..., checkpoint_path=)``)
    RUN/curves.png        training curves; RUN/confusion.png (classification) or RUN/examples.png

Under ``torchrun`` every process takes a shard of each epoch (DistributedSampler), gradients are
all-reduced by DDP, validation counts are summed over processes, and rank 0 writes the files.
Every random draw is seeded from (seed, epoch), so a resumed run continues as the uninterrupted
one would have.
"""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mamba2d.io import load_checkpoint, save_checkpoint, write_json, write_text
from mamba2d.train.config import VisionTrainConfig
from mamba2d.train.distributed import DistInfo, distributed_session, on_main
from mamba2d.train.rundir import absolute_config, claim_run_folder, write_marker
from mamba2d.train.runtime import bf16_autocast, progress_bar

__all__ = ["run_vision_training"]

# Fashion-MNIST's pixel mean and standard deviation (training set, scaled to 0-1).
_FMNIST_MEAN, _FMNIST_STD = (0.2860,), (0.3530,)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timm():
    try:
        import timm
    except Exception as err:  # absent, or torchvision unusable with this torch
        raise ValueError(f"mamba2d vision-train needs timm and a working torchvision "
                         f"(pip install 'mamba2d[vision]'): {err}") from err
    import mamba2d.vision  # noqa: F401  (registers the 2DVMamba builders)

    return timm


def _seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch + 1


def _seed_everything(seed: int) -> None:
    """torch (shuffling, dropout, drop path), numpy (mixup) and Python's random (timm's crops and
    flips in the main process; DataLoader workers are seeded from torch's generator)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _autocast(cfg: VisionTrainConfig, device: torch.device):
    return bf16_autocast(cfg.precision, device)


# ----------------------------------------------------------------------------- data


def _classification_data(cfg: VisionTrainConfig) -> tuple[Dataset, Dataset, list[str], int]:
    """(train set, val set, class names, input channels), with timm's transforms."""
    from timm.data import ImageDataset, create_transform

    size = cfg.resolved_img_size()
    builtin = cfg.data == "fashion-mnist"
    chans, mean, std = (1, _FMNIST_MEAN, _FMNIST_STD) if builtin else (3, _IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = create_transform((chans, size, size), is_training=True, scale=(cfg.scale_min, 1.0),
                                hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                                re_prob=cfg.reprob, interpolation="bicubic", mean=mean, std=std)
    val_tf = create_transform((chans, size, size), is_training=False, interpolation="bicubic", mean=mean,
                              std=std, crop_pct=1.0 if builtin else 0.875)
    if builtin:
        from mamba2d.data.mosaic import FashionMNISTImages

        train = FashionMNISTImages("train", train_tf, cfg.train_limit)
        val = FashionMNISTImages("val", val_tf, cfg.val_limit)
        return train, val, list(FashionMNISTImages.classes), chans
    root = Path(cfg.data)
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    if val_dir is None:
        raise ValueError(f"--data {root}: no val/ (or validation/, test/) folder beside train/")
    train = ImageDataset(str(root / "train"), transform=train_tf)
    classes = sorted(train.reader.class_to_idx, key=train.reader.class_to_idx.get)
    val = ImageDataset(str(val_dir), transform=val_tf, class_map=train.reader.class_to_idx)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"--data {root}: no images found under train/ or {val_dir.name}/")
    if cfg.train_limit:
        train = torch.utils.data.Subset(train, range(min(cfg.train_limit, len(train))))
    if cfg.val_limit:
        val = torch.utils.data.Subset(val, range(min(cfg.val_limit, len(val))))
    return train, val, classes, 3


def _segmentation_data(cfg: VisionTrainConfig) -> tuple[Dataset, Dataset, list[str], int]:
    from mamba2d.data.mosaic import MOSAIC_CLASSES, MosaicSegmentation

    size = cfg.resolved_img_size()
    n_train = min(cfg.mosaics, cfg.train_limit or cfg.mosaics)
    n_val = min(max(cfg.mosaics // 5, 1), cfg.val_limit or cfg.mosaics)
    # The mosaics are fixed by their own seed (0), so every training seed sees the same data.
    return (MosaicSegmentation("train", n_train, size), MosaicSegmentation("val", n_val, size),
            list(MOSAIC_CLASSES), 1)


def _loader(data: Dataset, cfg: VisionTrainConfig, info: DistInfo, train: bool) -> DataLoader:
    sampler = None
    if info.enabled and train:
        sampler = DistributedSampler(data, info.world, info.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    elif info.enabled:
        # Every validation sample exactly once over all ranks (DistributedSampler would pad with
        # repeats to equal shares, and the summed counts would include them).
        data = torch.utils.data.Subset(data, range(info.rank, len(data), info.world))
    return DataLoader(data, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=cfg.workers, drop_last=train, pin_memory=info.device.type == "cuda",
                      persistent_workers=cfg.workers > 0)


# ---------------------------------------------------------------------------- model


def build_vision_model(cfg: VisionTrainConfig, n_classes: int, in_chans: int) -> nn.Module:
    """The classifier, or the backbone + UperNet segmenter, from timm's registry."""
    timm = _timm()
    kwargs = dict(cfg.model_args)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        if cfg.task == "classification":
            return timm.create_model(cfg.model, num_classes=n_classes, in_chans=in_chans, **kwargs)
        from mamba2d.vision import VisionSegmenter

        backbone = timm.create_model(cfg.model, features_only=True, out_indices=(0, 1, 2, 3),
                                     in_chans=in_chans, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"--model {cfg.model}: not in timm's registry (e.g. vmamba2d_tiny)") from err
        raise
    return VisionSegmenter(backbone, n_classes, channels=cfg.head_channels)


# ------------------------------------------------------------------------ one epoch


def _train_epoch(cfg: VisionTrainConfig, model: nn.Module, loader: DataLoader, optimizer, scheduler,
                 loss_fn, mixup, ema, state: dict[str, Any], info: DistInfo, epoch: int) -> float:
    model.train()
    total, count = torch.zeros((), device=info.device), 0
    bar = progress_bar(loader, cfg.progress and info.is_main, f"epoch {epoch + 1} train", leave=False)
    for images, targets in bar:
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with _autocast(cfg, info.device):
            out = model(images)
        loss = loss_fn(out.float(), targets)
        if not torch.isfinite(loss):
            raise ValueError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower --lr or set "
                             f"--clip-grad")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        state["updates"] += 1
        scheduler.step_update(num_updates=state["updates"])
        if ema is not None:
            ema.update(model, step=state["updates"])
        total += loss.detach() * images.shape[0]
        count += images.shape[0]
    return _all_sum(total, info).item() / max(_all_sum(torch.tensor(float(count), device=info.device),
                                                       info).item(), 1.0)


def _all_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        torch.distributed.all_reduce(t)
    return t


@torch.no_grad()
def _evaluate(cfg: VisionTrainConfig, model: nn.Module, loader: DataLoader, n_classes: int,
              info: DistInfo) -> dict[str, Any]:
    """Validation loss and the confusion matrix (classification: top-1/top-5 too), summed over ranks."""
    from mamba2d.train.metrics import pixel_confusion

    model.eval()
    loss_sum = torch.zeros((), device=info.device, dtype=torch.float64)
    top5 = torch.zeros((), device=info.device, dtype=torch.float64)
    confusion = torch.zeros(n_classes, n_classes, device=info.device, dtype=torch.long)
    n = torch.zeros((), device=info.device, dtype=torch.float64)
    for images, targets in progress_bar(loader, cfg.progress and info.is_main, "validate", leave=False):
        images, targets = images.to(info.device), targets.to(info.device)
        with _autocast(cfg, info.device):
            out = model(images).float()
        loss_sum += F.cross_entropy(out, targets, reduction="sum").double()
        pred = out.argmax(1)
        confusion += pixel_confusion(pred, targets, n_classes)
        if cfg.task == "classification":
            k = min(5, n_classes)
            top5 += (out.topk(k, 1).indices == targets[:, None]).any(1).sum()
        n += targets.numel()
    for t in (loss_sum, top5, confusion, n):
        _all_sum(t, info)
    result: dict[str, Any] = {"loss": (loss_sum / n).item(), "confusion": confusion.cpu()}
    if cfg.task == "classification":
        result["top1"] = float(confusion.diag().sum().item() / n.item())
        result["top5"] = float(top5.item() / n.item())
    else:
        from mamba2d.train.metrics import segmentation_metrics

        seg = segmentation_metrics(confusion)
        result["miou"], result["pixel_accuracy"] = seg["miou"], seg["pixel_accuracy"]
    return result


# ------------------------------------------------------------------------- the run


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def run_vision_training(cfg: VisionTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns and writes its metrics.

    ``cfg.out`` must be new or empty, or hold this very run, continued where it stopped (see
    :mod:`mamba2d.train.rundir`); ``resume``: it must hold a run already.
    """
    cfg.check()
    absolute_config(cfg)
    with distributed_session(cfg.device) as info:
        out = Path(cfg.out)
        on_main(lambda: claim_run_folder(out, "vision-train", cfg.to_dict(), resume=resume), info)
        try:
            result = _run(cfg, info)
        except BaseException as err:
            if info.is_main:
                write_marker(out, "vision-train", "failed", error=f"{type(err).__name__}: {err}"[:500])
            raise
        if info.is_main:
            write_marker(out, "vision-train", "stopped" if result.get("interrupted") else "complete")
        return result


def _run(cfg: VisionTrainConfig, info: DistInfo) -> dict[str, Any]:
    timm = _timm()
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    out = Path(cfg.out)
    _seed_everything(_seed(cfg.seed, -1))
    make_data = _classification_data if cfg.task == "classification" else _segmentation_data
    train_set, val_set, classes, in_chans = make_data(cfg)
    n_classes = len(classes)
    model = build_vision_model(cfg, n_classes, in_chans).to(info.device)
    train_loader, val_loader = _loader(train_set, cfg, info, True), _loader(val_set, cfg, info, False)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training samples make no full batch of {cfg.batch_size} "
                         f"per process")

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    mixup = None
    if cfg.task == "classification" and (cfg.mixup > 0 or cfg.cutmix > 0):
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=n_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif cfg.task == "classification" and cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None

    state: dict[str, Any] = {"epoch": -1, "updates": 0, "best": -math.inf, "best_epoch": -1, "history": []}
    last = out / "last.pt"
    if last.is_file():  # resume
        ckpt = load_checkpoint(last, map_location=info.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and "ema" in ckpt:
            ema.module.load_state_dict(ckpt["ema"])
        state.update(ckpt["state"])
    train_model = model
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    key = "top1" if cfg.task == "classification" else "miou"
    val: dict[str, Any] = {}
    stop_at = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, state["epoch"] + 1 +
                                                                   cfg.stop_after_epochs)
    for epoch in range(state["epoch"] + 1, stop_at):
        _seed_everything(_seed(cfg.seed, epoch))
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        train_loss = _train_epoch(cfg, train_model, train_loader, optimizer, scheduler, loss_fn, mixup, ema,
                                  state, info, epoch)
        scheduler.step(epoch + 1)
        val = _evaluate(cfg, model, val_loader, n_classes, info)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"], f"val_{key}": val[key],
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        if cfg.task == "classification":
            row["val_top5"] = val["top5"]
        if ema is not None:
            row[f"ema_val_{key}"] = _evaluate(cfg, ema.module, val_loader, n_classes, info)[key]
        state["history"].append(row)
        state["epoch"] = epoch
        if val[key] > state["best"]:
            state["best"], state["best_epoch"] = val[key], epoch + 1
            if info.is_main:
                save_checkpoint(out / "best.pt", model.state_dict())
        if info.is_main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state}
            if ema is not None:
                ckpt["ema"] = ema.module.state_dict()
            save_checkpoint(last, ckpt)
            _write_history(out / "history.csv", state["history"])
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
                  f"val {key} {val[key]:.4f} ({row['seconds']:.0f} s)", file=sys.stderr)
    if state["epoch"] + 1 < cfg.epochs:
        return {"interrupted": True, "epoch": state["epoch"] + 1}
    if not val:  # finished earlier: evaluate the final weights again for the report
        val = _evaluate(cfg, model, val_loader, n_classes, info)
    metrics = _final_metrics(cfg, classes, val, state, timm.__version__, model)
    if info.is_main:
        write_json(out / "metrics.json", metrics)
        _plots(cfg, out, classes, val, state, model, val_set, info)
    return metrics


def _final_metrics(cfg: VisionTrainConfig, classes: list[str], val: dict[str, Any], state: dict[str, Any],
                   timm_version: str, model: nn.Module) -> dict[str, Any]:
    from mamba2d.train.metrics import segmentation_metrics

    key = "top1" if cfg.task == "classification" else "miou"
    metrics: dict[str, Any] = {
        "task": cfg.task, "model": cfg.model, "seed": cfg.seed, "epochs": cfg.epochs,
        "img_size": cfg.resolved_img_size(), "parameters": sum(p.numel() for p in model.parameters()),
        f"final_val_{key}": val[key], "final_val_loss": val["loss"],
        f"best_val_{key}": state["best"], "best_epoch": state["best_epoch"], "timm": timm_version,
        "torch": torch.__version__,
    }
    if cfg.task == "classification":
        metrics["final_val_top5"] = val["top5"]
        cm = val["confusion"].numpy()
        per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
        metrics["per_class_accuracy"] = dict(zip(classes, per_class.round(4).tolist(), strict=True))
        metrics["confusion_matrix"] = cm.tolist()
    else:
        seg = segmentation_metrics(val["confusion"], classes)
        metrics.update({"final_val_pixel_accuracy": seg["pixel_accuracy"], "iou": seg["iou"]})
    if state["history"] and f"ema_val_{key}" in state["history"][-1]:
        metrics[f"final_ema_val_{key}"] = state["history"][-1][f"ema_val_{key}"]
    return metrics


def _plots(cfg: VisionTrainConfig, out: Path, classes: list[str], val: dict[str, Any], state: dict[str, Any],
           model: nn.Module, val_set: Dataset, info: DistInfo) -> None:
    from mamba2d.train.plots import save_confusion_matrix, save_segmentation_examples, save_training_curves

    save_training_curves(state["history"], out / "curves.png")
    if cfg.task == "classification":
        save_confusion_matrix(val["confusion"].numpy(), classes, out / "confusion.png", normalize=True)
        return
    images = torch.stack([val_set[i][0] for i in range(min(6, len(val_set)))])
    truth = torch.stack([val_set[i][1] for i in range(len(images))])
    model.eval()
    with torch.no_grad(), _autocast(cfg, info.device):
        pred = model(images.to(info.device)).argmax(1).cpu()
    save_segmentation_examples(images[:, 0].numpy(), truth.numpy(), pred.numpy(), classes,
                               out / "examples.png")
