"""``mamba2d predict``: slides without labels scored by a trained run's models."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import Subparsers

DESCRIPTION = """\
Run every model of a training run (or the one --fold-seed names) on the feature bags of a
folder, no labels needed. Writes OUT/predictions.csv (the mean over models: class
probabilities and predicted class, or risk and survival curve), OUT/<foldK_seedS>.csv per
model, and with --attention each slide's attention weights (OUT/attention/<slide>.csv)."""


def add_parser(sub: Subparsers) -> None:
    pr = sub.add_parser(
        "predict",
        help="score slides without labels with a trained run's models (ensemble over folds and seeds)",
        description=DESCRIPTION,
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
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mamba2d.train.predict import predict_run

    summary = predict_run(args.run, args.features, args.out, slides=args.slides, patch_size=args.patch_size,
                          patches_dir=args.patches_dir, device=args.device, fold_seed=args.fold_seed,
                          skip_bad=args.skip_bad, attention=args.attention, progress=not args.no_progress)
    skipped = f"; {len(summary['skipped'])} skipped (see metrics.json)" if summary["skipped"] else ""
    print(f"{summary['n_slides']} slides scored by {len(summary['models'])} model(s): "
          f"{args.out}/predictions.csv{skipped}")
    return 0
