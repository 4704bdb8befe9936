"""``mamba2d extract``: slides in, TRIDENT-style feature h5 files out (tissue, tiling, encoding).

For each slide: a tissue mask on a thumbnail (QC picture in ``OUT/qc/``), patches on the level-0
lattice at the target magnification, a frozen encoder over batches from a DataLoader, and
``OUT/features/<slide_id>.h5`` written atomically. ``OUT/manifest.csv`` records every slide
(done, failed with the reason, or no tissue) and is rewritten after each one, so a killed run
resumes where it stopped: slides with a finished h5 are skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch

from mamba2d.extras import require
from mamba2d.wsi.slides import Slide, SlideError, open_slide
from mamba2d.wsi.tiling import TilePlan, plan_tiles
from mamba2d.wsi.tissue import TissueParams, save_mask_png, tissue_mask

__all__ = ["SLIDE_EXTENSIONS", "ExtractConfig", "extract_slides", "find_slides", "write_features_h5"]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MANIFEST_COLUMNS = ["slide_id", "path", "status", "n_patches", "seconds", "h5", "error"]


@dataclass
class ExtractConfig:
    """Settings of one extraction run (saved as ``OUT/extract_config.json``)."""

    magnification: float = 20.0
    patch_size: int = 256
    min_tissue: float = 0.5
    encoder: str = "efficientnet_lite0"
    weights: str | None = None
    input_size: int | None = None
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    mpp: float | None = None
    thumbnail_side: int = 2048
    skip_bad: bool = False


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


class _PatchDataset(torch.utils.data.Dataset):
    """The patches of one slide as (3, patch_size, patch_size) uint8 tensors. Each DataLoader
    worker opens its own handle on the slide (readers are not shared across processes)."""

    def __init__(self, path: Path, mpp: float | None, plan: TilePlan) -> None:
        self.path, self.mpp, self.plan = path, mpp, plan
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.plan.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        Image = require("PIL.Image", "wsi")

        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.mpp)
        p = self.plan
        x, y = (int(v) for v in p.coords[i])
        tile = self._slide.read_region((x, y), p.read_level, (p.read_size, p.read_size))
        if p.read_size != p.patch_size:
            tile = np.asarray(Image.fromarray(tile).resize((p.patch_size, p.patch_size),
                                                           Image.Resampling.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)


def write_features_h5(path: Path, features: np.ndarray, plan: TilePlan, slide: Slide, slide_id: str,
                      encoder_name: str, settings: str = "") -> Path:
    """TRIDENT-compatible h5: ``features`` (N, D) float32; ``coords`` (N, 2) int64 level-0 (x, y) with
    the attributes ``patch_size`` (at the target magnification), ``patch_size_level0``,
    ``level0_magnification``, ``target_magnification``, ``level0_width``, ``level0_height``; the file
    attribute ``extract_settings`` records what a resumed run must match."""
    from mamba2d.io import atomic_write

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float32))
            coords = f.create_dataset("coords", data=plan.coords.astype(np.int64))
            attrs = {"patch_size": plan.patch_size, "patch_size_level0": plan.patch_size_level0,
                     "level0_magnification": plan.level0_magnification,
                     "target_magnification": plan.target_magnification,
                     "level0_width": slide.dimensions[0], "level0_height": slide.dimensions[1],
                     "name": slide_id, "savetodir": str(path.parent)}
            for k, v in attrs.items():
                coords.attrs[k] = v
            f.create_dataset("tissue_fraction", data=plan.tissue_fraction.astype(np.float32))
            f.attrs["encoder"] = encoder_name
            f.attrs["extract_settings"] = settings
            f.attrs["mpp"] = slide.mpp if slide.mpp else float("nan")
            f.attrs["slide_path"] = str(slide.path)

    return atomic_write(path, write)


def _settings_tag(cfg: ExtractConfig) -> str:
    """What makes two runs' features interchangeable; stored in each h5 and checked on resume."""
    return (f"encoder={cfg.encoder};weights={cfg.weights};input_size={cfg.input_size};"
            f"magnification={cfg.magnification:g};patch_size={cfg.patch_size};min_tissue={cfg.min_tissue:g}")


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


