"""The ``mamba2d`` command line."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from mamba2d import __version__

BENCH_SCRIPT = os.path.join("benchmarks", "scan.py")
TOLERANCE = 1e-4

DESCRIPTION = """\
2DMamba: 2D selective state-space scans for whole-slide images and vision.

Train and compare multiple-instance models (2DMambaMIL and its baselines) on
patch-feature bags from CLAM or TRIDENT, for slide classification and survival;
train the 2DVMamba vision backbone for image classification and segmentation.
"""

EPILOG = """\
examples:
  mamba2d train --features feats/ --labels labels.csv --folds 5 --model 2dmambamil --out runs/2d
  mamba2d train --resume --out runs/2d          continue a killed run where it stopped
  mamba2d eval --run runs/2d --out runs/2d-eval
  mamba2d compare runs/2d runs/abmil            mean ± std over folds and seeds
  mamba2d predict --run runs/2d --features new/ --out preds   slides without labels
  mamba2d heatmap --run runs/2d --slide s1.svs --features feats/s1.h5 --out s1.png
                                                attention over the whole slide (PNG, CSV, GeoJSON)
  mamba2d heatmap --run runs/2d --slides-csv slides.csv --out heatmaps/   a batch of slides
  mamba2d demo                                  the built-in benchmark: train, compare, heatmaps
  mamba2d extract --slides slides/ --out feats  slides to feature h5 files (tissue, tiling, encoder)
  mamba2d selfcheck                             check the 2D scan against its reference
  mamba2d bench -- --help                       the scan benchmark's options
