"""``mamba2d eval``: a trained run's models on their test parts, or on a new cohort."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
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
    ev.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mamba2d.train.evaluate import compare_runs, evaluate_run, format_table

    evaluate_run(args.run, args.out, features=args.features, labels=args.labels, device=args.device,
                 patch_size=args.patch_size, skip_bad=args.skip_bad)
    print(format_table(compare_runs([args.out])))
    print(f"predictions and metrics in {args.out}/")
    return 0
