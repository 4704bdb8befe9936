"""Writing a benchmark folder: slide feature bags, labels, splits and the description.

Outputs (see ``docs/benchmark.md``): TRIDENT-style ``features/<slide>.h5`` that
:func:`mamba2d.data.bags.read_bag` reads, ``labels.csv``, ``splits.csv``, ``slides.csv`` (per-slide
layout facts) and ``benchmark.json``; features come from the cache of
:mod:`mamba2d.bench.features`. A folder is built once, resumed after an interruption, and refused
when it holds another benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mamba2d.bench.config import (
    BENCHMARK_VERSION,
    IMAGE_SPLIT,
    PART_CODE,
    PARTS,
    S_IMAGES,
    S_LABELS,
    TASK_CODE,
    BenchmarkConfig,
    BenchmarkError,
    random_stream,
    read_benchmark_json,
)
from mamba2d.bench.features import ResizedEfficientNetLite0Encoder, TileEncoder, cached_features, encoder_tag
from mamba2d.bench.layout import DECOY, LESION, SlideLayout, sample_layout
from mamba2d.bench.sources import ImageSource, image_pools, load_source, source_key
from mamba2d.bench.survival import censoring_horizon, survival_outcome
from mamba2d.data.images import FMNIST_CLASSES
from mamba2d.io import write_h5, write_json, write_text
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

__all__ = ["build_benchmark", "check_build_folder", "write_bag_h5"]

_MARKER = "build-config.json"
_OWN = {_MARKER, "benchmark.json", "labels.csv", "splits.csv", "slides.csv", "features", "cache"}


def _slide_ids(config: BenchmarkConfig) -> dict[str, list[str]]:
    return {part: [f"{part}_{i:04d}" for i in range(n)] for part, n in config.n_slides.items()}


def _labels_for(config: BenchmarkConfig, part: str) -> np.ndarray:
    """(n,) balanced class labels of a part, in a seeded random order."""
    rng = random_stream(S_LABELS, config.seed, PART_CODE[part])
    return rng.permutation(np.arange(config.n_slides[part]) % len(config.classes))


def _slide_images(layout: SlideLayout, pools: dict[int, np.ndarray], key: Sequence[int],
                  config: BenchmarkConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raster-order (row-major) tissue cells of a slide: (N, 2) int64 (row, col), (N,) int64 image
    indices into the image split, and (N,) int8 kinds."""
    rng = random_stream(S_IMAGES, *key)
    cells = np.argwhere(layout.tissue)
    kinds = layout.kind[cells[:, 0], cells[:, 1]]
    cls = layout.image_class[cells[:, 0], cells[:, 1]].copy()
    cls[kinds == LESION] = config.lesion_class
    cls[kinds == DECOY] = config.decoy_class
    image_index = np.empty(len(cells), np.int64)
    for c in sorted(pools):
        sel = np.flatnonzero(cls == c)
        image_index[sel] = pools[c][rng.integers(len(pools[c]), size=len(sel))]
    return cells.astype(np.int64), image_index, kinds.astype(np.int8)


def write_bag_h5(path: Path, features: np.ndarray, cells: np.ndarray, patch_size: int,
                 datasets: Sequence[tuple[str, np.ndarray, dict[str, Any]]] = (),
                 attrs: dict[str, Any] | None = None) -> None:
    """Atomically write one TRIDENT-style bag: ``features`` (N, D) float32 and ``coords`` (N, 2), the
    level-0 (x, y) top-left corners of the (N, 2) (row, col) ``cells`` at ``patch_size`` pixels per
    cell, with TRIDENT's coords attributes (20x); then ``datasets`` (name, (N,) array, attributes) and
    the file ``attrs``, in that order (equal inputs give byte-identical files)."""
    def fill(f: Any) -> None:
        f.create_dataset("features", data=features.astype(np.float32, copy=False))
        # TRIDENT coords: level-0 (x, y) of each patch's top-left corner, x = column.
        coords = f.create_dataset("coords", data=cells[:, ::-1] * patch_size)
        coords.attrs["patch_size_level0"] = patch_size
        coords.attrs["patch_size"] = patch_size
        coords.attrs["level0_magnification"] = 20.0
        coords.attrs["target_magnification"] = 20.0
        for name, data, extra in datasets:
            dset = f.create_dataset(name, data=data)
            for key, value in extra.items():
                dset.attrs[key] = value
        for key, value in (attrs or {}).items():
            f.attrs[key] = value

    write_h5(path, fill)


def _write_slide(path: Path, features: np.ndarray, cells: np.ndarray, image_index: np.ndarray,
                 kinds: np.ndarray, layout: SlideLayout, image_split: str, source: ImageSource,
                 config: BenchmarkConfig) -> None:
    write_bag_h5(path, features, cells, config.patch_size_level0,
                 [("image_index", image_index, {"image_split": image_split}),
                  ("is_lesion", kinds == LESION, {}), ("tile_kind", kinds, {})],
                 {"image_split": image_split, "image_source": source.name, "tile_size": source.tile_size,
                  "grid_shape": np.asarray(layout.shape, np.int64)})