"""


def _selfcheck(args: argparse.Namespace) -> int:
    import torch

    from mamba2d import selective_scan_2d
    from mamba2d.ops.api import cpu_available

    batch, dim, dstate, height, width = 2, 8, 4, 12, 16
    length = height * width
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, dstate, generator=gen, dtype=torch.float64) - 0.5,
        "B": rand(batch, dstate, length),
        "C": rand(batch, dstate, length),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim, scale=0.1),
    }
    grad_out = rand(batch, dim, length)
    kwargs = dict(delta_softplus=True, height=height, width=width)

    def run(dtype: torch.dtype, dev: torch.device, backend: str) -> list[torch.Tensor]:
        leaves = {k: v.to(dev, dtype).requires_grad_() for k, v in inputs.items()}
        out = selective_scan_2d(**leaves, **kwargs, backend=backend)
        out.backward(grad_out.to(dev, dtype))
        return [out.detach()] + [leaves[k].grad for k in inputs]

    used = "triton" if device.type == "cuda" else "cpu" if cpu_available(torch.empty(0))[0] else "torch"
    print(f"mamba2d {__version__} selfcheck: batch={batch} dim={dim} dstate={dstate} grid={height}x{width}")
    print(f"device: {device}, backend='auto' resolves to '{used}'")
    got = run(torch.float32, device, "auto")
    want = run(torch.float64, torch.device("cpu"), "reference")

    worst = 0.0
    for name, g, w in zip(["output"] + [f"grad {k}" for k in inputs], got, want, strict=True):
        err = ((g.double().cpu() - w).norm() / w.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        print(f"  {name:<16} relative error {err:.2e}")
    ok = worst <= TOLERANCE
    verdict = "OK" if ok else "FAILED"
    print(f"{verdict}: worst relative error {worst:.2e} (tolerance {TOLERANCE:.0e}) vs float64 reference")
    return 0 if ok else 1


def _extract(args: argparse.Namespace) -> int:
    from mamba2d.wsi.encoders import parse_encoder_args
    from mamba2d.wsi.extract import ExtractConfig, extract_slides

    cfg = ExtractConfig(magnification=args.magnification, patch_size=args.patch_size,
                        min_tissue=args.min_tissue, encoder=args.encoder, weights=args.weights,
                        input_size=args.input_size, batch_size=args.batch_size, workers=args.workers,
                        device=args.device, mpp=args.mpp, skip_bad=args.skip_bad,
                        encoder_args=parse_encoder_args(args.encoder_arg), precision=args.precision,
                        compile=args.compile, region_px=args.region_px, shard=args.shard)
    manifest = extract_slides(args.slides, args.out, cfg, progress=not args.no_progress)
    mine = manifest[manifest["slide_id"].isin(manifest.attrs.get("mine", []))]
    counts = mine["status"].value_counts().to_dict()
    shard = manifest.attrs.get("shard", "0/1")
    where = f"shard {shard}: " if shard != "0/1" else ""
    print(f"{where}{len(mine)} slides: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f"; features in {args.out}/features, manifest {args.out}/manifest.csv "
            f"({len(manifest)} slides listed), QC images {args.out}/qc")
    return 0 if counts.get("failed", 0) == 0 else 1


def _demo(args: argparse.Namespace) -> int:
    from mamba2d.bench.demo import DemoSettings, run_demo

    settings = DemoSettings.full() if args.full else DemoSettings()
    if args.epochs is not None:
        settings.epochs = args.epochs
    run_demo(args.out, settings, fmnist_dir=args.fmnist_dir, benchmark_dir=args.benchmark_dir,
             device=args.device, progress=not args.no_progress)
    return 0


def _bench(args: argparse.Namespace) -> int:
    print(f"The scan benchmark is a script; see `python {BENCH_SCRIPT} --help` for its options.")
    if not os.path.isfile(BENCH_SCRIPT):
        print(
            f"{BENCH_SCRIPT} was not found under {os.getcwd()}; it lives in the mamba2d source "
            "repository, so run this command from a checkout's root."
        )
        return 1
    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    saved = sys.argv
    sys.argv = [BENCH_SCRIPT, *extra]
    try:
        runpy.run_path(BENCH_SCRIPT, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _resolve_config(cls, args: argparse.Namespace, given: dict):
    """The run's configuration: defaults < --config file < flags. With --resume, the run's own
    config.yaml with the given flags applied; the training function then refuses any flag that
    contradicts the saved run (only the device, progress output and the test stop may change)."""
    if args.resume:
        out = Path(given["out"]) if "out" in given else None
        if out is None or not (out / "config.yaml").is_file():
            raise ValueError(f"--resume needs --out RUN_DIR of an earlier run (no {out}/config.yaml)")
        cfg = cls.load(out / "config.yaml")
        cfg.stop_after_epochs = None
    else:
        cfg = cls.load(args.config) if args.config else cls()
    # Flags go through the same conversion as a config file's values (e.g. "0,1,2" to [0, 1, 2]).
    cfg = cls.from_dict({**cfg.to_dict(), **given}, source="command line")
    return cfg.check()


def _train(args: argparse.Namespace) -> int:
    from mamba2d.train.config import TrainConfig, parse_model_args
    from mamba2d.train.engine import run_training

    if args.list_models:
        from mamba2d.mil import MODELS

        print("\n".join(sorted(MODELS)))
        return 0
    given = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS and v is not None}
    if args.seed is not None:
        given["seeds"] = [args.seed]
    if args.model_arg:
        given["model_args"] = parse_model_args(args.model_arg)
    if args.no_progress:
        given["progress"] = False
    cfg = _resolve_config(TrainConfig, args, given)
    result = run_training(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if result.get("interrupted"):
        print(f"stopped as asked (--stop-after-epochs); continue with: "
              f"mamba2d train --resume --out {cfg.out}")
        return 0
    from mamba2d.train.evaluate import compare_runs, format_table

    print(format_table(compare_runs([cfg.out])))
    print(f"results in {cfg.out}/ (metrics.json, summary.csv, fold*_seed*/)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mamba2d.train.evaluate import compare_runs, evaluate_run, format_table

    evaluate_run(args.run, args.out, features=args.features, labels=args.labels, device=args.device,
                 patch_size=args.patch_size, skip_bad=args.skip_bad)
    print(format_table(compare_runs([args.out])))
    print(f"predictions and metrics in {args.out}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mamba2d.train.evaluate import compare_runs, format_table

    table = compare_runs(args.runs, part=args.part)
    text = format_table(table)
    print(text)
    if args.out:
        from mamba2d.io import write_text
        from mamba2d.train.rundir import refuse_existing_file

        out = Path(args.out)
        refuse_existing_file(out)
        write_text(out, table.to_csv(index=False) if out.suffix == ".csv" else text + "\n")
    return 0


def _heatmap(args: argparse.Namespace) -> int:
    from mamba2d.wsi.slide_heatmap import run_heatmap, run_heatmaps

    options = dict(level=args.level, max_side=args.max_side, alpha=args.alpha, cmap=args.cmap, blur=args.blur,
                   scale=args.scale, mpp=args.mpp, device=args.device, fold_seed=args.fold_seed,
                   patch_size=args.patch_size)
    if args.slides_csv:
        if args.slide or args.features:
            raise ValueError("give either --slides-csv or --slide with --features, not both")
        rows = run_heatmaps(args.run, args.slides_csv, args.out, **options)
        failed = [r for r in rows if "error" in r]
        print(f"{len(rows) - len(failed)} of {len(rows)} heatmaps in {args.out}/ (index: "
              f"{args.out}/heatmaps.csv)" + (f"; {len(failed)} failed, see heatmaps.csv" if failed else ""))
        return 1 if failed else 0
    if not (args.slide and args.features):
        raise ValueError("give --slide and --features (one slide), or --slides-csv (a batch)")
    info = run_heatmap(args.run, args.slide, args.features, args.out, **options)
    print(f"{info['slide_id']}: {info['model']} {info['prediction']}; heatmap {info['png']}, "
          f"scores {info['csv']}, {info['geojson']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mamba2d.train.predict import predict_run

    summary = predict_run(args.run, args.features, args.out, slides=args.slides, patch_size=args.patch_size,
                          patches_dir=args.patches_dir, device=args.device, fold_seed=args.fold_seed,
                          skip_bad=args.skip_bad, attention=args.attention, progress=not args.no_progress)
    skipped = f"; {len(summary['skipped'])} skipped (see metrics.json)" if summary["skipped"] else ""
    print(f"{summary['n_slides']} slides scored by {len(summary['models'])} model(s): "
          f"{args.out}/predictions.csv{skipped}")
    return 0


_TRAIN_FIELDS: set[str] = set()
_METAVARS = {"features": "DIR", "labels": "CSV", "splits": "CSV|DIR", "out": "RUN_DIR", "folds": "K",
             "epochs": "N", "lr": "LR", "weight_decay": "WD", "accumulate": "N", "early_stopping": "EPOCHS",
             "patch_size": "PIXELS", "n_bins": "N", "alpha_surv": "ALPHA", "val_fraction": "FRACTION",
             "device": "DEVICE", "label_col": "COLUMN", "slide_col": "COLUMN", "case_col": "COLUMN",
             "model": "NAME", "classes": "A,B|FILE", "patches_dir": "DIR",
             "max_grid_cells": "N", "clip_grad": "NORM", "data": "fashion-mnist|DIR",
             "img_size": "PIXELS", "train_limit": "N", "val_limit": "N", "mosaics": "N", "workers": "N",
             "drop_path": "RATE", "head_channels": "N", "batch_size": "N", "opt": "NAME", "min_lr": "LR",
             "warmup_epochs": "N", "warmup_lr": "LR", "sched": "NAME", "ema_decay": "DECAY", "seed": "S",
             "scale_min": "FRACTION", "hflip": "P", "color_jitter": "X", "aa": "POLICY", "reprob": "P",
             "smoothing": "X", "mixup": "ALPHA", "cutmix": "ALPHA"}


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, groups: dict[str, tuple[str, ...]],
                      names_seen: set[str], choices: dict[str, list[str]] | None = None,
                      model_arg_example: str = "") -> None:
    """The flags of a training command: one per field of the config dataclass ``cls``, in argument
    groups, with the field's help and default (flags default to None so that only given ones
    override a --config file); --model-arg in the "model" group; --config, --resume,
    --no-progress and the hidden --stop-after-epochs."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            names_seen.add(name)
            flag = "--" + name.replace("_", "-")
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            unset = default is None or default is False or default in ([], {})
            help_text = f.metadata["help"] + ("" if unset else f" (default: {shown})")
            kw: dict = {"default": None, "help": help_text}
            if f.type == "bool":
                group.add_argument(flag, action="store_const", const=True, **kw)
            elif name == "seeds":
                group.add_argument(flag, metavar="0,1,2", **kw)
            else:
                types = {"int": int, "float": float, "int | None": int, "float | None": float}
                options = (choices or {}).get(name, f.metadata.get("choices"))
                group.add_argument(flag, type=types.get(str(f.type), str), choices=options,
                                   metavar=_METAVARS.get(name), **kw)
        if title == "model":
            example = f" (e.g. --model-arg {model_arg_example})" if model_arg_example else ""
            group.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                               help="model keyword argument, repeatable" + example)
    names_seen.add("stop_after_epochs")
    parser.add_argument("--stop-after-epochs", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="YAML", help="read options from a YAML file (flags override it)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # ArgumentDefaultsHelpFormatter would print "(default: None)" for every flag; the help strings
    # carry the real defaults instead.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_train_parser(sub) -> None:
    from mamba2d.train.config import TrainConfig

    train = sub.add_parser(
        "train",
        help="train a MIL model over folds and seeds; write metrics, predictions, plots, checkpoints",
        description=(
            "Train a MIL model on feature bags. Every fold and seed trains one model with AdamW\n"
            "and a cosine learning rate (one slide per step), keeps the checkpoint with the best\n"
            "validation AUC (classification) or C-index (survival), and evaluates it on the test\n"
            "part. Options can also come from a YAML file (--config); flags override it. The\n"
            "resolved config is saved in the run directory.\n\n"
            "multi-GPU:  torchrun --nproc_per_node=K -m mamba2d train ..."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {
        "inputs": ("features", "labels", "task", "patch_size", "patches_dir", "label_col", "classes",
                   "slide_col", "case_col", "cache", "skip_bad", "grid_snap", "max_grid_cells"),
        "splits": ("splits", "folds", "val_fraction", "allow_leakage"),
        "model": ("model",),
        "optimisation": ("preset", "epochs", "optimizer", "lr", "weight_decay", "tune", "tune_lrs", "seeds",
                         "accumulate",
                         "clip_grad",
                         "balanced_sampling",
                         "early_stopping", "n_bins", "alpha_surv"),
        "hardware": ("device", "precision"),
        "output": ("out", "tensorboard"),
    }
    from mamba2d.mil import MODELS

    _add_config_flags(train, TrainConfig, groups, _TRAIN_FIELDS, {"model": sorted(MODELS)}, "d_model=256")
    optimisation = next(g for g in train._action_groups if g.title == "optimisation")
    optimisation.add_argument("--seed", type=int, default=None, help="one seed (shorthand for --seeds S)")
    model = next(g for g in train._action_groups if g.title == "model")
    model.add_argument("--list-models", action="store_true", help="print the model names and exit")
    train.set_defaults(func=_train)


def _vision_train(args: argparse.Namespace) -> int:
    from mamba2d.train.config import VisionTrainConfig, parse_model_args
    from mamba2d.train.vision import run_vision_training

    given = {k: v for k, v in vars(args).items() if k in _VISION_FIELDS and v is not None}
    if args.model_arg:
        given["model_args"] = parse_model_args(args.model_arg)
    if args.no_progress:
        given["progress"] = False
    cfg = _resolve_config(VisionTrainConfig, args, given)
    result = run_vision_training(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.get("interrupted"):
        print(f"stopped as asked (--stop-after-epochs); continue with: "
              f"mamba2d vision-train --resume --out {cfg.out}")
        return 0
    key = "top1" if cfg.task == "classification" else "miou"
    print(f"{cfg.model} {cfg.task}: final val {key} {result[f'final_val_{key}']:.4f}, best "
          f"{result[f'best_val_{key}']:.4f} (epoch {result['best_epoch']})")
    print(f"results in {cfg.out}/ (metrics.json, history.csv, curves.png, best.pt, last.pt)")
    return 0


_VISION_FIELDS: set[str] = set()


def _add_vision_train_parser(sub) -> None:
    from mamba2d.train.config import VisionTrainConfig

    vt = sub.add_parser(
        "vision-train",
        help="train a 2DVMamba (or any timm) backbone: image classification or mosaic segmentation",
        description=(
            "Train a vision backbone from timm's registry (vmamba2d_tiny, vmamba1d_tiny, ... are\n"
            "registered by mamba2d) with timm's augmentation, mixup/cutmix, losses, optimizer and\n"
            "warm-up + cosine schedule; bf16 autocast on GPU; optional weight EMA; resumable.\n"
            "Classification: the built-in Fashion-MNIST, or an ImageFolder root (train/, val/).\n"
            "Segmentation: an UperNet head on the backbone's four feature maps, trained on\n"
            "Fashion-MNIST mosaics, scored by mIoU. Options can come from a YAML file (--config;\n"
            "configs/imagenet_2dvmamba_tiny.yaml is the paper's ImageNet recipe).\n\n"
            "multi-GPU:  torchrun --nproc_per_node=K -m mamba2d vision-train ..."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {
        "task and data": ("task", "data", "img_size", "train_limit", "val_limit", "mosaics", "workers"),
        "model": ("model", "drop_path", "head_channels"),
        "optimisation": ("epochs", "batch_size", "opt", "lr", "min_lr", "warmup_epochs", "warmup_lr",
                         "weight_decay", "sched", "clip_grad", "ema", "ema_decay", "seed"),
        "augmentation": ("scale_min", "hflip", "color_jitter", "aa", "reprob", "smoothing", "mixup",
                         "cutmix"),
        "hardware": ("device", "precision"),
        "output": ("out",),
    }
    _add_config_flags(vt, VisionTrainConfig, groups, _VISION_FIELDS, model_arg_example="backend=torch")
    vt.set_defaults(func=_vision_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba2d",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mamba2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="build the spatial benchmark, train 2DMambaMIL, MambaMIL and ABMIL, report (minutes on a CPU)",
        description=(
            "The main job on the built-in benchmark: slides made of real Fashion-MNIST images whose\n"
            "label is the 2D arrangement of a few 'lesion' tiles (scattered, cluster, vertical line).\n"
            "Builds the benchmark once (cached), trains 2DMambaMIL, MambaMIL (1D) and ABMIL through\n"
            "the `mamba2d train` pipeline, prints AUC / accuracy / macro-F1 on the test slides, and\n"
            "writes a report: comparison table, ROC plot, attention heatmaps on test mosaics.\n"
            "Uses a GPU when one is present. --full runs the study: every model, classification\n"
            "and survival, five seeds (hours on a CPU)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default="mamba2d-demo", help="output folder (default: ./mamba2d-demo)")
    demo.add_argument("--full", action="store_true", help="the complete study instead of the quick demo")
    demo.add_argument("--epochs", type=int, help="training epochs per model (default: 10; --full: 20)")
    demo.add_argument("--fmnist-dir", help="Fashion-MNIST idx folder, if not in the usual places")
    demo.add_argument("--benchmark-dir", help="where to build or find the benchmark (default: a cache)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    ext = sub.add_parser(
        "extract",
        help="slides to TRIDENT-style feature h5 files: tissue mask, tiling, frozen encoder",
        description=(
            "Whole-slide images (.svs, .tif, .ndpi, .mrxs, ...) to patch features, offline.\n"
            "Per slide: a tissue mask (Otsu on saturation, clean-up) with a QC picture in OUT/qc/,\n"
            "non-overlapping patches on the level-0 lattice at --magnification, read a region at a\n"
            "time by --workers processes, a frozen encoder (channels-last, bf16 where native), and\n"
            "OUT/features/<slide>.h5 (features, coords + patch-size attributes) that\n"
            "`mamba2d train --features OUT/features` reads as is. Each slide gets a record in\n"
            "OUT/manifest/, merged into OUT/manifest.csv; a rerun skips finished slides.\n"
            "Many processes: `torchrun --nproc_per_node=N -m mamba2d extract ...` (one GPU per\n"
            "rank) or --shard I/N / --shard slurm (job arrays) split the slides between them.\n"
            "Slides are read with tiffslide (or openslide)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ext.add_argument("--slides", required=True, help="a folder of slides, or a CSV with path[,slide_id,mpp]")
    ext.add_argument("--out", required=True, help="output folder")
    ext.add_argument("--magnification", type=float, default=20.0, help="target magnification (default 20)")
    ext.add_argument("--patch-size", type=int, default=256,
                     help="patch side at that magnification (default 256)")
    ext.add_argument("--min-tissue", type=float, default=0.5,
                     help="keep patches at least this fraction tissue (default 0.5)")
    ext.add_argument("--encoder", default="efficientnet_lite0",
                     help="efficientnet_lite0 (packaged ImageNet weights), timm:NAME or torchscript:PATH")
    ext.add_argument("--weights",
                     help="local weight file: a state dict read with torch.load(weights_only=True), or "
                          ".safetensors (needed for timm:NAME; optional for efficientnet_lite0)")
    ext.add_argument("--encoder-arg", action="append", metavar="KEY=VALUE",
                     help="keyword argument for timm.create_model, value read as YAML (repeatable), e.g. "
                          "UNI: --encoder-arg img_size=224 --encoder-arg init_values=1e-5 "
                          "--encoder-arg dynamic_img_size=true")
    ext.add_argument("--input-size", type=int, help="encoder input side (default: the encoder's, 224)")
    ext.add_argument("--batch-size", type=int, help="patches per batch (default: 256 on CUDA, 64 on CPU)")
    ext.add_argument("--workers", type=int,
                     help="reader processes (default: on CUDA the cores less one, at most 16; on CPU 1)")
    ext.add_argument("--device", default="auto",
                     help="auto, cpu, cuda or cuda:N (under torchrun: each rank's own GPU)")
    ext.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                     help="encoder arithmetic: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    ext.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder (slow start, faster on some CPUs)")
    ext.add_argument("--region-px", type=int, default=2048,
                     help="side of the regions read at once, in pixels (default 2048)")
    ext.add_argument("--shard", metavar="I/N|slurm",
                     help="extract only shard I of N (0-based), or the SLURM array task's shard "
                          "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)")
    ext.add_argument("--mpp", type=float, help="level-0 microns per pixel, for slides that do not record it")
    ext.add_argument("--skip-bad", action="store_true",
                     help="record unreadable slides in the manifest and go on")
    ext.add_argument("--no-progress", action="store_true",
                     help="no progress bars: one plain line per slide (patches/s and stage breakdown)")
    ext.set_defaults(func=_extract)

    check = sub.add_parser(
        "selfcheck",
        help="run the 2D scan on small random inputs and check it against the reference",
        description=(
            "Run selective_scan_2d (backend='auto') forward and backward on random inputs "
            "(batch 2, dim 8, dstate 4, 12x16 grid, seed 0) and compare the output and every "
            f"gradient with the float64 reference backend. Exits 1 if a relative error exceeds "
            f"{TOLERANCE:.0e}."
        ),
    )
    check.set_defaults(func=_selfcheck)

    bench = sub.add_parser(
        "bench",
        help=f"run the scan benchmark ({BENCH_SCRIPT}, from a source checkout)",
        description=(
            f"Run {BENCH_SCRIPT} from the current directory, passing on any further arguments. "
            f"Put them after '--', e.g. `mamba2d bench -- --help`."
        ),
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=_bench)

    _add_train_parser(sub)
    _add_vision_train_parser(sub)

    ev = sub.add_parser(
        "eval",
        help="evaluate a trained run on its test parts or on a new cohort",
        description=("Evaluate every model of a run (fold*_seed*/best.pt). Without --features/--labels, "
                     "each model is scored on its own split's test part; with them, on every labelled slide "
                     "of the new cohort (an external test set)."),
    )
    ev.add_argument("--run", required=True, help="run directory written by `mamba2d train`")
    ev.add_argument("--out", required=True, help="folder for predictions, metrics and plots")
    ev.add_argument("--features", help="features folder of a new cohort")
    ev.add_argument("--labels", help="label CSV of a new cohort")
    ev.add_argument("--patch-size", type=int, help="level-0 patch size, when the files lack it")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ev.add_argument("--skip-bad", action="store_true", help="skip unreadable slides with a warning")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser(
        "compare",
        help="one table of several runs: mean ± std over folds and seeds",
        description="Print the headline metrics of runs (or eval outputs) side by side, mean ± std.",
    )
    cmp.add_argument("runs", nargs="+", help="run directories (or `mamba2d eval` outputs)")
    cmp.add_argument("--part", default="test", choices=("test", "val"), help="which part to compare")
    cmp.add_argument("--out", help="also write the table: .csv for CSV, anything else for Markdown")
    cmp.set_defaults(func=_compare)

    hm = sub.add_parser(
        "heatmap",
        help="draw a trained model's attention over a whole slide (PNG, plus CSV and GeoJSON scores)",
        description=(
            "Run one model of a training run on a slide's feature bag and paint each patch's\n"
            "attention weight over the slide. Writes OUT (the slide beside the overlay, with a\n"
            "colour bar and the prediction in the title) and, beside it, OUT.csv (x,y,width,height,\n"
            "score per patch: level-0 pixels and the raw attention weight) and OUT.geojson (the\n"
            "patches as square tiles with an 'attention' measurement; drag it onto the slide in\n"
            "QuPath).\n\n"
            "The bag's coordinates must be level-0 pixels of this slide, as CLAM and TRIDENT write\n"
            "them. Colours are percentiles of the patches' attention (--scale max: attention / its\n"
            "maximum, linear)."),
        epilog=("example:\n  mamba2d heatmap --run runs/2d --slide slides/s1.svs --features feats/s1.h5 "
                "--out s1.png"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    need = hm.add_argument_group("inputs and output")
    need.add_argument("--run", required=True, metavar="RUN_DIR",
                      help="run directory written by `mamba2d train`")
    need.add_argument("--slide", metavar="PATH", help="the whole-slide image (.svs, .tif, ...)")
    need.add_argument("--features", metavar="H5",
                      help="the slide's feature bag (CLAM/TRIDENT .h5, or CLAM .pt with its patches h5)")
    need.add_argument("--slides-csv", metavar="CSV",
                      help="a batch instead: a CSV with columns slide,features[,slide_id] (paths relative to "
                           "the CSV); --out is then a new folder")
    need.add_argument("--out", required=True, metavar="PNG|DIR",
                      help="output PNG (OUT.csv and OUT.geojson go beside it), or the folder of a batch")
    look = hm.add_argument_group("drawing")
    look.add_argument("--level", default="auto", metavar="auto|K",
                      help="draw on a thumbnail of at most --max-side pixels (auto), or on pyramid level K "
                           "read whole (default: auto)")
    look.add_argument("--max-side", type=int, default=2048, metavar="PIXELS",
                      help="longer side of the auto thumbnail (default: 2048)")
    look.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0 to 1 (default: 0.5)")
    look.add_argument("--cmap", default="jet", metavar="NAME",
                      help="matplotlib colour map, e.g. jet, viridis, inferno, coolwarm (default: jet)")
    look.add_argument("--blur", action="store_true",
                      help="smooth the heatmap inside the tissue (Gaussian, sigma half a patch)")
    look.add_argument("--scale", default="percentile", choices=("percentile", "max"),
                      help="colour by percentile among the patches, or by attention / max "
                           "(default: percentile)")
    other = hm.add_argument_group("model and slide")
    other.add_argument("--fold-seed", metavar="foldK_seedS",
                       help="which model of the run (default: the first, e.g. fold0_seed0)")
    other.add_argument("--mpp", type=float, metavar="X",
                       help="level-0 microns per pixel, when the slide lacks it (for the scale bar)")
    other.add_argument("--patch-size", type=int, metavar="PIXELS",
                       help="level-0 patch size, when the feature file lacks it (default: the run's)")
    other.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    hm.set_defaults(func=_heatmap)

    pr = sub.add_parser(
        "predict",
        help="score slides without labels with a trained run's models (ensemble over folds and seeds)",
        description=(
            "Run every model of a training run (or the one --fold-seed names) on the feature bags of a\n"
            "folder, no labels needed. Writes OUT/predictions.csv (the mean over models: class\n"
            "probabilities and predicted class, or risk and survival curve), OUT/<foldK_seedS>.csv per\n"
            "model, and with --attention each slide's attention weights (OUT/attention/<slide>.csv)."),
        epilog="example:\n  mamba2d predict --run runs/2d --features new_cohort/features --out preds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("--run", required=True, metavar="RUN_DIR",
                    help="run directory written by `mamba2d train`")
    pr.add_argument("--features", required=True, metavar="DIR", help="folder of feature bags to score")
    pr.add_argument("--out", required=True, metavar="DIR", help="a new folder for the predictions")
    pr.add_argument("--slides", metavar="CSV", help="score only the slides in this CSV's slide_id column")
    pr.add_argument("--fold-seed", metavar="foldK_seedS",
                    help="one model of the run (default: all, averaged)")
    pr.add_argument("--attention", action="store_true", help="also write each slide's attention weights")
    pr.add_argument("--patch-size", type=int, metavar="PIXELS",
                    help="level-0 patch size, when the files lack it")
    pr.add_argument("--patches-dir", metavar="DIR",
                    help="CLAM's patches/ folder, when not beside the features")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    pr.add_argument("--skip-bad", action="store_true",
                    help="skip unreadable or invalid slides with a warning")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Bad input is reported as one line naming the file or field, not a traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        one_line = " ".join(str(msg).split())  # messages quoting other libraries may hold newlines
        print(f"mamba2d {args.command}: error: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
