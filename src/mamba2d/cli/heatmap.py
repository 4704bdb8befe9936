"""``mamba2d heatmap``: a trained model's attention over a whole slide (PNG, CSV, GeoJSON)."""

from __future__ import annotations

import argparse

from mamba2d.cli.common import Subparsers

DESCRIPTION = """\
Run one model of a training run on a slide's feature bag and paint each patch's
attention weight over the slide. Writes OUT (the slide beside the overlay, with a
colour bar and the prediction in the title) and, beside it, OUT.csv (x,y,width,height,
score per patch: level-0 pixels and the raw attention weight) and OUT.geojson (the
patches as square tiles with an 'attention' measurement; drag it onto the slide in
QuPath).

The bag's coordinates must be level-0 pixels of this slide, as CLAM and TRIDENT write
them. Colours are percentiles of the patches' attention (--scale max: attention / its
maximum, linear)."""

EPILOG = "example:\n  mamba2d heatmap --run runs/2d --slide slides/s1.svs --features feats/s1.h5 --out s1.png"


def add_parser(sub: Subparsers) -> None:
    hm = sub.add_parser(
        "heatmap",
        help="draw a trained model's attention over a whole slide (PNG, plus CSV and GeoJSON scores)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_inputs(hm.add_argument_group("inputs and output"))
    _add_drawing(hm.add_argument_group("drawing"))
    _add_model_and_slide(hm.add_argument_group("model and slide"))
    hm.set_defaults(func=run)


def _add_inputs(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--run", required=True, metavar="RUN_DIR",
                       help="run directory written by `mamba2d train`")
    group.add_argument("--slide", metavar="PATH", help="the whole-slide image (.svs, .tif, ...)")
    group.add_argument("--features", metavar="H5",
                       help="the slide's feature bag (CLAM/TRIDENT .h5, or CLAM .pt with its patches h5)")
    group.add_argument("--slides-csv", metavar="CSV",
                       help="a batch instead: a CSV with columns slide,features[,slide_id] (paths relative "
                            "to the CSV); --out is then a new folder")
    group.add_argument("--out", required=True, metavar="PNG|DIR",
                       help="output PNG (OUT.csv and OUT.geojson go beside it), or the folder of a batch")


def _add_drawing(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--level", default="auto", metavar="auto|K",
                       help="draw on a thumbnail of at most --max-side pixels (auto), or on pyramid level K "
                            "read whole (default: auto)")
    group.add_argument("--max-side", type=int, default=2048, metavar="PIXELS",
                       help="longer side of the auto thumbnail (default: 2048)")
    group.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0 to 1 (default: 0.5)")
    group.add_argument("--cmap", default="jet", metavar="NAME",
                       help="matplotlib colour map, e.g. jet, viridis, inferno, coolwarm (default: jet)")
    group.add_argument("--blur", action="store_true",
                       help="smooth the heatmap inside the tissue (Gaussian, sigma half a patch)")
    group.add_argument("--scale", default="percentile", choices=("percentile", "max"),
                       help="colour by percentile among the patches, or by attention / max "
                            "(default: percentile)")


def _add_model_and_slide(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fold-seed", metavar="foldK_seedS",
                       help="which model of the run (default: the first, e.g. fold0_seed0)")
    group.add_argument("--mpp", type=float, metavar="X",
                       help="level-0 microns per pixel, when the slide lacks it (for the scale bar)")
    group.add_argument("--patch-size", type=int, metavar="PIXELS",
                       help="level-0 patch size, when the feature file lacks it (default: the run's)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def run(args: argparse.Namespace) -> int:
    from mamba2d.wsi.slide_heatmap import run_heatmap, run_heatmaps

    options = dict(level=args.level, max_side=args.max_side, alpha=args.alpha, cmap=args.cmap, blur=args.blur,
                   scale=args.scale, mpp=args.mpp, device=args.device, fold_seed=args.fold_seed,
                   patch_size=args.patch_size)
    if args.slides_csv:
        if args.slide or args.features:
            raise ValueError("give either --slides-csv or --slide with --features, not both")
        rows = run_heatmaps(args.run, args.slides_csv, args.out, **options)
        failed = [r for r in rows if "error" in r]
        print(f"{len(rows) - len(failed)} of {len(rows)} heatmaps in {args.out}/ (index: "
              f"{args.out}/heatmaps.csv)" + (f"; {len(failed)} failed, see heatmaps.csv" if failed else ""))
        return 1 if failed else 0
    if not (args.slide and args.features):
        raise ValueError("give --slide and --features (one slide), or --slides-csv (a batch)")
    info = run_heatmap(args.run, args.slide, args.features, args.out, **options)
    print(f"{info['slide_id']}: {info['model']} {info['prediction']}; heatmap {info['png']}, "
          f"scores {info['csv']}, {info['geojson']}")
    return 0
