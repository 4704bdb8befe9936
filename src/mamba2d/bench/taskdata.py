"""Building a spatial task's dataset: TRIDENT-style h5 bags, labels, splits and a description, from
the task layouts of :mod:`mamba2d.bench.tasks` and a feature source.

Feature sources (``TaskConfig.source``):

* ``fmnist``: each tile shows a Fashion-MNIST image of its cell's class (train images for train and
  val slides, test images for test slides), featurised by the cached EfficientNet-lite0 encoder of
  :mod:`mamba2d.bench.features` (1280-d);
* ``gauss<D>`` (e.g. ``gauss48``): no images; each class has a fixed Gaussian prototype in D
  dimensions and a tile's feature is its class's prototype plus N(0, I) noise. Prototypes are
  orthogonal with pairwise distance ``separation`` (default 4.5 noise standard deviations), so a
  single tile is misread as another given class with probability Phi(-separation / 2) (1.2 % at 4.5):
  tissue types are distinguishable, a lone tile is not certain.

The folder layout is the built-in benchmark's (``docs/benchmark.md``): ``features/<slide>.h5``,
``labels.csv``, ``splits.csv`` (train / val / test), ``slides.csv`` and ``benchmark.json``; the same
config (and encoder) gives byte-identical files, and a folder is reused, resumed or refused like
:func:`mamba2d.bench.dataset.build_benchmark`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mamba2d.bench.config import (
    IMAGE_SPLIT,
    PART_CODE,
    PARTS,
    S_IMAGES,
    S_LABELS,
    S_SURV,
    BenchmarkError,
    random_stream,
    read_benchmark_json,
)
from mamba2d.bench.dataset import check_build_folder, write_bag_h5
from mamba2d.bench.features import ResizedEfficientNetLite0Encoder, TileEncoder, cached_features, encoder_tag
from mamba2d.bench.sources import class_pools, load_source, source_key
from mamba2d.bench.survival import censor, horizon_for_rate, weibull_event_times
from mamba2d.bench.tasks import (
    KIND_A,
    KIND_B,
    KIND_DISTRACTOR_A,
    KIND_DISTRACTOR_B,
    TASKS,
    TaskLayout,
    TileClasses,
    sample_task_layout,
    task_code,
)
from mamba2d.io import write_json, write_text

__all__ = ["TASK_VERSION", "TaskConfig", "build_task", "prototypes", "task_config"]

#: Bumped whenever the task generator changes what a config produces; part of the config hash.
TASK_VERSION = 1
S_PROTOTYPES, S_FEATURES = 31, 32
_MARKER = "build-config.json"
_SOURCE = re.compile(r"^(fmnist|gauss(\d+))$")


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task dataset depends on; the same config (and encoder) gives the same files.

    ``task``: a name of :data:`mamba2d.bench.tasks.TASKS`. ``source``: ``fmnist`` or ``gauss<D>``
    (module docstring). ``n_train``/``n_val``/``n_test``: slides per part, labels balanced in each.
    ``grid``: (min, max) cells a side (None: the task's default); ``holes``: (min, max) fraction of
    tissue cells removed as holes; ``distractors``: (min, max) isolated tiles of each of the task's
    distractor types (None: the task's default). ``separation``: prototype distance in noise standard
    deviations (gauss). ``pool_per_class``, ``encoder_input_size``: as in the built-in benchmark
    (fmnist). Survival tasks: risk = level / (levels - 1), event time scale * exp(-beta risk) *
    Weibull(shape) months, uniform censoring at ``censoring_rate``. ``fmnist_dir``: where
    Fashion-MNIST is (not part of the identity).
    """

    task: str
    source: str = "gauss48"
    n_train: int = 115
    n_val: int = 29
    n_test: int = 48
    seed: int = 0
    grid: tuple[int, int] | None = None
    holes: tuple[float, float] = (0.0, 0.15)
    distractors: tuple[int, int] | None = None
    separation: float = 4.5
    pool_per_class: int = 250
    encoder_input_size: int = 112
    patch_size_level0: int = 224
    survival_scale_months: float = 150.0
    survival_beta: float = 3.0
    survival_shape: float = 1.5
    censoring_rate: float = 0.4
    fmnist_dir: str | None = None

    def __post_init__(self) -> None:
        # JSON round trips give lists; the identity must not depend on that.
        for name in ("grid", "holes", "distractors"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    @property
    def spec(self):
        """The task's :class:`~mamba2d.bench.tasks.Task`."""
        return TASKS[self.task]

    @property
    def kind(self) -> str:
        """``classification`` or ``survival``."""
        return "survival" if self.spec.survival else "classification"

    @property
    def grid_range(self) -> tuple[int, int]:
        return tuple(self.grid) if self.grid is not None else self.spec.grid

    @property
    def dim(self) -> int | None:
        """Feature dimension of a gauss source (None for fmnist: the encoder's)."""
        m = _SOURCE.match(self.source)
        return int(m.group(2)) if m and m.group(2) else None

    @property
    def n_slides(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def validate(self) -> TaskConfig:
        """Raise :class:`BenchmarkError` naming the first invalid field; returns self."""
        def fail(msg: str) -> None:
            raise BenchmarkError(f"task config: {msg}")

        if self.task not in TASKS:
            fail(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if not _SOURCE.match(self.source):
            fail(f"source must be 'fmnist' or 'gauss<D>' (e.g. gauss48), got {self.source!r}")
        if self.dim is not None and not 10 <= self.dim <= 4096:
            fail(f"a gauss source needs 10 <= D <= 4096 (10 orthogonal prototypes), got {self.dim}")
        for name in ("n_train", "n_val", "n_test", "seed", "pool_per_class", "encoder_input_size",
                     "patch_size_level0"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                fail(f"{name} must be a non-negative int, got {value!r}")
        if min(self.n_train, self.n_test) < self.spec.n_classes or self.n_val < self.spec.n_classes:
            fail(f"every part needs at least {self.spec.n_classes} slides (one per class)")
        lo, hi = self.grid_range
        if not 6 <= lo <= hi <= 256:
            fail(f"grid must be (min, max) with 6 <= min <= max <= 256, got {self.grid_range}")
        if len(self.holes) != 2 or not 0.0 <= self.holes[0] <= self.holes[1] <= 0.5:
            fail(f"holes must be (min, max) fractions with 0 <= min <= max <= 0.5, got {self.holes}")
        if self.distractors is not None and (len(self.distractors) != 2
                                             or not 0 <= self.distractors[0] <= self.distractors[1]):
            fail(f"distractors must be (min, max) counts with 0 <= min <= max, got {self.distractors}")
        if not self.separation > 0:
            fail(f"separation must be positive, got {self.separation}")
        if not 0.05 <= self.censoring_rate <= 0.9:
            fail(f"censoring_rate must be in [0.05, 0.9], got {self.censoring_rate}")
        if min(self.survival_scale_months, self.survival_beta, self.survival_shape) <= 0:
            fail("survival_scale_months, survival_beta and survival_shape must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("grid", "holes", "distractors"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BenchmarkError(f"unknown task config field(s): {unknown}")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that change the files: everything but ``fmnist_dir`` (and the fields of the
        other source), with the task's resolved defaults and the generator version."""
        out = self.to_dict()
        out.pop("fmnist_dir")
        if self.source == "fmnist":
            out.pop("separation")
        else:
            out.pop("pool_per_class")
            out.pop("encoder_input_size")
        if not self.spec.survival:
            for name in ("survival_scale_months", "survival_beta", "survival_shape", "censoring_rate"):
                out.pop(name)
        out["grid"] = list(self.grid_range)
        out["distractors"] = {str(t): list(self.distractors or r)
                              for t, r in self.spec.distractors.items()}
        out["version"] = TASK_VERSION
        return out

    def digest(self) -> str:
        """A 12-hex-digit hash of :meth:`identity`, for cache folder names."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]


def task_config(task: str, source: str = "gauss48", n_slides: int = 192, seed: int = 0,
                **fields: Any) -> TaskConfig:
    """A validated :class:`TaskConfig` with ``n_slides`` split 60 / 15 / 25 % into train / val / test
    (e.g. 192 -> 115 / 29 / 48); other fields by name."""
    n_test, n_val = round(0.25 * n_slides), round(0.15 * n_slides)
    return TaskConfig(task=task, source=source, n_train=n_slides - n_test - n_val, n_val=n_val,
                      n_test=n_test, seed=seed, **fields).validate()


@functools.lru_cache(maxsize=8)
def prototypes(dim: int, seed: int, separation: float) -> np.ndarray:
    """(10, dim) float64 class prototypes: orthonormal random directions scaled so that any two are
    ``separation`` apart (one per image class index 0..9)."""
    rng = random_stream(S_PROTOTYPES, seed, dim)
    q, _ = np.linalg.qr(rng.standard_normal((dim, 10)))
    return q.T * (separation / np.sqrt(2.0))


@functools.lru_cache(maxsize=16)
def _horizon(levels: int, scale: float, beta: float, shape: float, rate: float) -> float:
    """Censoring horizon for risks uniform over ``levels`` evenly spaced values in [0, 1]."""
    rng = random_stream(S_SURV, 0xC0FFEE, levels)
    risk = rng.integers(0, levels, 100_000) / (levels - 1)
    return horizon_for_rate(weibull_event_times(rng, risk, scale, beta, shape), rate)


def _labels_for(config: TaskConfig, part: str) -> np.ndarray:
    """(n,) balanced labels (levels) of a part, in a seeded random order."""
    rng = random_stream(S_LABELS, config.seed, task_code(config.task), PART_CODE[part])
    return rng.permutation(np.arange(config.n_slides[part]) % config.spec.n_classes)


def _slide_ids(config: TaskConfig) -> dict[str, list[str]]:
    return {part: [f"{part}_{i:04d}" for i in range(n)] for part, n in config.n_slides.items()}


class _Features:
    """Per-tile features of a source: ``of(layout cells' classes, key, split)`` -> (N, D) float32 and
    (N,) image indices (-1 for gauss)."""

    def __init__(self, config: TaskConfig, classes: TileClasses, encoder: TileEncoder | None,
                 cache: Path, progress: bool) -> None:
        self.config, self.classes, self.encoder = config, classes, encoder
        self.cache, self.progress = cache, progress
        self.encode_seconds = 0.0
        self._pool_feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.source = None
        if config.source == "fmnist":
            self.source = load_source(config.fmnist_dir)
            self.pools = class_pools(self.source, classes.all, config.pool_per_class, config.seed)
            self.tag = str(config.encoder_input_size) if encoder is None else encoder_tag(encoder)
            self.name = self.source.name
        else:
            self.protos = prototypes(config.dim, config.seed, config.separation).astype(np.float64)
            self.name = f"gaussian prototypes, D={config.dim}, separation {config.separation}"

    def _encoder(self) -> Any:
        if self.encoder is None:
            self.encoder = ResizedEfficientNetLite0Encoder(input_size=self.config.encoder_input_size)
        return self.encoder

    def _pool(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._pool_feats:
            indices = np.unique(np.concatenate(list(self.pools[split].values())))
            feats, sec = cached_features(self.cache / f"{self.source.key}_{split}_{self.tag}.pt", indices,
                                         self.source.images[split], self._encoder, key=self.source.key,
                                         split=split, tag=self.tag, progress=self.progress)
            self._pool_feats[split] = (indices, feats)
            self.encode_seconds += sec
        return self._pool_feats[split]

    def of(self, cell_class: np.ndarray, key: tuple[int, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
        if self.source is None:
            rng = random_stream(S_FEATURES, *key)
            noise = rng.standard_normal((len(cell_class), self.protos.shape[1]))
            feats = (self.protos[cell_class] + noise).astype(np.float32)
            return feats, np.full(len(cell_class), -1, np.int64)
        rng = random_stream(S_IMAGES, *key)
        image_index = np.empty(len(cell_class), np.int64)
        pools = self.pools[split]
        for c in sorted(pools):
            sel = np.flatnonzero(cell_class == c)
            image_index[sel] = pools[c][rng.integers(len(pools[c]), size=len(sel))]
        idx, feats = self._pool(split)
        return feats[np.searchsorted(idx, image_index)], image_index


def _write(path: Path, layout: TaskLayout, features: np.ndarray, image_index: np.ndarray, split: str,
           source_name: str, config: TaskConfig) -> int:
    """Write one slide's bag (raster order over tissue cells); returns its patch count."""
    cells = np.argwhere(layout.tissue).astype(np.int64)
    kind = layout.kind[cells[:, 0], cells[:, 1]].astype(np.int8)
    datasets = [("tile_kind", kind, {}),
                ("is_lesion", layout.structure[cells[:, 0], cells[:, 1]], {}),
                ("cell_class", layout.cell_class[cells[:, 0], cells[:, 1]], {})]
    if config.source == "fmnist":
        datasets.append(("image_index", image_index, {"image_split": split}))
    write_bag_h5(path, features, cells, config.patch_size_level0, datasets,
                 {"task": config.task, "image_split": split if config.source == "fmnist" else "none",
                  "image_source": source_name, "grid_shape": np.asarray(layout.shape, np.int64)})
    return len(cells)


def build_task(out_dir: str | Path, task: str | TaskConfig, source: str = "gauss48", n_slides: int = 192,
               seed: int = 0, *, encoder: TileEncoder | None = None, cache_dir: str | Path | None = None,
               progress: bool = False, **fields: Any) -> dict[str, Any]:
    """Build (or reuse, or finish) a task's dataset in ``out_dir``; returns ``benchmark.json``'s content.

    ``task``: a task name (then ``source``, ``n_slides``, ``seed`` and ``fields`` make the
    :class:`TaskConfig` through :func:`task_config`) or a ready config. ``encoder``: the tile encoder
    for ``fmnist`` (default EfficientNet-lite0 at ``encoder_input_size``, built only if an image still
    needs encoding); ``cache_dir``: its feature cache (default ``out_dir/cache``; tasks may share one).

    Files: ``features/<slide>.h5`` (features, coords with TRIDENT attributes, ``tile_kind``: 0
    background, 1 / 2 structure tiles of signal A / B, 3 / 4 distractors of A / B; ``is_lesion``:
    structure tiles; ``cell_class``; ``image_index`` for fmnist), ``labels.csv`` (``label``, or
    ``survival_months,censorship``), ``splits.csv``, ``slides.csv`` (per slide: part, label, grid,
    patches, tiles of each kind, holes, survival times) and ``benchmark.json``.
    """
    if isinstance(task, TaskConfig):
        config = task.validate()
    else:
        config = task_config(task, source, n_slides, seed, **fields)
    out_dir = Path(out_dir)
    tag = (str(config.encoder_input_size) if encoder is None else encoder_tag(encoder)) \
        if config.source == "fmnist" else None
    images = source_key(config.fmnist_dir)[0] if config.source == "fmnist" else None
    ident = {"config": config.identity(), "image_source": images, "encoder": tag}
    done = check_build_folder(out_dir, ident)
    if done is not None:
        return done

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / _MARKER, {"identity": ident, "config": config.to_dict()})
    spec = config.spec
    classes = TileClasses()
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    feats = _Features(config, classes, encoder, cache, progress)
    code = task_code(config.task)
    ids = _slide_ids(config)
    horizon = _horizon(spec.n_classes, config.survival_scale_months, config.survival_beta,
                       config.survival_shape, config.censoring_rate) if spec.survival else None
    rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    for part in PARTS:
        labels = _labels_for(config, part)
        split = IMAGE_SPLIT[part]
        for i, slide_id in enumerate(ids[part]):
            key = (config.seed, code, PART_CODE[part], i)
            label = int(labels[i])
            layout = sample_task_layout(config.task, key, label, grid=config.grid_range,
                                        holes=config.holes, distractors=config.distractors,
                                        tile_classes=classes)
            path = out_dir / "features" / f"{slide_id}.h5"
            cells = np.argwhere(layout.tissue)
            if not path.is_file():  # written atomically, so an existing file is complete
                f, image_index = feats.of(layout.cell_class[cells[:, 0], cells[:, 1]], key, split)
                _write(path, layout, f, image_index, split, feats.name, config)
            kind = layout.kind
            row: dict[str, Any] = {
                "slide_id": slide_id, "part": part, "label": label, "class": spec.classes[label],
                "grid_h": layout.shape[0], "grid_w": layout.shape[1], "n_patches": len(cells),
                "n_structure_a": int((kind == KIND_A).sum()), "n_structure_b": int((kind == KIND_B).sum()),
                "n_distractor_a": int((kind == KIND_DISTRACTOR_A).sum()),
                "n_distractor_b": int((kind == KIND_DISTRACTOR_B).sum()), "hole_cells": layout.hole_cells,
            }
            if spec.survival:
                rng = random_stream(S_SURV, *key)
                risk = label / (spec.n_classes - 1)
                event = float(weibull_event_times(rng, np.asarray([risk]), config.survival_scale_months,
                                                  config.survival_beta, config.survival_shape)[0])
                observed, censored = censor(rng, event, horizon)
                row.update(risk=risk, event_months=round(event, 4), survival_months=observed,
                           censorship=censored)
                label_rows.append({"case_id": slide_id, "slide_id": slide_id,
                                   "survival_months": f"{observed:.2f}", "censorship": censored})
            else:
                label_rows.append({"case_id": slide_id, "slide_id": slide_id, "label": label})
            rows.append(row)

    slides = pd.DataFrame(rows)
    write_text(out_dir / "labels.csv", pd.DataFrame(label_rows).to_csv(index=False))
    width = max(config.n_slides.values())
    write_text(out_dir / "splits.csv",
               pd.DataFrame({p: ids[p] + [""] * (width - len(ids[p])) for p in PARTS}).to_csv())
    write_text(out_dir / "slides.csv", slides.to_csv(index=False))
    counts: dict[str, Any] = {}
    for part in PARTS:
        sub = slides[slides["part"] == part]
        n = sub["n_patches"]
        counts[part] = {"slides": len(sub), "per_class": {c: int((sub["label"] == k).sum())
                                                          for k, c in enumerate(spec.classes)},
                        "patches": {"min": int(n.min()), "mean": round(float(n.mean()), 1),
                                    "max": int(n.max()), "total": int(n.sum())}}
        if spec.survival:
            counts[part]["censoring_rate"] = round(float(sub["censorship"].mean()), 4)
    dim = feats.protos.shape[1] if feats.source is None else None
    info: dict[str, Any] = {
        "format": "mamba2d-spatial-task", "version": TASK_VERSION, "identity": ident,
        "config": config.to_dict(), "config_digest": config.digest(), "task": config.kind,
        "task_name": config.task, "needs_2d": spec.needs_2d, "raster_visible": spec.raster_visible,
        "definition": spec.doc, "class_names": list(spec.classes), "counts": counts,
        "image_source": {"name": feats.name, "source": config.source, "dim": dim,
                         "encoder": tag, "tile_classes": dataclasses.asdict(classes)},
        "files": {"features": "features", "labels": "labels.csv", "splits": "splits.csv",
                  "slides": "slides.csv"},
        "patch_order": "row-major (raster) over tissue cells",
        "timing": {"build_seconds": round(time.perf_counter() - start, 2),
                   "encode_seconds": round(feats.encode_seconds, 2),
                   "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "slide_files": [f"features/{s}.h5" for p in PARTS for s in ids[p]],
    }
    if spec.survival:
        info["survival"] = {"levels": spec.n_classes, "risk": "level / (levels - 1)",
                            "censoring_horizon_months": round(horizon, 3)}
    write_json(out_dir / "benchmark.json", info)
    return read_benchmark_json(out_dir / "benchmark.json")
