"""Where a flattened token sits on the grid, and which way each pass runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScanLayout:
    """The grid and the scan directions of one 2D selective scan.

    Tokens are flattened row-major: token ``l = i * width + j`` is cell (row i, column j).

    - ``flip_h``: horizontal recurrences run right to left instead of left to right.
    - ``flip_v``: vertical recurrences run bottom to top instead of top to bottom.
    - ``transpose``: the vertical pass runs first and the horizontal pass second.

    The default (all False) has its origin at the top-left and scans each row, then each column.
    """

    height: int
    width: int
    flip_h: bool = False
    flip_v: bool = False
    transpose: bool = False

    @property
    def length(self) -> int:
        return self.height * self.width
