"""2DMambaMIL: patch features back on the slide's 2D grid, Mamba2D layers, attention pooling."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from mamba2d.mil.common import MILOutput, check_bag, float32_head, heads_output
from mamba2d.mil.grid import PatchGrid, Snap, patch_grid
from mamba2d.nn import Mamba2DBlock


class TwoDMambaMIL(nn.Module):
    """2DMambaMIL (Zhang et al., CVPR 2025) for one slide at a time.

    ``forward(features (N, in_dim), coords (N, 2) level-0 (x, y) pixels, patch_size, grid=None)``:

    1. Linear(in_dim, d_model) + GELU + Dropout on every patch.
    2. The patches go back onto the slide's tight grid (coords / patch_size, minus the minimum;
       see :func:`mamba2d.mil.grid.patch_grid`, ``snap`` and ``max_grid_cells``), or onto ``grid``
       when the caller placed them already (the training pipeline does, at load time).
       Cells without tissue hold a learnable pad token (``pad="learnable"``, initialised uniform in
       [0, 1) as in the paper's code) or zeros (``pad="zeros"``).
    3. Optional positional embedding: Linear(2, d_model) of the normalised (row, col), added on
       tissue cells (off by default; the paper found it hurts).
    4. ``n_layers`` pre-norm residual Mamba2D blocks over the whole grid (pads included).
    5. LayerNorm, then attention pooling Linear(d_model, 128)-Tanh-Linear(128, 1). The softmax runs
       over tissue cells only; ``pool_pads=True`` pools over pads too, as the official code does.
       This head runs in float32 even under autocast.
    6. Classification head Linear(d_model, n_classes), or survival hazards over ``n_classes`` bins.

    ``scan="raster"`` is the 1D ablation: the very same model, but the grid (pads included) is
    scanned as one row in raster order, so "2D vs 1D" differs only in the scan.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        task: Literal["classification", "survival"] = "classification",
        d_model: int = 128,
        n_layers: int = 1,
        d_state: int = 16,
        expand: int = 2,
        dropout: float = 0.25,
        pad: Literal["learnable", "zeros"] = "learnable",
        pool_pads: bool = False,
        pos_embed: bool = False,
        conv: Literal["1d", "2d"] = "1d",
        directions: Literal[1, 2, 4] = 1,
        snap: Snap = "auto",
        max_grid_cells: int | None = None,
        scan: Literal["2d", "raster"] = "2d",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if task not in ("classification", "survival"):
            raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
        if scan not in ("2d", "raster"):
            raise ValueError(f"scan must be '2d' or 'raster', got {scan!r}")
        if pad not in ("learnable", "zeros"):
            raise ValueError(f"pad must be 'learnable' or 'zeros', got {pad!r}")
        self.in_dim, self.task, self.d_model = in_dim, task, d_model
        self.pool_pads, self.snap, self.scan = pool_pads, snap, scan
        self.max_grid_cells = max_grid_cells
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.pad_token = nn.Parameter(torch.rand(d_model)) if pad == "learnable" else None
        self.pos_embed = nn.Linear(2, d_model) if pos_embed else None
        self.layers = nn.ModuleList(
            Mamba2DBlock(d_model, d_state=d_state, expand=expand, dt_rank=math.ceil(d_model / 16), conv=conv,
                         directions=directions, backend=backend)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.Sequential(nn.Linear(d_model, 128), nn.Tanh(), nn.Linear(128, 1))
        self.head = nn.Linear(d_model, n_classes)

    #: The model reads the patches' 2D layout: the pipeline places bags on grids for it.
    uses_grid = True

    def forward(self, features: torch.Tensor, coords: torch.Tensor, patch_size: float,
                return_embedding: bool = False, grid: PatchGrid | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        if grid is None:
            grid = patch_grid(coords, patch_size, snap=self.snap, max_cells=self.max_grid_cells)
        elif grid.rows.shape[0] != features.shape[0]:
            raise ValueError(f"grid places {grid.rows.shape[0]} patches but features has {features.shape[0]}")
        grid = grid.to(features.device)
        H, W = grid.height, grid.width
        h = self.embed(features)
        if self.pos_embed is not None:
            pos = torch.stack([grid.rows / max(H - 1, 1), grid.cols / max(W - 1, 1)], dim=1).to(h.dtype)
            h = h + self.pos_embed(pos)
        fill = self.pad_token.to(h.dtype) if self.pad_token is not None else h.new_zeros(self.d_model)
        canvas = fill.expand(H * W, self.d_model).clone()
        canvas = canvas.index_copy(0, grid.flat, h)
        # "raster": the same grid, pads included, scanned as one 1 x (H * W) row (the 1D ablation).
        shape = (1, 1, H * W) if self.scan == "raster" else (1, H, W)
        canvas = canvas.reshape(*shape, self.d_model)
        for layer in self.layers:
            canvas = layer(canvas)
        with float32_head(canvas):
            cells = self.norm(canvas.reshape(H * W, self.d_model).to(self.norm.weight.dtype))
            scores = self.attention(cells).squeeze(-1)  # (H * W,)
            if not self.pool_pads:
                tissue = torch.zeros(H * W, dtype=torch.bool, device=scores.device)
                tissue[grid.flat] = True
                scores = scores.masked_fill(~tissue, float("-inf"))
            weights = scores.softmax(dim=0)
            embedding = weights @ cells
            logits = self.head(embedding)
        return heads_output(logits, self.task, weights[grid.flat], embedding if return_embedding else None)
