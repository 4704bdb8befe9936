"""One slide through the extraction pipeline, with every stage timed.

Worker processes read regions of patches (:mod:`mamba2d.wsi.regions`: compressed tiles fetched and
decoded once each) and resize them; the main process gathers them into fixed-size batches, copies
each batch to the device from pinned memory without waiting, runs the frozen encoder (channels-last
memory layout; bf16 autocast where the device computes it natively) and streams the features into
the h5 file being written, one batch behind the device, so reading, encoding and writing overlap.

Stage names (seconds in :class:`StageClock`): ``read`` (worker time fetching and decoding tiles and
cutting patches, summed over the workers), ``resize`` (worker time resizing patches to the target
magnification), ``wait`` (the main process waiting for the workers: the readers are the bottleneck
when it is large), ``encode`` (the encoder; on CUDA measured with events, so device time),
``write`` (h5 writes), plus the per-slide steps timed in :mod:`mamba2d.wsi.extract`: ``open``,
``mask`` (thumbnail, tissue mask, tiling), ``qc`` (the QC picture), ``finish`` (flush, fsync,
rename).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mamba2d.wsi.regions import PatchReader, Region
from mamba2d.wsi.slides import SlideError
from mamba2d.wsi.tiling import TilePlan

__all__ = ["EncoderRunner", "FeatureSink", "RegionDataset", "StageClock", "WORKER_STAGES", "native_bf16",
           "resolve_precision", "run_patches"]

WORKER_STAGES = ("read", "resize")


@dataclass
class StageClock:
    """Seconds spent in each stage (see the module docstring); ``workers`` reader processes."""

    seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def merge(self, other: StageClock) -> None:
        for k, v in other.seconds.items():
            self.add(k, v)
        self.workers = max(self.workers, other.workers)

    def shares(self, wall: float) -> dict[str, float]:
        """Each stage's seconds over ``wall`` seconds. Worker stages are divided by the number of
        workers first (the share of the reader pool's time), so every value is a fraction of the
        wall time that stage kept its resource busy; they overlap and need not sum to 1."""
        pool = max(self.workers, 1)
        return {k: (v / pool if k in WORKER_STAGES else v) / max(wall, 1e-9) for k, v in self.seconds.items()}

    def summary(self, wall: float, order: tuple[str, ...] = ("read", "resize", "wait", "encode", "write",
                                                             "mask", "qc", "open", "finish")) -> str:
        """One plain line: ``read 41% (8 workers) | encode 77% | ...`` (no control characters)."""
        shares = self.shares(wall)
        parts = []
        for k in order:
            if k in shares:
                extra = f" ({self.workers} workers)" if k == "read" and self.workers else ""
                parts.append(f"{k} {100 * shares[k]:.0f}%{extra}")
        return " | ".join(parts)


# --------------------------------------------------------------------------------------------------
# Reading (in worker processes)
# --------------------------------------------------------------------------------------------------

class RegionDataset(torch.utils.data.Dataset):
    """Item ``i``: the patches of region ``i`` as (uint8 (k, S, S, 3) RGB tensor, int64 (k,) plan
    positions, float64 (2,) seconds spent reading and resizing, error message). S =
    ``plan.patch_size``. A slide that cannot be read yields an empty tensor and the one-line error
    (an exception raised in a worker process would reach the main process wrapped in a traceback).
    Each worker opens its own :class:`PatchReader` on first use."""

    def __init__(self, path: Path, mpp: float | None, plan: TilePlan, regions: list[Region],
                 direct: bool = True) -> None:
        self.path, self.mpp, self.plan, self.regions, self.direct = path, mpp, plan, regions, direct
        self._reader: PatchReader | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        start = time.perf_counter()
        p = self.plan
        region = self.regions[i]
        index = torch.from_numpy(np.ascontiguousarray(region.index))
        try:
            if self._reader is None:
                self._reader = PatchReader(self.path, p.read_level, p.read_size, mpp=self.mpp,
                                           direct=self.direct)
            patches = self._reader.read(region.coords)
        except (SlideError, OSError, ValueError) as err:
            message = str(err) if str(self.path) in str(err) else f"{self.path}: {err}"
            return torch.zeros(0, dtype=torch.uint8), index, torch.zeros(2, dtype=torch.float64), message
        read = time.perf_counter()
        if p.read_size != p.patch_size:
            patches = resize_patches(patches, p.patch_size)
        done = time.perf_counter()
        seconds = torch.tensor([read - start, done - read], dtype=torch.float64)
        return torch.from_numpy(patches), index, seconds, ""

    def __del__(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """(k, s, s, 3) uint8 to (k, size, size, 3), each patch resized by PIL (bilinear; PIL widens the
    filter when shrinking, so it is antialiased)."""
    from PIL import Image

    out = np.empty((len(patches), size, size, 3), dtype=np.uint8)
    for i, patch in enumerate(patches):
        out[i] = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR))
    return out


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------

def native_bf16() -> bool:
    """True when this CPU computes bf16 products natively (AVX512-BF16 or AMX): bf16 autocast is
    then faster than float32. Read from /proc/cpuinfo (False elsewhere)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, else float32; ``bf16`` / ``fp32``."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda" or (device.type == "cpu" and native_bf16()):
        return torch.bfloat16
    return torch.float32


class EncoderRunner:
    """A frozen encoder applied to uint8 (b, S, S, 3) RGB batches already on ``device``.

    The batch is handed to the encoder as (b, 3, S, S) uint8 without a copy (that view *is*
    channels-last memory; the encoders of :mod:`mamba2d.wsi.encoders` resize and scale it
    themselves), under bf16 autocast when ``dtype`` is bf16. The encoder's weights are put in
    channels-last layout unless it says it does not support it (``supports_channels_last = False``).
    With ``compile``, the encoder goes through ``torch.compile`` and every batch is padded to
    ``batch_size`` so that it compiles once.
    Returns (b, D) float32 features on ``device``.
    """

    def __init__(self, encoder: nn.Module, device: torch.device, dtype: torch.dtype, batch_size: int,
                 compile: bool = False) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, int(batch_size)
        self.channels_last = bool(getattr(encoder, "supports_channels_last", True))
        encoder = encoder.to(device).eval()
        if self.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder
        self.compiled = bool(compile)
        self._fn: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(encoder, dynamic=False) if compile else encoder)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.compiled and n < self.batch_size:
            pad = batch.new_zeros((self.batch_size - n, *batch.shape[1:]))
            batch = torch.cat([batch, pad])
        x = batch.permute(0, 3, 1, 2)
        if not self.channels_last:
            x = x.contiguous()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            out = self._fn(x)
        return out[:n].float()


