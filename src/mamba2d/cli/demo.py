"""``mamba2d demo``: the built-in spatial benchmark, trained and reported end to end."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import Subparsers

DESCRIPTION = """\
The main job on the built-in benchmark: slides made of real Fashion-MNIST images whose
label is the 2D arrangement of a few 'lesion' tiles (scattered, cluster, vertical line).
Builds the benchmark once (cached), trains 2DMambaMIL, MambaMIL (1D) and ABMIL through
the `mamba2d train` pipeline, prints AUC / accuracy / macro-F1 on the test slides, and
writes a report: comparison table, ROC plot, attention heatmaps on test mosaics.
Uses a GPU when one is present. --full runs the study: every model, classification
and survival, five seeds (hours on a CPU)."""


def add_parser(sub: Subparsers) -> None:
    demo = sub.add_parser(
        "demo",
        help="build the spatial benchmark, train 2DMambaMIL, MambaMIL and ABMIL, report (minutes on a CPU)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default="mamba2d-demo", help="output folder (default: ./mamba2d-demo)")
    demo.add_argument("--full", action="store_true", help="the complete study instead of the quick demo")
    demo.add_argument("--epochs", type=int, help="training epochs per model (default: 10; --full: 20)")
    demo.add_argument("--fmnist-dir", help="Fashion-MNIST idx folder, if not in the usual places")
    demo.add_argument("--benchmark-dir", help="where to build or find the benchmark (default: a cache)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mamba2d.bench.demo import DemoSettings, run_demo

    settings = DemoSettings.full() if args.full else DemoSettings()
    if args.epochs is not None:
        settings.epochs = args.epochs
    run_demo(args.out, settings, fmnist_dir=args.fmnist_dir, benchmark_dir=args.benchmark_dir,
             device=args.device, progress=not args.no_progress)
    return 0
