"""``mamba2d extract``: slides in, TRIDENT-style feature h5 files out (tissue, tiling, encoding).

For each slide: a tissue mask on a thumbnail (QC picture in ``OUT/qc/``), patches on the level-0
lattice at the target magnification, then the pipeline of :mod:`mamba2d.wsi.pipeline` (regions
of patches read and decoded in worker processes, a frozen encoder on the device, features
streamed into ``OUT/features/<slide_id>.h5``, written under a temporary name and renamed when
complete). Each slide's outcome (done, failed with the reason, or no tissue) is a small JSON
record in ``OUT/manifest/``, merged into ``OUT/manifest.csv``; a rerun skips finished slides and
redoes unfinished ones, so a killed run resumes where it stopped.

Many processes can share one cohort (:mod:`mamba2d.wsi.cohort`): ``torchrun --nproc_per_node=N``
gives each rank (one GPU each) its own slides, and so does ``--shard I/N`` (or ``--shard slurm``)
for job arrays. Slides are independent, so a sharded run writes the same files as one process.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from mamba2d.wsi.cohort import Shard, assign_shards, merge_manifest, parse_shard, read_record, write_record
from mamba2d.wsi.pipeline import (
    EncoderRunner,
    FeatureSink,
    RegionDataset,
    StageClock,
    resolve_precision,
    run_patches,
)
from mamba2d.wsi.regions import plan_regions, region_block
from mamba2d.wsi.slides import Slide, SlideError, open_slide
from mamba2d.wsi.tiling import TilePlan, plan_tiles
from mamba2d.wsi.tissue import TissueParams, save_mask_png, tissue_mask

__all__ = ["SLIDE_EXTENSIONS", "ExtractConfig", "extract_slides", "find_slides", "write_features_h5"]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


@dataclass
class ExtractConfig:
    """Settings of one extraction run (saved as ``OUT/extract_config.json``).

    ``batch_size`` / ``workers``: None picks them for the device (256 patches and up to 16
    reader processes, one core left free, on CUDA; 64 patches and one reader on the CPU).
    ``precision``: ``auto`` (bf16 on CUDA and on CPUs with native bf16, else float32), ``bf16`` or
    ``fp32``. ``encoder_args``: keyword arguments for ``timm.create_model`` (``timm:NAME`` only).
    ``region_px``: side of the regions read at once, in read-level pixels. ``shard``: ``I/N`` or
    ``slurm`` (see :mod:`mamba2d.wsi.cohort`). ``compile``: ``torch.compile`` the encoder.
    ``direct_read``: decode TIFF tiles straight from the file when possible (else through the
    slide backend; both give the same pixels).
    """

    magnification: float = 20.0
    patch_size: int = 256
    min_tissue: float = 0.5
    encoder: str = "efficientnet_lite0"
    weights: str | None = None
    input_size: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    mpp: float | None = None
    thumbnail_side: int = 2048
    skip_bad: bool = False
    encoder_args: dict[str, Any] = field(default_factory=dict)
    precision: str = "auto"
    compile: bool = False
    region_px: int = 2048
    shard: str | None = None
    direct_read: bool = True


def find_slides(source: str | Path) -> list[tuple[str, Path, float | None]]:
    """(slide_id, path, mpp or None) for a folder of slides or a CSV with a ``path`` column
    (optional ``slide_id`` and ``mpp``). Slide ids are file names without the extension."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS)
        if not paths:
            raise ValueError(f"{source}: no slide files ({', '.join(SLIDE_EXTENSIONS)})")
        rows = [(p.stem, p, None) for p in paths]
    elif source.suffix.lower() == ".csv" and source.is_file():
        frame = pd.read_csv(source)
        if "path" not in frame.columns:
            raise ValueError(f"{source}: needs a 'path' column (found {list(frame.columns)})")
        rows = []
        for _, r in frame.iterrows():
            p = Path(str(r["path"]))
            p = p if p.is_absolute() else source.parent / p
            sid = str(r["slide_id"]) if "slide_id" in frame.columns else p.stem
            mpp = float(r["mpp"]) if "mpp" in frame.columns and pd.notna(r["mpp"]) else None
            rows.append((sid, p, mpp))
    else:
        raise ValueError(f"{source}: --slides must be a folder of slides or a CSV with a 'path' column")
    ids = [r[0] for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{source}: slide ids must be unique; repeated: {dupes[:5]}")
    return rows


def _write_header(f: h5py.File, plan: TilePlan, slide: Slide, slide_id: str, folder: Path, encoder_name: str,
                  settings: str, precision: str) -> None:
    """Everything of the TRIDENT layout except the features (see :func:`write_features_h5`)."""
    coords = f.create_dataset("coords", data=plan.coords.astype(np.int64))
    attrs = {"patch_size": plan.patch_size, "patch_size_level0": plan.patch_size_level0,
             "level0_magnification": plan.level0_magnification,
             "target_magnification": plan.target_magnification,
             "level0_width": slide.dimensions[0], "level0_height": slide.dimensions[1],
             "name": slide_id, "savetodir": str(folder)}
    for k, v in attrs.items():
        coords.attrs[k] = v
    f.create_dataset("tissue_fraction", data=plan.tissue_fraction.astype(np.float32))
    f.attrs["encoder"] = encoder_name
    f.attrs["extract_settings"] = settings
    f.attrs["precision"] = precision
    f.attrs["mpp"] = slide.mpp if slide.mpp else float("nan")
    f.attrs["slide_path"] = str(slide.path)


def write_features_h5(path: Path, features: np.ndarray, plan: TilePlan, slide: Slide, slide_id: str,
                      encoder_name: str, settings: str = "", precision: str = "") -> Path:
    """TRIDENT-compatible h5: ``features`` (N, D) float32; ``coords`` (N, 2) int64 level-0 (x, y) with
    the attributes ``patch_size`` (at the target magnification), ``patch_size_level0``,
    ``level0_magnification``, ``target_magnification``, ``level0_width``, ``level0_height``; the file
    attribute ``extract_settings`` records what a resumed run must match. Written atomically."""
    from mamba2d.io import atomic_write

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float32))
            _write_header(f, plan, slide, slide_id, path.parent, encoder_name, settings, precision)

    return atomic_write(path, write)


