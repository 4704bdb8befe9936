"""``mamba2d compare``: one table of several runs, mean ± std over folds and seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from mamba2d.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    cmp = sub.add_parser(
        "compare",
        help="one table of several runs: mean ± std over folds and seeds",
        description="Print the headline metrics of runs (or eval outputs) side by side, mean ± std.",
    )
    cmp.add_argument("runs", nargs="+", help="run directories (or `mamba2d eval` outputs)")
    cmp.add_argument("--part", default="test", choices=("test", "val"), help="which part to compare")
    cmp.add_argument("--out", help="also write the table: .csv for CSV, anything else for Markdown")
    cmp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
