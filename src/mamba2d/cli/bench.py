"""``mamba2d bench``: the scan benchmark script of a source checkout, with the arguments passed on."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from mamba2d.cli.common import Subparsers

#: The benchmark script, relative to a source checkout's root (it is not installed with the package).
BENCH_SCRIPT = os.path.join("benchmarks", "scan.py")


def add_parser(sub: Subparsers) -> None:
    bench = sub.add_parser(
        "bench",
        help=f"run the scan benchmark ({BENCH_SCRIPT}, from a source checkout)",
        description=(
            f"Run {BENCH_SCRIPT} from the current directory, passing on any further arguments. "
            f"Put them after '--', e.g. `mamba2d bench -- --help`."
        ),
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
