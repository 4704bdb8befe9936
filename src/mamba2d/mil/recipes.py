"""Training recipes: what `mamba2d train --model X` uses when no flag says otherwise.

Every model has a ``default`` recipe (its most robust settings known so far, from the sensitivity
study of docs/benchmark.md, which trains each model over learning rates, convolutions and schedules
on a family of spatial rules and seeds; its state and open questions are written there) and a
``paper`` recipe (the settings the 2DMamba paper trained every model with: AdamW, lr 1e-4, weight
decay 1e-5, 20 epochs, each model's published architecture). Flags, a ``--config`` file and
``--model-arg`` override a recipe field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings and model arguments for one model. ``note`` says where they come from."""

    lr: float
    epochs: int
    weight_decay: float = 1e-5
    model_args: dict[str, Any] = field(default_factory=dict)
    note: str = ""


PAPER = Recipe(lr=1e-4, epochs=20, weight_decay=1e-5,
               note="the 2DMamba paper's training settings (AdamW, lr 1e-4, wd 1e-5, 20 epochs)")

#: Recipes per model: ``default`` and ``paper``. Models without an entry use PAPER for both.
RECIPES: dict[str, dict[str, Recipe]] = {
    "2dmambamil": {
        "default": Recipe(lr=5e-4, epochs=20, model_args={"conv": "2d"},
                          note="provisional (docs/benchmark.md, sensitivity study): conv 2d at lr 5e-4 "
                               "lifted 2dmambamil from chance on 2D rules where the paper's conv 1d at lr "
                               "1e-4 failed, and was the only default to learn a core 2D task instance; "
                               "not yet validated on every rule"),
        "paper": Recipe(lr=1e-4, epochs=20, model_args={"conv": "1d"}, note=PAPER.note),
    },
}

PRESETS: tuple[str, ...] = ("default", "paper")


def recipe_for(model: str, preset: str = "default") -> Recipe:
    """The recipe of ``model`` under ``preset`` (``default`` or ``paper``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return RECIPES.get(model, {}).get(preset, PAPER)
