"""``mamba2d extract``: whole-slide images to TRIDENT-style feature h5 files."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import Subparsers

DESCRIPTION = """\
Whole-slide images (.svs, .tif, .ndpi, .mrxs, ...) to patch features, offline.
Per slide: a tissue mask (Otsu on saturation, clean-up) with a QC picture in OUT/qc/,
non-overlapping patches on the level-0 lattice at --magnification, read a region at a
time by --workers processes, a frozen encoder (channels-last, bf16 where native), and
OUT/features/<slide>.h5 (features, coords + patch-size attributes) that
`mamba2d train --features OUT/features` reads as is. Each slide gets a record in
OUT/manifest/, merged into OUT/manifest.csv; a rerun skips finished slides.
Many processes: `torchrun --nproc_per_node=N -m mamba2d extract ...` (one GPU per
rank) or --shard I/N / --shard slurm (job arrays) split the slides between them.
Slides are read with tiffslide (or openslide)."""


def add_parser(sub: Subparsers) -> None:
    ext = sub.add_parser(
        "extract",
        help="slides to TRIDENT-style feature h5 files: tissue mask, tiling, frozen encoder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_slide_flags(ext)
    _add_encoder_flags(ext)
    _add_run_flags(ext)
    ext.set_defaults(func=run)


def _add_slide_flags(ext: argparse.ArgumentParser) -> None:
    ext.add_argument("--slides", required=True, help="a folder of slides, or a CSV with path[,slide_id,mpp]")
    ext.add_argument("--out", required=True, help="output folder")
    ext.add_argument("--magnification", type=float, default=20.0, help="target magnification (default 20)")
    ext.add_argument("--patch-size", type=int, default=256,
                     help="patch side at that magnification (default 256)")
    ext.add_argument("--min-tissue", type=float, default=0.5,
                     help="keep patches at least this fraction tissue (default 0.5)")


def _add_encoder_flags(ext: argparse.ArgumentParser) -> None:
    ext.add_argument("--encoder", default="efficientnet_lite0",
                     help="efficientnet_lite0 (packaged ImageNet weights), timm:NAME or torchscript:PATH")
    ext.add_argument("--weights",
                     help="local weight file: a state dict read with torch.load(weights_only=True), or "
                          ".safetensors (needed for timm:NAME; optional for efficientnet_lite0)")
    ext.add_argument("--encoder-arg", action="append", metavar="KEY=VALUE",
                     help="keyword argument for timm.create_model, value read as YAML (repeatable), e.g. "
                          "UNI: --encoder-arg img_size=224 --encoder-arg init_values=1e-5 "
                          "--encoder-arg dynamic_img_size=true")
    ext.add_argument("--input-size", type=int, help="encoder input side (default: the encoder's, 224)")
    ext.add_argument("--batch-size", type=int, help="patches per batch (default: 256 on CUDA, 64 on CPU)")
    ext.add_argument("--workers", type=int,
                     help="reader processes (default: on CUDA the cores less one, at most 16; on CPU 1)")
    ext.add_argument("--device", default="auto",
                     help="auto, cpu, cuda or cuda:N (under torchrun: each rank's own GPU)")
    ext.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                     help="encoder arithmetic: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    ext.add_argument("--compile", action="store_true",
                     help="torch.compile the encoder (slow start, faster on some CPUs)")


def _add_run_flags(ext: argparse.ArgumentParser) -> None:
    ext.add_argument("--region-px", type=int, default=2048,
                     help="side of the regions read at once, in pixels (default 2048)")
    ext.add_argument("--shard", metavar="I/N|slurm",
                     help="extract only shard I of N (0-based), or the SLURM array task's shard "
                          "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)")
    ext.add_argument("--mpp", type=float, help="level-0 microns per pixel, for slides that do not record it")
    ext.add_argument("--skip-bad", action="store_true",
                     help="record unreadable slides in the manifest and go on")
    ext.add_argument("--no-progress", action="store_true",
                     help="no progress bars: one plain line per slide (patches/s and stage breakdown)")


def run(args: argparse.Namespace) -> int:
    from mamba2d.wsi.encoders import parse_encoder_args
    from mamba2d.wsi.extract import ExtractConfig, extract_slides

    cfg = ExtractConfig(magnification=args.magnification, patch_size=args.patch_size,
                        min_tissue=args.min_tissue, encoder=args.encoder, weights=args.weights,
                        input_size=args.input_size, batch_size=args.batch_size, workers=args.workers,
                        device=args.device, mpp=args.mpp, skip_bad=args.skip_bad,
                        encoder_args=parse_encoder_args(args.encoder_arg), precision=args.precision,
                        compile=args.compile, region_px=args.region_px, shard=args.shard)
    manifest = extract_slides(args.slides, args.out, cfg, progress=not args.no_progress)
    mine = manifest[manifest["slide_id"].isin(manifest.attrs.get("mine", []))]
    counts = mine["status"].value_counts().to_dict()
    shard = manifest.attrs.get("shard", "0/1")
    where = f"shard {shard}: " if shard != "0/1" else ""
    print(f"{where}{len(mine)} slides: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f"; features in {args.out}/features, manifest {args.out}/manifest.csv "
            f"({len(manifest)} slides listed), QC images {args.out}/qc")
    return 0 if counts.get("failed", 0) == 0 else 1
