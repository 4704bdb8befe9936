"""Patch-extraction throughput on a real slide: reading, encoding, and `extract_slides` end to end.

    python benchmarks/extract_throughput.py --slide cmu_small_region.svs --out-json results.json

Three numbers, in patches per second:
- ``read``: the DataLoader alone (regions of patches read from the slide, resized to the patch size);
- ``encode``: the encoder alone on tiles already in memory (bf16 autocast on CUDA), batches of
  ``--batch-size``, repeated to ``--encode-patches`` patches;
- ``end_to_end``: ``extract_slides`` on the slide (tissue mask, QC picture, tiling, reading,
  encoding, writing the h5), after a warm-up run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mamba2d.train.distributed import pick_device
from mamba2d.wsi.encoders import build_encoder
from mamba2d.wsi.extract import ExtractConfig, extract_slides
from mamba2d.wsi.pipeline import RegionDataset
from mamba2d.wsi.regions import plan_regions, region_block
from mamba2d.wsi.slides import open_slide
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import tissue_mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--out-json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--magnification", type=float, default=20.0)
    ap.add_argument("--patch-size", type=int, default=64, help="small patches: many of them on a small slide")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--encode-patches", type=int, default=2048)
    a = ap.parse_args()
    device = pick_device(a.device)
    cfg = ExtractConfig(magnification=a.magnification, patch_size=a.patch_size, input_size=a.input_size,
                        batch_size=a.batch_size, workers=a.workers, device=str(device))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {platform.machine()})")
    result: dict = {"date": _dt.date.today().isoformat(), "device": name, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "slide": Path(a.slide).name, "config": vars(a)}

    with open_slide(a.slide) as slide:
        thumb, ds = slide.thumbnail(2048)
        mask = tissue_mask(thumb, slide.mpp * ds)
        plan = plan_tiles(slide, mask, ds, a.magnification, a.patch_size)
        regions = plan_regions(plan, region_block(plan.read_size, slide.tile_size(plan.read_level)))
    n = len(plan.coords)
    result["patches"] = n

    # Reading alone.
    loader = torch.utils.data.DataLoader(RegionDataset(Path(a.slide), None, plan, regions), batch_size=None,
                                         num_workers=a.workers)
    t0 = time.perf_counter()
    tiles = torch.cat([item[0] for item in loader]).permute(0, 3, 1, 2)
    result["read_patches_per_s"] = round(n / (time.perf_counter() - t0), 1)

    # Encoding alone, on tiles in memory.
    encoder = build_encoder("efficientnet_lite0", input_size=a.input_size).to(device)
    reps = max(1, a.encode_patches // n)
    batches = [tiles[i:i + a.batch_size] for i in range(0, n, a.batch_size)] * reps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        for b in batches[:2]:  # warm-up (cuDNN algorithm choice, allocator)
            encoder(b.to(device).float() / 255.0)
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            encoder(b.to(device, non_blocking=True).float() / 255.0)
        _sync(device)
    result["encode_patches_per_s"] = round(n * reps / (time.perf_counter() - t0), 1)

    # End to end, after a warm-up run.
    root = Path(tempfile.mkdtemp(prefix="extract-bench-"))
    (root / "slides").mkdir()
    shutil.copy(a.slide, root / "slides" / Path(a.slide).name)
    extract_slides(root / "slides", root / "warm", cfg, progress=False, log=lambda *_: None)
    t0 = time.perf_counter()
    extract_slides(root / "slides", root / "timed", cfg, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    result["end_to_end_seconds"] = round(seconds, 2)
    result["end_to_end_patches_per_s"] = round(n / seconds, 1)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