class FeatureSink:
    """Rows of an (N, D) float32 h5 dataset filled at their plan positions, in any order; each
    write is one contiguous run of rows. :meth:`check` proves every row was written once."""

    def __init__(self, dataset: object, n: int) -> None:
        self.dataset = dataset
        self.count = np.zeros(n, dtype=np.int32)

    def put(self, index: np.ndarray, features: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        for run, rows in zip(np.split(index, breaks), np.split(features, breaks), strict=True):
            self.dataset[int(run[0]):int(run[-1]) + 1] = rows  # type: ignore[index]
        np.add.at(self.count, index, 1)

    def check(self, where: str) -> None:
        missing, twice = np.flatnonzero(self.count == 0), np.flatnonzero(self.count > 1)
        if len(missing) or len(twice):
            raise RuntimeError(f"{where}: {len(missing)} patches without features and {len(twice)} "
                               "written twice (an extraction bug)")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

def run_patches(dataset: RegionDataset, runner: EncoderRunner, open_sink: Callable[[int], FeatureSink],
                workers: int, clock: StageClock, prefetch: int = 2,
                on_patches: Callable[[int], None] | None = None) -> FeatureSink:
    """Read, encode and write every patch of ``dataset``. ``open_sink(D)`` is called once the
    feature width D is known (after the first batch). ``on_patches(k)`` reports progress.
    Returns the sink (after :meth:`FeatureSink.check`)."""
    device = runner.device
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=cuda,
        prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False)
    clock.workers = workers
    sink: FeatureSink | None = None
    in_flight: deque = deque()

    def land(entry: tuple) -> None:
        nonlocal sink
        host, index, done, start, end = entry
        if cuda:
            done.synchronize()
            clock.add("encode", start.elapsed_time(end) / 1000.0)
        with clock.time("write"):
            features = host.numpy()
            if sink is None:
                sink = open_sink(features.shape[1])
            sink.put(index, features)
        if on_patches is not None:
            on_patches(len(index))

    def launch(batch: torch.Tensor, index: np.ndarray) -> None:
        if cuda:
            start, end, done = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event())
            start.record()
            out = runner(batch)
            end.record()
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done.record()
            in_flight.append((host, index, done, start, end))
            if len(in_flight) > 2:  # keep the device two batches ahead of the writes
                land(in_flight.popleft())
        else:
            with clock.time("encode"):
                out = runner(batch)
            land((out, index, None, None, None))

    pieces: list[torch.Tensor] = []
    indices: list[np.ndarray] = []
    pending = 0
    bs = runner.batch_size
    iterator = iter(loader)
    while True:
        t0 = time.perf_counter()
        item = next(iterator, None)
        clock.add("wait", time.perf_counter() - t0)
        if item is None:
            break
        patches, index, seconds, error = item
        if error:
            raise SlideError(error)
        clock.add("read", float(seconds[0]))
        clock.add("resize", float(seconds[1]))
        pieces.append(patches.to(device, non_blocking=True) if cuda else patches)
        indices.append(index.numpy())
        pending += len(index)
        while pending >= bs:
            batch = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            flat = np.concatenate(indices)
            launch(batch[:bs], flat[:bs])
            pieces, indices = ([batch[bs:]], [flat[bs:]]) if pending > bs else ([], [])
            pending -= bs
    if pending:
        launch(torch.cat(pieces) if len(pieces) > 1 else pieces[0], np.concatenate(indices))
    while in_flight:
        land(in_flight.popleft())
    if sink is None:
        raise RuntimeError(f"{dataset.path}: no patches were encoded")
    sink.check(str(dataset.path))
    return sink
