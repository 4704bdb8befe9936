"""Shared pieces of the benchmark tests: a tiny configuration and a fast, deterministic encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mamba2d.bench import BenchmarkConfig, build_benchmark
from mamba2d.bench.sources import find_fashion_mnist

FMNIST = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST is not installed")
# Small slides and cohorts: a build takes a fraction of a second with the fake encoder.
TINY = BenchmarkConfig(n_train=9, n_val=3, n_test=6, grid_min=14, grid_max=20, lesion_min=3, lesion_max=5,
                       pool_per_class=12)


class FakeEncoder:
    """Deterministic stand-in for a CNN: a fixed random projection of the pixels, (N, 16)."""

    cache_tag = "fake"

    def __init__(self) -> None:
        self.weight = np.random.default_rng(0).standard_normal((28 * 28, 16)).astype(np.float32)
        self.calls = 0

    def encode(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        x = np.asarray(images, np.float32).reshape(len(images), -1) / 255.0
        return torch.from_numpy(x @ self.weight[: x.shape[1]])


class ExplodingEncoder(FakeEncoder):
    def encode(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        raise AssertionError("the encoder must not run when everything is cached")


def build(path: Path, config: BenchmarkConfig = TINY, **kw: object) -> dict:
    """Build ``config`` into ``path`` with the fake encoder (or ``encoder=``), quietly."""
    return build_benchmark(path, config, encoder=kw.pop("encoder", FakeEncoder()), progress=False, **kw)


def no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