def _settings_tag(cfg: ExtractConfig) -> str:
    """What makes two runs' features interchangeable; stored in each h5 and checked on resume.
    (Precision, batch size and the device are not in it: they change features within rounding.)"""
    tag = (f"encoder={cfg.encoder};weights={cfg.weights};input_size={cfg.input_size};"
           f"magnification={cfg.magnification:g};patch_size={cfg.patch_size};min_tissue={cfg.min_tissue:g}")
    if cfg.encoder_args:
        tag += ";encoder_args=" + ",".join(f"{k}={cfg.encoder_args[k]!r}" for k in sorted(cfg.encoder_args))
    return tag


def _finished(h5: Path, cfg: ExtractConfig) -> bool:
    """True when ``h5`` is a complete feature file made with these settings. A complete file made
    with other settings is an error: resuming must never mix two encoders or patch sizes in one
    folder."""
    try:
        with h5py.File(h5, "r") as f:
            complete = f["features"].shape[0] == f["coords"].shape[0]
            tag = f.attrs.get("extract_settings")
    except Exception:
        return False  # unreadable or partial: extract it again
    if complete and tag is not None and str(tag) != _settings_tag(cfg):
        raise ValueError(f"{h5} was extracted with other settings ({tag}); this run asks for "
                         f"{_settings_tag(cfg)}: use another --out")
    return bool(complete and tag is not None)




# --------------------------------------------------------------------------------------------------
# Running a cohort
# --------------------------------------------------------------------------------------------------

