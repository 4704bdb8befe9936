"""``mamba2d train``: a MIL model over folds and seeds on feature bags."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import (
    Subparsers,
    add_config_flags,
    argument_group,
    config_from_flags,
    reports_results,
    said_stopped,
)

DESCRIPTION = """\
Train a MIL model on feature bags. Every fold and seed trains one model with AdamW
and a cosine learning rate (one slide per step), keeps the checkpoint with the best
validation AUC (classification) or C-index (survival), and evaluates it on the test
part. Options can also come from a YAML file (--config); flags override it. The
resolved config is saved in the run directory.

multi-GPU:  torchrun --nproc_per_node=K -m mamba2d train ..."""

#: The TrainConfig fields that are flags, by argument group.
GROUPS = {
    "inputs": ("features", "labels", "task", "patch_size", "patches_dir", "label_col", "classes",
               "slide_col", "case_col", "cache", "skip_bad", "grid_snap", "max_grid_cells"),
    "splits": ("splits", "folds", "val_fraction", "allow_leakage"),
    "model": ("model",),
    "optimisation": ("preset", "epochs", "optimizer", "lr", "weight_decay", "tune", "tune_lrs", "seeds",
                     "accumulate", "clip_grad", "balanced_sampling", "early_stopping", "n_bins",
                     "alpha_surv"),
    "hardware": ("device", "precision"),
    "output": ("out", "tensorboard"),
}


def add_parser(sub: Subparsers) -> None:
    from mamba2d.mil import MODELS
    from mamba2d.train.config import TrainConfig

    train = sub.add_parser(
        "train",
        help="train a MIL model over folds and seeds; write metrics, predictions, plots, checkpoints",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(train, TrainConfig, GROUPS, choices={"model": sorted(MODELS)},
                     model_arg_example="d_model=256")
    argument_group(train, "optimisation").add_argument(
        "--seed", type=int, default=None, help="one seed (shorthand for --seeds S)")
    argument_group(train, "model").add_argument(
        "--list-models", action="store_true", help="print the model names and exit")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mamba2d.train.config import TrainConfig
    from mamba2d.train.engine import run_training

    if args.list_models:
        from mamba2d.mil import MODELS

        print("\n".join(sorted(MODELS)))
        return 0
    extra = {"seeds": [args.seed]} if args.seed is not None else {}
    cfg = config_from_flags(TrainConfig, args, GROUPS, **extra)
    result = run_training(cfg, resume=args.resume)
    if not reports_results() or said_stopped(result, "train", cfg.out):
        return 0
    from mamba2d.train.evaluate import compare_runs, format_table

    print(format_table(compare_runs([cfg.out])))
    print(f"results in {cfg.out}/ (metrics.json, summary.csv, fold*_seed*/)")
    return 0
