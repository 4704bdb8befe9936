"""Run one forward+backward of the Triton scan (a target for profilers such as ncu).

    python benchmarks/run_once.py 1,256,16,256,256 [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import fwd_bwd, make_inputs, runner  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shape")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(","))
    call = runner("triton", shape)
    t = make_inputs(shape, torch.float32, "cuda")
    dout = torch.randn_like(t["u"])
    for _ in range(a.repeat):
        fwd_bwd(call, t, dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
