"""``mamba2d vision-train``: a 2DVMamba (or any timm) backbone, image classification or mosaic
segmentation."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import (
    Subparsers,
    add_config_flags,
    config_from_flags,
    reports_results,
    said_stopped,
)

DESCRIPTION = """\
Train a vision backbone from timm's registry (vmamba2d_tiny, vmamba1d_tiny, ... are
registered by mamba2d) with timm's augmentation, mixup/cutmix, losses, optimizer and
warm-up + cosine schedule; bf16 autocast on GPU; optional weight EMA; resumable.
Classification: the built-in Fashion-MNIST, or an ImageFolder root (train/, val/).
Segmentation: an UperNet head on the backbone's four feature maps, trained on
Fashion-MNIST mosaics, scored by mIoU. Options can come from a YAML file (--config;
configs/imagenet_2dvmamba_tiny.yaml is the paper's ImageNet recipe).

multi-GPU:  torchrun --nproc_per_node=K -m mamba2d vision-train ..."""

#: The VisionTrainConfig fields that are flags, by argument group.
GROUPS = {
    "task and data": ("task", "data", "img_size", "train_limit", "val_limit", "mosaics", "workers"),
    "model": ("model", "drop_path", "head_channels"),
    "optimisation": ("epochs", "batch_size", "opt", "lr", "min_lr", "warmup_epochs", "warmup_lr",
                     "weight_decay", "sched", "clip_grad", "ema", "ema_decay", "seed"),
    "augmentation": ("scale_min", "hflip", "color_jitter", "aa", "reprob", "smoothing", "mixup", "cutmix"),
    "hardware": ("device", "precision"),
    "output": ("out",),
}


def add_parser(sub: Subparsers) -> None:
    from mamba2d.train.config import VisionTrainConfig
    from mamba2d.vision.vmamba import BUILDERS  # the models alone: timm is not imported

    vt = sub.add_parser(
        "vision-train",
        help="train a 2DVMamba (or any timm) backbone: image classification or mosaic segmentation",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model_help = (f"backbone: {', '.join(BUILDERS)} (2DVMamba and its 1D cross-scan twin, built in) "
                  "or any timm model")
    add_config_flags(vt, VisionTrainConfig, GROUPS, helps={"model": model_help},
                     model_arg_example="backend=torch")
    vt.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mamba2d.train.config import VisionTrainConfig
    from mamba2d.train.vision import run_vision_training

    cfg = config_from_flags(VisionTrainConfig, args, GROUPS)
    result = run_vision_training(cfg, resume=args.resume)
    if not reports_results() or said_stopped(result, "vision-train", cfg.out):
        return 0
    key = "top1" if cfg.task == "classification" else "miou"
    print(f"{cfg.model} {cfg.task}: final val {key} {result[f'final_val_{key}']:.4f}, best "
          f"{result[f'best_val_{key}']:.4f} (epoch {result['best_epoch']})")
    print(f"results in {cfg.out}/ (metrics.json, history.csv, curves.png, best.pt, last.pt)")
    return 0