def _torchrun() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, 0) without it."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def _device_for(preference: str, local_rank: int, world: int) -> torch.device:
    from mamba2d.train.distributed import pick_device

    device = pick_device(preference)
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _auto_workers(device: torch.device, local_world: int) -> int:
    cpus = max(1, _usable_cpus() // max(local_world, 1))
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 1 if cpus >= 2 else 0


@dataclass
class _Worker:
    """What one process needs to extract its slides: settings, device, encoder (built once)."""

    cfg: ExtractConfig
    out: Path
    device: torch.device
    shard: Shard
    workers: int
    batch_size: int
    log: Callable[[str], Any]
    progress: bool
    runner: EncoderRunner | None = None
    encoder_name: str = ""

    @property
    def tag(self) -> str:
        return _settings_tag(self.cfg)

    @property
    def prefix(self) -> str:
        return f"[shard {self.shard}] " if self.shard.count > 1 else ""

    def encoder(self) -> EncoderRunner:
        if self.runner is None:
            from mamba2d.wsi.encoders import build_encoder

            cfg = self.cfg
            encoder = build_encoder(cfg.encoder, cfg.weights, cfg.input_size, encoder_args=cfg.encoder_args)
            self.encoder_name = str(getattr(encoder, "name", cfg.encoder))
            self.runner = EncoderRunner(encoder, self.device, resolve_precision(cfg.precision, self.device),
                                        self.batch_size, compile=cfg.compile)
        return self.runner


def extract_slides(slides: str | Path, out: str | Path, cfg: ExtractConfig | None = None,
                   progress: bool = True, log: Callable[[str], Any] = print) -> pd.DataFrame:
    """Extract the slides of ``slides`` (a folder or CSV, see :func:`find_slides`) that fall to this
    process: all of them, or this shard's under ``cfg.shard`` and / or torchrun. Returns the merged
    manifest of every slide of ``slides`` that has a record; ``frame.attrs["shard"]`` names this
    process's shard and ``frame.attrs["mine"]`` lists its slide ids.

    Raises :class:`SlideError` for the first bad slide unless ``cfg.skip_bad``, in which case it is
    recorded as failed in the manifest and the run goes on.
    """
    cfg = cfg or ExtractConfig()
    rows = find_slides(slides)
    rank, world, local_rank = _torchrun()
    shard = parse_shard(cfg.shard).within(rank, world)
    device = _device_for(cfg.device, local_rank, world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    workers = cfg.workers if cfg.workers is not None else _auto_workers(device, local_world)
    batch = cfg.batch_size or (256 if device.type == "cuda" else 64)
    if batch < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch}, {workers})")
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    if shard.index == 0:
        from mamba2d.io import write_json

        write_json(out / "extract_config.json", asdict(cfg))
    sizes = [_file_size(path) for _, path, _ in rows]
    mine = [rows[i] for i in assign_shards(sizes, shard.count)[shard.index]]
    worker = _Worker(cfg, out, device, shard, workers, batch, log, progress)
    if mine:
        worker.encoder()  # bad weights or encoder settings stop the run before any slide is read
    all_ids = [r[0] for r in rows]
    _process_shard(worker, mine, all_ids)
    frame = merge_manifest(out, all_ids)
    frame.attrs["shard"] = str(shard)
    frame.attrs["mine"] = [r[0] for r in mine]
    return frame


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _process_shard(worker: _Worker, rows: list[tuple[str, Path, float | None]], all_ids: list[str]) -> None:
    """Extract ``rows`` one slide after another (see :func:`extract_slides`); ``all_ids``: every
    slide of the run, which the manifest lists (other processes do the rest)."""
    from tqdm.auto import tqdm

    out, cfg = worker.out, worker.cfg
    last_merge = time.monotonic()
    bar = tqdm(rows, desc=f"{worker.prefix}slides", unit="slide", disable=not worker.progress)
    for slide_id, path, mpp in bar:
        h5 = out / "features" / f"{slide_id}.h5"
        if h5.is_file() and _finished(h5, cfg):
            old = read_record(out, slide_id)
            if old is None or old.get("status") != "done":
                write_record(out, _record(slide_id, path, "done", worker, h5=str(h5)))
            continue
        old = read_record(out, slide_id)
        if old is not None and old.get("status") == "no tissue" and old.get("settings") == worker.tag:
            continue
        for stale in (out / "features").glob(f".{slide_id}.h5.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a killed run
        write_record(out, _record(slide_id, path, "running", worker))
        try:
            rec = _extract_one(worker, slide_id, path, mpp if mpp is not None else cfg.mpp, h5)
        except (SlideError, OSError, ValueError) as err:
            write_record(out, _record(slide_id, path, "failed", worker, error=str(err)))
            if not cfg.skip_bad:
                merge_manifest(out, all_ids)
                raise SlideError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from err
            worker.log(f"{worker.prefix}skipped {slide_id}: {err}")
            continue
        except BaseException as err:
            write_record(out, _record(slide_id, path, "failed", worker,
                                      error=f"interrupted: {type(err).__name__}: {err}"))
            raise
        write_record(out, rec)
        if time.monotonic() - last_merge > 30:
            merge_manifest(out, all_ids)
            last_merge = time.monotonic()


def _record(slide_id: str, path: Path, status: str, worker: _Worker, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"slide_id": slide_id, "path": str(path), "status": status, "n_patches": 0,
                           "seconds": 0.0, "h5": "", "error": "", "patches_per_s": 0.0,
                           "worker": f"{socket.gethostname()}:{os.getpid()} shard {worker.shard}",
                           "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
                           "settings": worker.tag, "device": str(worker.device)}
    rec.update(extra)
    return rec


def _extract_one(worker: _Worker, slide_id: str, path: Path, mpp: float | None, h5: Path) -> dict[str, Any]:
    """One slide, end to end; returns its record."""
    from tqdm.auto import tqdm

    from mamba2d.io import atomic_write

    cfg, out = worker.cfg, worker.out
    started = time.perf_counter()
    clock = StageClock()
    with clock.time("open"):
        slide = open_slide(path, mpp=mpp)
    with slide:
        with clock.time("mask"):
            thumb, ds = slide.thumbnail(cfg.thumbnail_side)
            um_per_px = slide.mpp * ds if slide.mpp else (10.0 / slide.magnification()) * ds
            mask = tissue_mask(thumb, um_per_px, TissueParams())
            plan = plan_tiles(slide, mask, ds, cfg.magnification, cfg.patch_size, cfg.min_tissue)
        with clock.time("qc"):
            save_mask_png(out / "qc" / f"{slide_id}.png", thumb, mask,
                          title=f"{slide_id}: {len(plan.coords)} patches of {cfg.patch_size} px at "
                                f"{cfg.magnification:g}x", tiles=plan.coords / ds,
                          tile_px=plan.patch_size_level0 / ds)
        n = len(plan.coords)
        if n == 0:
            wall = time.perf_counter() - started
            worker.log(f"{worker.prefix}{slide_id}: no tissue ({wall:.1f} s)")
            return _record(slide_id, path, "no tissue", worker, seconds=round(wall, 2),
                           stages=clock.seconds)
        runner = worker.encoder()
        block = region_block(plan.read_size, slide.tile_size(plan.read_level), cfg.region_px)
        dataset = RegionDataset(path, mpp, plan, plan_regions(plan, block), direct=cfg.direct_read)
        bar = tqdm(total=n, desc=f"{worker.prefix}{slide_id}", unit="patch", leave=False,
                   disable=not worker.progress, smoothing=0.1)
        shown = [time.perf_counter()]

        def on_patches(k: int) -> None:
            bar.update(k)
            now = time.perf_counter()
            if worker.progress and now - shown[0] > 1.0:
                bar.set_postfix_str(clock.summary(now - started), refresh=False)
                shown[0] = now

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                _write_header(f, plan, slide, slide_id, h5.parent, worker.encoder_name, worker.tag,
                              str(runner.dtype).replace("torch.", ""))

                def open_sink(dim: int) -> FeatureSink:
                    return FeatureSink(f.create_dataset("features", shape=(n, dim), dtype=np.float32), n)

                run_patches(dataset, runner, open_sink, worker.workers, clock, on_patches=on_patches)
                finishing[0] = time.perf_counter()

        finishing = [0.0]
        try:
            atomic_write(h5, write)
        finally:
            bar.close()
        clock.add("finish", time.perf_counter() - finishing[0])
    wall = time.perf_counter() - started
    rate = n / max(wall, 1e-9)
    worker.log(f"{worker.prefix}{slide_id}: {n} patches in {wall:.1f} s ({rate:.1f} patches/s) | "
               f"{clock.summary(wall)}")
    return _record(slide_id, path, "done", worker, n_patches=n, seconds=round(wall, 2), h5=str(h5),
                   patches_per_s=round(rate, 1), stages={k: round(v, 3) for k, v in clock.seconds.items()},
                   workers=worker.workers)
