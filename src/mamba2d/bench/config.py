"""What a benchmark depends on: its configuration, presets, parts, random streams and cache folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mamba2d.bench.rules import CLASS_NAMES, RULES
from mamba2d.data.images import FMNIST_CLASSES
from mamba2d.io import JSONFileError, read_json

__all__ = ["BENCHMARK_VERSION", "IMAGE_SPLIT", "PARTS", "PRESETS", "BenchmarkConfig", "BenchmarkError",
           "default_benchmark_dir", "random_stream", "read_benchmark_json"]

#: Bumped whenever the generator changes what a config produces; part of the config hash.
BENCHMARK_VERSION = 1
PARTS: tuple[str, ...] = ("train", "val", "test")
#: Which image split each benchmark part draws from: train and val never see test images.
IMAGE_SPLIT = {"train": "train", "val": "train", "test": "test"}
PART_CODE = {"train": 0, "val": 1, "test": 2}
TASK_CODE = {"classification": 0, "survival": 1}
# Stream ids, so that the per-purpose random generators never share a stream.
S_LAYOUT, S_IMAGES, S_LABELS, S_POOL, S_SURV = 11, 12, 13, 14, 15


class BenchmarkError(ValueError):
    """A benchmark folder or configuration problem: invalid config, or a folder built differently."""


def random_stream(*key: int) -> np.random.Generator:
    """The generator of one purpose and item, e.g. ``random_stream(S_LAYOUT, seed, task, part, i)``."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a benchmark depends on; the same config (and encoder) gives the same benchmark.

    Sizes: ``n_train``/``n_val``/``n_test`` slides; grids of H x W cells with H, W uniform in
    [``grid_min``, ``grid_max``]; ``tissue_min``..``tissue_max``: accepted tissue fraction of the grid.
    Tiles: Fashion-MNIST class indices (:data:`mamba2d.data.images.FMNIST_CLASSES`) for
    ``lesion_class``, ``decoy_class`` and ``background_classes``; ``pool_per_class`` unique images
    per class and image split (the cap on encoder work). Lesion count k is uniform in
    [``lesion_min``, ``lesion_max``] for every class; with probability ``decoy_prob`` a slide also
    holds a decoy group of the same count distribution in a random one of the class arrangements.
    ``classes``: the layout rules (:data:`mamba2d.bench.rules.RULES`) that are the classes, in
    label order. ``patch_size_level0``: pixels per cell in the written coords.
    ``encoder_input_size``: the side tiles are resized to for the default encoder. Survival:
    ``survival_scale_months``, ``survival_beta``, ``survival_shape`` (Weibull), ``survival_levels``
    (how many distinct cluster fractions; 0 = continuous) and the target ``censoring_rate``.
    ``fmnist_dir``: where Fashion-MNIST is (None: the usual places); not part of the identity.
    """

    task: Literal["classification", "survival"] = "classification"
    n_train: int = 240
    n_val: int = 60
    n_test: int = 120
    grid_min: int = 16
    grid_max: int = 28
    seed: int = 0
    fmnist_dir: str | None = None
    encoder_input_size: int = 112
    lesion_min: int = 6
    lesion_max: int = 9
    lesion_class: int = 5  # Sandal: linearly separable from the clothing background (probe ~100 %)
    decoy_class: int = 8  # Bag: distinct from both, so "any odd-looking cluster" is not the rule
    background_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 6)
    decoy_prob: float = 0.0
    pool_per_class: int = 250
    tissue_min: float = 0.35
    tissue_max: float = 0.85
    patch_size_level0: int = 224
    survival_scale_months: float = 150.0
    survival_beta: float = 3.0
    survival_shape: float = 1.5
    survival_levels: int = 3
    censoring_rate: float = 0.4
    classes: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        # JSON round trips give lists; the identity must not depend on that.
        object.__setattr__(self, "background_classes", tuple(int(c) for c in self.background_classes))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BenchmarkConfig:
        """A named configuration from :data:`PRESETS` (``demo``, ``full``) with field overrides."""
        if name not in PRESETS:
            raise BenchmarkError(f"no benchmark preset {name!r}; presets are {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides).validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchmarkConfig:
        """Rebuild from :meth:`to_dict` output (e.g. ``benchmark.json["config"]``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BenchmarkError(f"unknown benchmark config field(s): {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON types. ``classes`` is left out at its default, so that the files and
        digests of benchmarks built before the field existed stay the same."""
        out = dataclasses.asdict(self)
        out["background_classes"] = list(self.background_classes)
        if self.classes == CLASS_NAMES:
            del out["classes"]
        else:
            out["classes"] = list(self.classes)
        return out

    def identity(self) -> dict[str, Any]:
        """The fields that change the benchmark (everything but where the images are read from)."""
        out = self.to_dict()
        out.pop("fmnist_dir")
        out["version"] = BENCHMARK_VERSION
        return out

    def digest(self) -> str:
        """A 12-hex-digit hash of :meth:`identity`, for cache folder names."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def n_slides(self) -> dict[str, int]:
        """Slides per part, e.g. ``{"train": 240, "val": 60, "test": 120}``."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def validate(self) -> BenchmarkConfig:
        """Raise :class:`BenchmarkError` naming the first invalid field; returns self."""
        def fail(msg: str) -> None:
            raise BenchmarkError(f"benchmark config: {msg}")

        if self.task not in TASK_CODE:
            fail(f"task must be 'classification' or 'survival', got {self.task!r}")
        for name in ("n_train", "n_val", "n_test", "grid_min", "grid_max", "seed", "lesion_min", "lesion_max",
                     "pool_per_class", "patch_size_level0", "encoder_input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                fail(f"{name} must be a non-negative int, got {value!r}")
        unknown = [c for c in self.classes if c not in RULES]
        if len(self.classes) < 2 or unknown or len(set(self.classes)) != len(self.classes):
            fail(f"classes must be at least two distinct layout rules of {list(RULES)}, got "
                 f"{list(self.classes)}")
        if self.n_train < len(self.classes):
            fail(f"n_train must be at least {len(self.classes)} (one slide per class), got {self.n_train}")
        if self.lesion_min < 3:
            # Two tiles cannot tell a cluster from a line, and a 3-tile cluster must be an L.
            fail(f"lesion_min must be >= 3, got {self.lesion_min}")
        if self.lesion_max < self.lesion_min:
            fail(f"lesion_max ({self.lesion_max}) < lesion_min ({self.lesion_min})")
        # Empirical bounds under which tissue masks fitting every pattern are found quickly.
        if self.grid_min < self.lesion_max + 7 or 0.6 * self.grid_min ** 2 < 12 * self.lesion_max + 10:
            fail(f"grid_min ({self.grid_min}) is too small for lesion_max {self.lesion_max}: need "
                 f"grid_min >= lesion_max + 7 and 0.6 grid_min^2 >= 12 lesion_max + 10")
        if not self.grid_min <= self.grid_max <= 128:
            fail(f"need grid_min <= grid_max <= 128, got {self.grid_min}..{self.grid_max}")
        if not 0.1 <= self.tissue_min < self.tissue_max <= 0.95:
            fail(f"need 0.1 <= tissue_min < tissue_max <= 0.95, got {self.tissue_min}..{self.tissue_max}")
        classes = [self.lesion_class, self.decoy_class, *self.background_classes]
        if not self.background_classes or len(set(classes)) != len(classes):
            fail(f"lesion_class, decoy_class and background_classes must be distinct, got {classes}")
        if any(not 0 <= c < len(FMNIST_CLASSES) for c in classes):
            fail(f"image classes must be in 0..{len(FMNIST_CLASSES) - 1}, got {classes}")
        if not 0.0 <= self.decoy_prob <= 1.0:
            fail(f"decoy_prob must be in [0, 1], got {self.decoy_prob}")
        if self.pool_per_class < 1 or self.patch_size_level0 < 1:
            fail("pool_per_class and patch_size_level0 must be positive")
        if not 0.05 <= self.censoring_rate <= 0.9:
            fail(f"censoring_rate must be in [0.05, 0.9], got {self.censoring_rate}")
        if self.survival_levels == 1 or self.survival_levels < 0:
            fail(f"survival_levels must be 0 (continuous) or at least 2, got {self.survival_levels}")
        if min(self.survival_scale_months, self.survival_beta, self.survival_shape) <= 0:
            fail("survival_scale_months, survival_beta and survival_shape must be positive")
        return self


#: ``demo`` (the defaults): 420 slides of 16..28 cells a side, 6..9 lesion tiles, no decoys, built
#: in under a minute on 2 CPU cores. ``hard``: grids up to 48 cells, 4..9 lesions, and a decoy group
#: in half the slides. ``full``: ``hard`` with twice the slides and grids up to 64 cells.
PRESETS: dict[str, BenchmarkConfig] = {
    "demo": BenchmarkConfig(),
    "hard": BenchmarkConfig(grid_max=48, lesion_min=4, decoy_prob=0.5),
    "full": BenchmarkConfig(n_train=480, n_val=120, n_test=240, grid_min=16, grid_max=64, lesion_min=4,
                            decoy_prob=0.5, pool_per_class=500),
}


def read_benchmark_json(path: Path) -> dict[str, Any]:
    """A benchmark folder's JSON description (``benchmark.json``, ``build-config.json``).

    Raises :class:`BenchmarkError` naming the file when it is unreadable or not a JSON object.
    """
    try:
        obj = read_json(path)
    except JSONFileError as exc:
        raise BenchmarkError(f"{exc}; delete the folder to rebuild it") from exc
    if not isinstance(obj, dict):
        raise BenchmarkError(f"{path}: not a benchmark description")
    return obj


def _cache_root() -> Path:
    env = os.environ.get("MAMBA2D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mamba2d"


def default_benchmark_dir(config: BenchmarkConfig | None = None) -> Path:
    """``$MAMBA2D_CACHE/benchmark-<digest>`` (default cache ``~/.cache/mamba2d``) for ``config``
    (default: the demo config). The digest covers every field but ``fmnist_dir``."""
    config = config if config is not None else BenchmarkConfig()
    return _cache_root() / f"benchmark-{config.validate().digest()}"
