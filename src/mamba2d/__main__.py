"""``python -m mamba2d``: the command line (also what ``torchrun -m mamba2d train ...`` runs)."""

import sys

from mamba2d.cli import main

sys.exit(main())
