"""`mamba2d train` with DistributedDataParallel replaced by the bare model: every rank steps on its
own slides' gradients and nothing is averaged. The DDP test runs it to prove that it would notice a
broken all-reduce."""

import sys

from torch import nn

nn.parallel.DistributedDataParallel = lambda module, **kwargs: module

from mamba2d.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
