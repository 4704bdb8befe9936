"""The ``mamba2d`` command line: one module per subcommand, each adding its own parser
(``add_parser``) with its handler; this module builds the top-level parser and dispatches."""

from __future__ import annotations

import argparse
import sys

from mamba2d import __version__
from mamba2d.cli import (
    bench,
    compare,
    demo,
    evaluate,
    extract,
    heatmap,
    predict,
    selfcheck,
    train,
    vision_train,
)

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

#: The subcommand modules, in the order `mamba2d --help` lists them.
COMMANDS = (demo, extract, selfcheck, bench, train, vision_train, evaluate, compare, heatmap, predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mamba2d",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mamba2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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