def _identity(config: BenchmarkConfig, source: str, tag: str) -> dict[str, Any]:
    return {"config": config.identity(), "image_source": source, "encoder": tag}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in ("image_source", "encoder"):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    oc, nc = old.get("config", {}), new.get("config", {})
    for key in sorted(set(oc) | set(nc)):
        if oc.get(key) != nc.get(key):
            out.append(f"{key}: {oc.get(key)!r} -> {nc.get(key)!r}")
    return out


def check_build_folder(out_dir: Path, ident: dict[str, Any],
                       own: frozenset[str] | set[str] = _OWN) -> dict[str, Any] | None:
    """The finished benchmark.json if ``out_dir`` holds this benchmark complete, None if it is to be
    (re)built here; :class:`BenchmarkError` if it holds a different benchmark or files other than
    ``own`` names."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise BenchmarkError(f"{out_dir}: exists and is not a folder")
    for name in ("benchmark.json", _MARKER):
        path = out_dir / name
        if path.is_file():
            old = read_benchmark_json(path)
            old_ident = old.get("identity", {})
            diff = _differences(old_ident, ident)
            if diff:
                raise BenchmarkError(f"{out_dir} holds a benchmark built with a different configuration ("
                                     + "; ".join(diff) + "); choose another folder or delete this one")
            if name == "benchmark.json" and all((out_dir / f).is_file() for f in old.get("slide_files", [])):
                return old
            return None  # same config, unfinished (or files deleted): resume
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own)
    if foreign:
        raise BenchmarkError(f"{out_dir}: not empty and not a benchmark folder (holds {foreign[:5]}); "
                             f"refusing to write into it")
    return None


def build_benchmark(out_dir: str | Path, config: BenchmarkConfig | None = None, *,
                    encoder: TileEncoder | None = None, progress: bool = True,
                    cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Build (or reuse, or finish) the benchmark described by ``config`` in ``out_dir``.

    ``encoder``: tile encoder (see :class:`~mamba2d.bench.features.TileEncoder`); None builds
    :class:`~mamba2d.bench.features.ResizedEfficientNetLite0Encoder` at
    ``config.encoder_input_size``, only if some image still needs encoding. ``cache_dir``: feature
    cache folder (default ``out_dir/cache``); several benchmarks may share one. Returns the content
    of ``benchmark.json``.

    A folder already holding this benchmark is returned as is; one holding an unfinished build of
    it is resumed (slides already written are kept); one holding another benchmark or other files
    raises :class:`~mamba2d.bench.config.BenchmarkError`. Every file is written atomically.
    """
    config = (config if config is not None else BenchmarkConfig()).validate()
    out_dir = Path(out_dir)
    if encoder is None:
        tag = str(config.encoder_input_size)
    else:
        if isinstance(encoder, EfficientNetLite0Encoder) and encoder.input_size != config.encoder_input_size:
            raise BenchmarkError(f"encoder input_size {encoder.input_size} != config.encoder_input_size "
                                 f"{config.encoder_input_size}")
        tag = encoder_tag(encoder)
    key, _ = source_key(config.fmnist_dir)
    ident = _identity(config, key, tag)
    done = check_build_folder(out_dir, ident)
    if done is not None:
        return done

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / _MARKER, {"identity": ident, "config": config.to_dict()})
    source = load_source(config.fmnist_dir)
    pools = image_pools(config, source)
    ids = _slide_ids(config)
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"

    built: list[EfficientNetLite0Encoder] = []

    def get_encoder() -> Any:
        if encoder is not None:
            return encoder
        if not built:
            built.append(ResizedEfficientNetLite0Encoder(input_size=config.encoder_input_size))
        return built[0]

    pool_feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    encode_seconds = [0.0]

    def features_of(split: str) -> tuple[np.ndarray, np.ndarray]:
        # Lazy: a resumed build whose slides are all written needs no features (nor the encoder).
        if split not in pool_feats:
            indices = np.unique(np.concatenate(list(pools[split].values())))
            feats, sec = cached_features(cache / f"{source.key}_{split}_{tag}.pt", indices,
                                         source.images[split], get_encoder, key=source.key, split=split,
                                         tag=tag, progress=progress)
            pool_feats[split] = (indices, feats)
            encode_seconds[0] += sec
        return pool_feats[split]

    task_code = TASK_CODE[config.task]
    rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(config.n_slides.values()), desc="slides", unit="slide", disable=not progress)
    write_start = time.perf_counter()
    for part in PARTS:
        labels = _labels_for(config, part) if config.task == "classification" else None
        split = IMAGE_SPLIT[part]
        for i, slide_id in enumerate(ids[part]):
            key = (config.seed, task_code, PART_CODE[part], i)
            label = int(labels[i]) if labels is not None else None
            layout = sample_layout(config, key, label)
            cells, image_index, kinds = _slide_images(layout, pools[split], key, config)
            path = out_dir / "features" / f"{slide_id}.h5"
            if not path.is_file():  # written atomically, so an existing file is complete
                idx, feats = features_of(split)
                _write_slide(path, feats[np.searchsorted(idx, image_index)], cells, image_index, kinds,
                             layout, split, source, config)
            row: dict[str, Any] = {
                "slide_id": slide_id, "part": part, "image_split": split, "pattern": layout.pattern,
                "n_lesion": layout.n_lesion, "largest_cluster": layout.largest_cluster,
                "compactness": round(layout.compactness, 6), "decoy_pattern": layout.decoy_pattern,
                "n_decoy": layout.n_decoy, "grid_h": layout.shape[0], "grid_w": layout.shape[1],
                "n_patches": len(cells),
            }
            if label is not None:
                row["label"] = label
                label_rows.append({"case_id": slide_id, "slide_id": slide_id, "label": label})
            else:
                observed, censored, event = survival_outcome(config, key, layout.compactness)
                row.update(event_months=round(event, 4), survival_months=observed, censorship=censored)
                label_rows.append({"case_id": slide_id, "slide_id": slide_id,
                                   "survival_months": f"{observed:.2f}", "censorship": censored})
            rows.append(row)
            bar.update(1)
    bar.close()
    # Features are encoded lazily inside the slide loop; report writing without them.
    write_seconds = time.perf_counter() - write_start - encode_seconds[0]

    slides = pd.DataFrame(rows)
    write_text(out_dir / "labels.csv", pd.DataFrame(label_rows).to_csv(index=False))
    width = max(config.n_slides.values())
    split_frame = pd.DataFrame({p: ids[p] + [""] * (width - len(ids[p])) for p in PARTS})
    write_text(out_dir / "splits.csv", split_frame.to_csv())
    write_text(out_dir / "slides.csv", slides.to_csv(index=False))

    if encoder is None or isinstance(encoder, EfficientNetLite0Encoder):
        enc_info = {"cache_tag": tag, "name": "efficientnet-lite0 (ImageNet weights)",
                    "input_size": config.encoder_input_size}
    else:
        enc_info = {"cache_tag": tag, "name": type(encoder).__name__,
                    "input_size": getattr(encoder, "input_size", None)}
    info = _summary(config, ident, source, pools, slides, enc_info)
    info["timing"] = {"build_seconds": round(time.perf_counter() - start, 2),
                      "encode_seconds": round(encode_seconds[0], 2), "write_seconds": round(write_seconds, 2),
                      "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    info["cache_dir"] = str(cache)
    info["slide_files"] = [f"features/{s}.h5" for p in PARTS for s in ids[p]]
    write_json(out_dir / "benchmark.json", info)
    return read_benchmark_json(out_dir / "benchmark.json")


def _summary(config: BenchmarkConfig, ident: dict[str, Any], source: ImageSource,
             pools: dict[str, dict[int, np.ndarray]], slides: pd.DataFrame,
             encoder: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for part in PARTS:
        sub = slides[slides["part"] == part]
        entry: dict[str, Any] = {"slides": len(sub)}
        if len(sub):
            n = sub["n_patches"]
            entry["patches"] = {"min": int(n.min()), "mean": round(float(n.mean()), 1), "max": int(n.max()),
                                "total": int(n.sum())}
        if config.task == "classification" and len(sub):
            entry["per_class"] = {name: int((sub["label"] == c).sum())
                                  for c, name in enumerate(config.classes)}
        elif len(sub):
            entry["censoring_rate"] = round(float(sub["censorship"].mean()), 4)
        counts[part] = entry
    class_of = (lambda c: FMNIST_CLASSES[c]) if source.key == "fmnist" else (lambda c: f"digit {c}")
    info: dict[str, Any] = {
        "format": "mamba2d-spatial-benchmark",
        "version": BENCHMARK_VERSION,
        "identity": ident,
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "task": config.task,
        "counts": counts,
        "image_source": {
            "name": source.name, "folder": source.folder, "fallback": source.key != "fmnist",
            "tile_size": source.tile_size,
            "lesion": class_of(config.lesion_class), "decoy": class_of(config.decoy_class),
            "background": [class_of(c) for c in config.background_classes],
            "pool_sizes": {s: int(sum(len(v) for v in pools[s].values())) for s in pools},
            "image_split_of_part": dict(IMAGE_SPLIT),
        },
        "encoder": encoder,
        "files": {"features": "features", "labels": "labels.csv", "splits": "splits.csv",
                  "slides": "slides.csv"},
        "patch_order": "row-major (raster) over tissue cells",
    }
    if config.task == "classification":
        info["class_names"] = list(config.classes)
    else:
        info["survival"] = {
            "risk": "r = (s - 1) / (k - 1), s = largest 4-connected lesion cluster, k = lesion count",
            "event_time": "scale * exp(-beta * r) * Weibull(shape), months",
            "censoring": "independent U(0, c_max) censoring times",
            "c_max_months": round(censoring_horizon(config), 4),
            "censorship": "1 = censored, 0 = event observed",
        }
    return info
