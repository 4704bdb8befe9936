"""Tile features for the benchmark: the frozen encoder, and a per-image cache of its features.

Every image is encoded once per (image source, image split, encoder) and kept in
``cache/<source>_<split>_<encoder tag>.pt`` (indices and features, sorted by image index); a build
that needs more images encodes only the missing ones and rewrites the cache atomically.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from mamba2d.bench.config import BenchmarkError
from mamba2d.io import CheckpointError, load_checkpoint, save_checkpoint
from mamba2d.wsi.encoders import EfficientNetLite0Encoder

__all__ = ["ResizedEfficientNetLite0Encoder", "TileEncoder", "cached_features", "encoder_tag"]


class TileEncoder(Protocol):
    """What :func:`mamba2d.bench.dataset.build_benchmark` needs from an encoder.

    ``encode(images, batch_size)``: images (N, h, w) uint8 grey tiles -> (N, D) float32 tensor.
    An optional ``cache_tag`` attribute names its features in cache file names (default: the class
    name); two encoders with one tag must give the same features.
    """

    def encode(self, images: np.ndarray, batch_size: int = ...) -> torch.Tensor: ...


class ResizedEfficientNetLite0Encoder(EfficientNetLite0Encoder):
    """The packaged EfficientNet-lite0 encoder with a chosen input side (pixels, square).

    Fashion-MNIST tiles are 28 x 28: resizing them to 112 instead of 224 loses nothing the encoder
    can use (same lesion-vs-rest probe accuracy) and is about 7x faster on a CPU.
    """

    def __init__(self, weights: str | Path | None = None, input_size: int = 224) -> None:
        super().__init__(weights)
        if not isinstance(input_size, int) or input_size < 32:
            raise ValueError(f"input_size must be an int >= 32 pixels, got {input_size!r}")
        self.input_size = input_size

    @property
    def cache_tag(self) -> str:
        """Cache file tag: the input size alone, e.g. ``fmnist_test_112.pt``."""
        return str(self.input_size)


def encoder_tag(encoder: Any) -> str:
    """The name an encoder's features are cached under: its ``cache_tag``, else its class name (and
    input size)."""
    tag = getattr(encoder, "cache_tag", None)
    if tag is None:
        size = getattr(encoder, "input_size", None)
        tag = type(encoder).__name__.lower() + (f"_{size}" if size is not None else "")
    return str(tag)


def _check_cache(obj: Any, key: str, split: str, tag: str) -> bool:
    if not isinstance(obj, dict):
        return False
    if (obj.get("source"), obj.get("split"), obj.get("encoder")) != (key, split, tag):
        return False
    idx, feats = obj.get("indices"), obj.get("features")
    return (isinstance(idx, torch.Tensor) and isinstance(feats, torch.Tensor) and idx.dim() == 1
            and feats.dim() == 2 and feats.shape[0] == idx.shape[0]
            and bool((idx[1:] > idx[:-1]).all()))


def cached_features(path: Path, indices: np.ndarray, images: np.ndarray, get_encoder: Callable[[], Any], *,
                    key: str, split: str, tag: str, progress: bool) -> tuple[np.ndarray, float]:
    """(len(indices), D) float32 features of ``images[indices]`` (indices sorted, unique), read from
    the cache file ``path`` where cached; missing ones are encoded (``get_encoder()`` is called only
    then) and added to the cache. Also the seconds spent encoding."""
    have_idx = np.zeros(0, np.int64)
    have_feat: np.ndarray | None = None
    if path.is_file():
        try:
            obj: dict[str, Any] | None = load_checkpoint(path)
        except CheckpointError as exc:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"{path}: unreadable feature cache ({exc}); re-encoding", stacklevel=3)
            obj = None
        if obj is not None and _check_cache(obj, key, split, tag):
            have_idx = obj["indices"].numpy().astype(np.int64)
            have_feat = obj["features"].numpy().astype(np.float32)
        elif obj is not None:
            warnings.warn(f"{path}: feature cache for another source/split/encoder; re-encoding",
                          stacklevel=3)
    missing = np.setdiff1d(indices, have_idx)
    seconds = 0.0
    if len(missing):
        encoder = get_encoder()
        start = time.perf_counter()
        chunks = []
        step = 256
        bar = tqdm(total=len(missing), desc=f"encoding {key} {split}", unit="img", disable=not progress)
        for i in range(0, len(missing), step):
            out = encoder.encode(images[missing[i:i + step]], batch_size=64)
            chunks.append(torch.as_tensor(out).detach().float().cpu().numpy())
            bar.update(len(missing[i:i + step]))
        bar.close()
        seconds = time.perf_counter() - start
        new = np.concatenate(chunks)
        if new.ndim != 2 or new.shape[0] != len(missing):
            raise BenchmarkError(f"encoder returned {new.shape} for {len(missing)} images; expected (N, D)")
        if have_feat is not None and have_feat.shape[1] != new.shape[1]:
            raise BenchmarkError(f"{path}: cached features have D={have_feat.shape[1]}, encoder gives "
                                 f"{new.shape[1]}")
        all_idx = np.concatenate([have_idx, missing])
        all_feat = new if have_feat is None else np.concatenate([have_feat, new])
        order = np.argsort(all_idx, kind="stable")
        have_idx, have_feat = all_idx[order], np.ascontiguousarray(all_feat[order])
        state = {"source": key, "split": split, "encoder": tag, "indices": torch.from_numpy(have_idx),
                 "features": torch.from_numpy(have_feat)}
        save_checkpoint(path, state)
    assert have_feat is not None
    return have_feat[np.searchsorted(have_idx, indices)], seconds