def extract_slides(slides: str | Path, out: str | Path, cfg: ExtractConfig | None = None,
                   progress: bool = True, log: Callable[[str], Any] = print) -> pd.DataFrame:
    """Run the extraction (see the module docstring). Returns the manifest.

    Raises :class:`SlideError` for the first bad slide unless ``cfg.skip_bad``, in which case it is
    recorded as failed in the manifest and the run goes on.
    """
    from tqdm.auto import tqdm

    from mamba2d.io import write_json, write_text
    from mamba2d.train.distributed import pick_device
    from mamba2d.wsi.encoders import build_encoder

    cfg = cfg or ExtractConfig()
    out = Path(out)
    rows = find_slides(slides)
    (out / "features").mkdir(parents=True, exist_ok=True)
    write_json(out / "extract_config.json", asdict(cfg))
    manifest_path = out / "manifest.csv"
    old = pd.read_csv(manifest_path) if manifest_path.is_file() else pd.DataFrame(columns=MANIFEST_COLUMNS)
    records: dict[str, dict[str, Any]] = {str(r["slide_id"]): r.to_dict() for _, r in old.iterrows()}
    device = pick_device(cfg.device)
    encoder = None

    wanted = [r[0] for r in rows]

    def save_manifest() -> None:
        # The slides of this run, in input order; earlier records of slides no longer listed drop out.
        frame = pd.DataFrame([records[k] for k in wanted if k in records], columns=MANIFEST_COLUMNS)
        write_text(manifest_path, frame.to_csv(index=False))

    bar = tqdm(rows, desc="slides", unit="slide", disable=not progress)
    for slide_id, path, mpp in bar:
        h5 = out / "features" / f"{slide_id}.h5"
        if h5.is_file() and _finished(h5, cfg):
            if records.get(slide_id, {}).get("status") != "done":
                records[slide_id] = {"slide_id": slide_id, "path": str(path), "status": "done", "h5": str(h5)}
            continue
        started = time.perf_counter()
        rec: dict[str, Any] = {"slide_id": slide_id, "path": str(path), "status": "failed", "n_patches": 0,
                               "seconds": 0.0, "h5": "", "error": ""}
        try:
            with open_slide(path, mpp=mpp if mpp is not None else cfg.mpp) as slide:
                thumb, ds = slide.thumbnail(cfg.thumbnail_side)
                um_per_px = slide.mpp * ds if slide.mpp else (10.0 / slide.magnification()) * ds
                mask = tissue_mask(thumb, um_per_px, TissueParams())
                plan = plan_tiles(slide, mask, ds, cfg.magnification, cfg.patch_size, cfg.min_tissue)
                save_mask_png(out / "qc" / f"{slide_id}.png", thumb, mask,
                              title=f"{slide_id}: {len(plan.coords)} patches of {cfg.patch_size} px at "
                                    f"{cfg.magnification:g}x", tiles=plan.coords / ds,
                              tile_px=plan.patch_size_level0 / ds)
                if len(plan.coords) == 0:
                    rec.update(status="no tissue", seconds=round(time.perf_counter() - started, 2))
                    records[slide_id] = rec
                    save_manifest()
                    continue
                if encoder is None:
                    encoder = build_encoder(cfg.encoder, cfg.weights, cfg.input_size).to(device)
                feats = _encode(encoder, _PatchDataset(path, mpp if mpp is not None else cfg.mpp, plan), cfg,
                                device, progress, slide_id)
                write_features_h5(h5, feats, plan, slide, slide_id, getattr(encoder, "name", cfg.encoder),
                                  _settings_tag(cfg))
            rec.update(status="done", n_patches=len(plan.coords), h5=str(h5),
                       seconds=round(time.perf_counter() - started, 2))
            log(f"{slide_id}: {len(plan.coords)} patches, {rec['seconds']:.1f} s "
                f"({len(plan.coords) / max(rec['seconds'], 1e-9):.1f} patches/s)")
        except (SlideError, OSError, ValueError) as err:
            rec.update(error=str(err), seconds=round(time.perf_counter() - started, 2))
            records[slide_id] = rec
            save_manifest()
            if not cfg.skip_bad:
                raise SlideError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from err
            log(f"skipped {slide_id}: {err}")
            continue
        records[slide_id] = rec
        save_manifest()
    save_manifest()
    return pd.read_csv(manifest_path)


@torch.no_grad()
def _encode(encoder: torch.nn.Module, dataset: _PatchDataset, cfg: ExtractConfig, device: torch.device,
            progress: bool, slide_id: str) -> np.ndarray:
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    out = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in tqdm(loader, desc=slide_id, unit="batch", leave=False, disable=not progress):
        x = batch.to(device, non_blocking=True).float() / 255.0
        with autocast:
            out.append(encoder(x).float().cpu())
    return torch.cat(out).numpy()

