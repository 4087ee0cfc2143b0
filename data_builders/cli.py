"""``cosmic data nuclei | tfds | synthetic``: dataset builders on the command line.

Heavy imports (scikit-image, tensorflow_datasets, the synthetic generator's stack) happen inside
the command functions so ``cosmic --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build datasets (nuclei crops, TFDS, synthetic)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("nuclei", help="segment nuclei in real images and write a crop dataset")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="use every shipped real nuclei image")
    src.add_argument("--images", nargs="+", metavar="GLOB", help="folders, globs or files")
    p.add_argument("--out", required=True, help="output crop dataset folder")
    p.add_argument("--crop-size", type=int, default=64)
    p.add_argument("--norm", choices=("crop", "image"), default="crop",
                   help="crop: per-nucleus p1..p99 -> [0,1]; image: / frame foreground p99.9")  # fmt: skip
    p.add_argument("--workers", type=int, default=0, help="0 = in-process; K = K processes")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n",
                   help="job i of n independent jobs (disjoint blocks of the sorted sources)")  # fmt: skip
    p.add_argument("--downscale-large", action="store_true",
                   help="shrink nuclei larger than the crop instead of dropping them")  # fmt: skip
    p.add_argument("--skip-empty", action="store_true",
                   help="count and skip frames without nuclei instead of failing (on for --demo)")  # fmt: skip
    p.add_argument("--channel", type=int, default=None, help="nucleus channel of RGB(A) images")
    p.add_argument("--records-per-shard", type=int, default=4096)
    seg = p.add_argument_group("segmentation")
    seg.add_argument("--background-radius", type=int, default=25)
    seg.add_argument("--sigma", type=float, default=1.0)
    seg.add_argument("--noise-k", type=float, default=3.0)
    seg.add_argument("--min-area", type=int, default=30)
    seg.add_argument("--max-area", type=int, default=0, help="0 = no upper limit")
    seg.add_argument("--min-distance", type=int, default=4)
    p.set_defaults(func=run_nuclei)

    t = sub.add_parser("tfds", help="re-pack a crop dataset as a TFDS (array_record) dataset")
    t.add_argument("--crops", required=True, help="crop dataset folder (cosmic data nuclei --out)")
    t.add_argument("--out", required=True, help="TFDS data_dir")
    t.set_defaults(func=run_tfds)

    s = sub.add_parser("synthetic", help="synthetic paired image/expression dataset")
    try:
        from data_builders import synthetic
    except ModuleNotFoundError as e:
        if e.name != "data_builders.synthetic":
            raise
        synthetic = None
    if synthetic is not None and hasattr(synthetic, "add_arguments") and hasattr(synthetic, "run"):
        synthetic.add_arguments(s)
        s.set_defaults(func=run_synthetic)
    else:  # module not written yet (or mid-edit): keep the rest of the CLI usable
        s.set_defaults(func=_synthetic_missing)


def run_nuclei(args) -> int:
    from data_builders import images, nuclei, segment

    _setup_logging()
    sources = images.demo_images() if args.demo else images.find_images(args.images)
    seg_params = segment.SegmentParams(
        background_radius=args.background_radius,
        sigma=args.sigma,
        noise_k=args.noise_k,
        min_area=args.min_area,
        max_area=args.max_area,
        min_distance=args.min_distance,
    )
    crop_params = nuclei.CropParams(
        size=args.crop_size,
        norm=args.norm,
        downscale_large=args.downscale_large,
        skip_empty=args.skip_empty or args.demo,  # the demo z-stack has empty end slices
        channel=args.channel,
    )
    manifest = nuclei.build_dataset(
        sources,
        args.out,
        seg_params,
        crop_params,
        workers=args.workers,
        shard=args.shard,
        records_per_shard=args.records_per_shard,
        progress=True,
    )
    print(json.dumps({"out": args.out, "num_records": manifest["num_records"], **manifest["build"]["stats"]}))
    return 0


def run_tfds(args) -> int:
    from data_builders import tfds_nuclei

    _setup_logging()
    builder = tfds_nuclei.build_tfds(args.crops, args.out)
    print(json.dumps({"out": str(builder.data_path), "num_examples": builder.info.splits["train"].num_examples}))
    return 0


def run_synthetic(args) -> int:
    from data_builders import synthetic

    _setup_logging()
    return int(synthetic.run(args) or 0)


def _synthetic_missing(args) -> int:
    raise SystemExit(
        "cosmic data synthetic: data_builders/synthetic.py (with add_arguments(parser) and "
        "run(args)) is not available yet"
    )
