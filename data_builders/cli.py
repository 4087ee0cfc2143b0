"""``cosmic data nuclei | paired | orient | tfds | synthetic``: dataset builders on the command line.

Registered with ``cosmic`` through the ``cosmic.commands`` entry point. Settings use the one config
system (``--config.crop.size=96``, ``--config.segment.noise_k=4``; ``configs/nuclei.py``); flags are
for inputs and outputs. Heavy imports (scikit-image, tensorflow_datasets, the synthetic generator's
stack) happen inside the command functions so ``cosmic --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging

from cosmic_jax.commands import add_config, setup_logging
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs import nuclei as nuclei_configs

log = logging.getLogger(__name__)


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build datasets (nuclei crops, TFDS, synthetic)")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("nuclei", help="segment nuclei in real images and write a crop dataset")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="use every shipped real nuclei image")
    src.add_argument("--images", nargs="+", metavar="GLOB", help="folders, globs or files")
    p.add_argument("--masks", nargs="+", metavar="GLOB", default=None,
                   help="instance label images (integer, 0 = background), one per image (a (T, H, W) "
                        "stack for a T-frame image); crops exactly their instances, no segmentation. "
                        "Paired by key: the mask of <images root>/a/b.tif is <masks root>/a/b<SUFFIX>.<ext>")  # fmt: skip
    p.add_argument("--mask-suffix", default=None, metavar="SUFFIX",
                   help="mask name suffix, e.g. _mask or '' (same name, other folder); default: try "
                        "'', _mask, _masks, _label, _labels, _seg, _cp_masks")  # fmt: skip
    p.add_argument("--out", required=True, help="output crop dataset folder (replaced only when the build succeeds)")
    p.add_argument("--save-labels", default=None, metavar="DIR",
                   help="write the instance labels used for each image as DIR/<key>.tif (uint16/uint32; "
                        "multi-page for stacks, all-0 pages for skipped frames); usable as --masks")  # fmt: skip
    p.add_argument("--pixel-size", type=_positive, default=None, metavar="UM",
                   help="microns per input pixel (default: from TIFF metadata where present); with "
                        "--config.crop.target_pixel_size every frame is rescaled to that scale")  # fmt: skip
    p.add_argument("--channel", type=int, default=None, help="nucleus channel of RGB(A) images")
    p.add_argument("--skip-empty", action="store_true",
                   help="count and skip frames without nuclei instead of failing (on for --demo; "
                        "same as --config.crop.skip_empty=true)")  # fmt: skip
    p.add_argument("--workers", type=int, default=0, help="0 = in-process; K = K processes")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="i/n",
                   help="job i of n independent jobs (disjoint blocks of the sorted sources)")  # fmt: skip
    add_config(p, nuclei_configs, "default")
    p.set_defaults(func=run_nuclei)

    q = sub.add_parser("paired", help="import a lab's paired data: AnnData of counts + one image per cell")
    q.add_argument("--adata", required=True, help="cells .h5ad (one row per cell; counts in X, --layer or --use-raw)")
    q.add_argument("--images", required=True,
                   help="(N, H, W[, C]) stack (.npy or multi-page TIFF) in AnnData row order, or a folder "
                        "of <cell_id>.<tif|tiff|png|npy> files")  # fmt: skip
    q.add_argument("--masks", default=None, help="optional per-cell masks, same layout; pixels outside are set to 0")
    q.add_argument("--out", required=True, help="output folder: cells.h5ad + crops/ (replaced only on success)")
    q.add_argument("--cell-id-key", default=None, help="obs column with the cell ids (default obs['cell_id'] or obs_names)")
    q.add_argument("--layer", default=None, help="take the counts from this layer instead of X")
    q.add_argument("--use-raw", action="store_true", help="take the counts (and genes) from adata.raw")
    add_config(q, nuclei_configs, "paired")
    q.set_defaults(func=run_paired)

    o = sub.add_parser("orient", help="an oriented copy of a crop dataset, to pretrain an MAE in the pose "
                                      "`cosmic analyze` embeds (reuse it with --mae)")
    o.add_argument("--crops", required=True, nargs="+", metavar="CROPS",
                   help="crop dataset folder; several go into one copy, each magnified by its own factor")
    o.add_argument("--out", required=True, help="output folder (an earlier oriented copy there is replaced once the new "
                                                 "one is complete; anything else is refused)")
    fill = analyze_configs.get_config().orient_fill
    o.add_argument("--fill", type=float, default=fill, metavar="F",
                   help=f"magnify so the 95th-percentile nucleus spans F of the crop side (default {fill}, as "
                        "`cosmic analyze`; 0 = keep the scale)")
    o.add_argument("--size", type=int, default=None, metavar="N",
                   help="side of the oriented crops (default: the source's), e.g. the input size of the MAE to "
                        "pretrain or reuse")
    o.set_defaults(func=run_orient)

    t = sub.add_parser("tfds", help="re-pack a crop dataset as a TFDS (array_record) dataset")
    t.add_argument("--crops", required=True, help="crop dataset folder (cosmic data nuclei --out)")
    t.add_argument("--out", required=True, help="TFDS data_dir")
    t.set_defaults(func=run_tfds)

    s = sub.add_parser("synthetic", help="synthetic paired image/expression dataset")
    from data_builders import synthetic

    synthetic.add_arguments(s)
    s.set_defaults(func=run_synthetic)


def run_nuclei(args) -> int:
    from data_builders import images, nuclei, segment

    setup_logging()
    cfg = args.cfg
    sources = images.demo_images() if args.demo else images.find_images(args.images)
    masks = None
    if args.masks is not None:
        sources, masks = images.pair_masks(sources, images.find_images(args.masks), args.mask_suffix)
    crop = dict(cfg.crop.to_dict(), skip_empty=cfg.crop.skip_empty or args.skip_empty or args.demo)
    if args.channel is not None:
        crop["channel"] = args.channel
    if args.pixel_size is not None:
        crop["pixel_size"] = args.pixel_size
    manifest = nuclei.build_dataset(
        sources, args.out, segment.segment_params(**cfg.segment.to_dict()), nuclei.crop_settings(**crop),
        workers=args.workers, shard=args.shard, records_per_shard=cfg.records_per_shard,
        float_storage=cfg.float_storage, progress=True,
        masks=masks, labels_dir=args.save_labels,
    )  # fmt: skip
    print(json.dumps({"out": args.out, "num_records": manifest["num_records"], **manifest["build"]["stats"]}))
    return 0


def run_paired(args) -> int:
    from data_builders import paired

    setup_logging()
    summary = paired.build_paired(
        args.adata, args.images, args.out, masks=args.masks, cell_id_key=args.cell_id_key, layer=args.layer,
        use_raw=args.use_raw, norm=args.cfg.crop.norm, records_per_shard=args.cfg.records_per_shard,
        float_storage=args.cfg.float_storage,
    )  # fmt: skip
    print(json.dumps(summary))
    return 0


def run_orient(args) -> int:
    from cosmic_jax.data.orient import dataset_pose, write_oriented

    setup_logging()
    if not 0.0 <= args.fill <= 2.0:
        raise ValueError(f"--fill {args.fill}: must be in [0, 2] (0 = keep the scale)")
    out = write_oriented(args.crops, args.out, fill=args.fill or None, size=args.size,
                         progress=lambda done, total: log.info("oriented %d / %d crops", done, total))
    print(json.dumps({"out": args.out, **dataset_pose(out)}))
    return 0


def run_tfds(args) -> int:
    from data_builders import tfds_nuclei

    setup_logging()
    builder = tfds_nuclei.build_tfds(args.crops, args.out)
    print(json.dumps({"out": str(builder.data_path), "num_examples": builder.info.splits["train"].num_examples}))
    return 0


def run_synthetic(args) -> int:
    from data_builders import synthetic

    setup_logging()
    return int(synthetic.run(args) or 0)
