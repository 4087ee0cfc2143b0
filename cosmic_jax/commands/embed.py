"""``cosmic embed`` and ``cosmic export``: embed a crop dataset, or write a portable export.

    cosmic embed --checkpoint W --input CROPS --output emb.npy [--config.pool=cls --config.layer=-2]
    cosmic embed --export DIR --input CROPS --output cells.h5ad    (runs the export's StableHLO program)
    cosmic export --checkpoint W --out DIR

FILE.npy gets (N, D) rows in crop-dataset order. A new FILE.h5ad gets obs_names = cell_id in crop
order, the crops' metadata (source, frame, centroid, area, ...) in obs, centroids in
obsm['spatial'] and the embedding in obsm[--key]; an existing FILE.h5ad keeps its cells and order
(matched by cell_id) and gains obsm[--key].
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cosmic_jax.commands import add_config, setup_logging
from cosmic_jax.configs import embed as embed_configs
from cosmic_jax.runtime import apply_cpu_devices

OUTPUT_KINDS = (".npy", ".h5ad")
ORIENT = {"auto": None, "yes": True, "no": False}


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="embed a crop dataset with a pretrained MAE (checkpoint or export)",
                              description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="W", help="a `cosmic pretrain` workdir")
    src.add_argument("--export", metavar="DIR", help="an export directory (`cosmic export`)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that restores)")
    p.add_argument("--input", required=True, metavar="CROPS", help="crop dataset directory")
    p.add_argument("--output", required=True, metavar="FILE", help="FILE.npy or FILE.h5ad")
    p.add_argument("--key", default="X_cosmic", help="obsm key for .h5ad output")
    p.add_argument("--id-key", default=None,
                   help="obs column with cell ids in an existing .h5ad (default: cell_id column, else obs_names)")
    add_config(p, embed_configs, "default")
    p.set_defaults(func=run_embed)

    e = subparsers.add_parser("export", help="write a self-contained export (safetensors + StableHLO) of an encoder",
                              description=__doc__)
    e.add_argument("--checkpoint", required=True, metavar="W", help="a `cosmic pretrain` workdir")
    e.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that restores)")
    e.add_argument("--with-decoder", action="store_true", help="also store the full MAE weights")
    e.add_argument("--overwrite", action="store_true", help="replace an existing DIR (only once the new one is complete)")
    add_config(e, embed_configs, "default")
    e.set_defaults(func=run_export)


def _make_embedder(args):
    # Imported here, not at the top: jax must load after apply_cpu_devices has split the CPU, and
    # `cosmic --help` must not pay for jax.
    from cosmic_jax.embed.embedder import Embedder, parse_layers

    cfg = args.cfg
    if str(cfg.orient) not in ORIENT:
        raise ValueError(f"--config.orient={cfg.orient}: use one of {', '.join(ORIENT)}")
    orient = ORIENT[str(cfg.orient)]
    if args.export:
        if args.step is not None:
            raise ValueError("--step applies to --checkpoint only; an export holds one step")
        baked = [o for o in args.config_overrides
                 if o.lstrip("-").startswith(("config.layer", "config.pool", "config.dihedral"))]
        if baked:
            raise ValueError(f"{args.export}: an export has its read-out (layer, pool, dihedral) baked in; "
                             f"drop {' '.join(baked)}")
        return Embedder.from_export(args.export, batch_size=cfg.batch_size, orient=orient)
    return Embedder.from_checkpoint(args.checkpoint, step=args.step, layer=parse_layers(cfg.layer), pool=cfg.pool,
                                    dihedral=cfg.dihedral, batch_size=cfg.batch_size, orient=orient)


def run_embed(args: argparse.Namespace) -> int:
    setup_logging()
    out = os.path.abspath(args.output)
    kind = os.path.splitext(out)[1].lower()
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"--output {args.output}: must end in .npy or .h5ad")
    apply_cpu_devices(args.cfg.cpu_devices, args.cfg.batch_size)
    import numpy as np  # after the CPU split: jax and friends load below

    from cosmic_jax.data.anndata_io import new_anndata, read_h5ad, write_h5ad

    emb = _make_embedder(args)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if kind == ".npy":
        x, _ = emb.embed_dataset(args.input)
        tmp = out + ".tmp.npy"
        np.save(tmp, x)
        os.replace(tmp, out)
    else:
        if os.path.exists(out):
            adata = read_h5ad(out)
            x = emb.embed_anndata(adata, args.input, key=args.key, id_key=args.id_key)
        else:
            x, ids = emb.embed_dataset(args.input)
            adata = new_anndata(args.input, ids)
            adata.obsm[args.key] = x
            adata.uns[args.key + "_meta"] = emb.metadata()
        write_h5ad(adata, out)
    print(json.dumps({"output": args.output, "shape": list(x.shape), **emb.metadata()}), file=sys.stdout)
    return 0


def run_export(args: argparse.Namespace) -> int:
    setup_logging()
    from cosmic_jax.embed.embedder import parse_layers  # not at the top: see _make_embedder
    from cosmic_jax.embed.export import export_checkpoint

    cfg = args.cfg
    manifest = export_checkpoint(args.checkpoint, args.out, step=args.step, with_decoder=args.with_decoder,
                                 layer=parse_layers(cfg.layer), pool=cfg.pool, dihedral=cfg.dihedral,
                                 overwrite=args.overwrite)
    print(json.dumps({"export": args.out, "files": sorted(manifest["files"])}))
    return 0
