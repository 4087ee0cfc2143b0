"""``cosmic embed`` and ``cosmic export`` sub-commands (heavy imports inside the functions)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cosmic_jax.embed.embedder import POOLS


def register(subparsers) -> None:
    """Add ``embed`` and ``export`` to the ``cosmic`` parser."""
    p = subparsers.add_parser(
        "embed",
        help="embed a crop dataset with a pretrained MAE (checkpoint or export)",
        description="Embed every crop of a crop dataset. FILE.npy gets (N, D) rows in crop-dataset "
        "order; FILE.h5ad gets obsm[KEY] (a new file has obs_names = cell_id in crop order; an "
        "existing file keeps its cells and order, matched by cell_id).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="W", help="a `cosmic pretrain` workdir")
    src.add_argument("--export", metavar="DIR", help="an export directory (`cosmic export`)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--input", required=True, metavar="CROPS", help="crop dataset directory")
    p.add_argument("--output", required=True, metavar="FILE", help="FILE.npy or FILE.h5ad")
    p.add_argument("--layer", type=int, default=None,
                   help="encoder block to pool (default: a middle and the last block; for --export the "
                        "exported read-out)")
    p.add_argument("--pool", choices=POOLS, default=None,
                   help="mean and std of the patch tokens (default), their mean, or the CLS token")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cpu-devices", type=int, default=-1,
                   help="CPU hosts: split into N XLA devices, each batch spread over them (-1 = auto: "
                        "one per core while each gets >= 64 images; 1 = one device). Other backends "
                        "use all their local devices")
    p.add_argument("--key", default="X_cosmic", help="obsm key for .h5ad output")
    p.add_argument("--id-key", default=None,
                   help="obs column with cell ids in an existing .h5ad (default: cell_id column, else obs_names)")
    p.set_defaults(func=run_embed)

    e = subparsers.add_parser(
        "export",
        help="write a self-contained export (safetensors + StableHLO) of a pretrained encoder",
    )
    e.add_argument("--checkpoint", required=True, metavar="W", help="a `cosmic pretrain` workdir")
    e.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--with-decoder", action="store_true", help="also store the full MAE weights")
    e.add_argument("--layer", type=int, default=None,
                   help="encoder block baked into the StableHLO (default: a middle and the last block)")
    e.add_argument("--pool", choices=POOLS, default=None, help="token pooling (default: mean_std)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    e.set_defaults(func=run_export)


def _make_embedder(args):
    from cosmic_jax.embed.embedder import DEFAULT_POOL, Embedder

    if args.export:
        if args.step is not None:
            raise SystemExit("--step applies to --checkpoint only; an export holds one step")
        return Embedder.from_export(args.export, layer=args.layer, pool=args.pool,
                                    batch_size=args.batch_size, progress=None)
    return Embedder.from_checkpoint(args.checkpoint, step=args.step, layer=args.layer,
                                    pool=args.pool or DEFAULT_POOL, batch_size=args.batch_size)


def _write_h5ad(adata, path: str) -> None:
    tmp = path + ".tmp.h5ad"
    adata.write_h5ad(tmp)
    os.replace(tmp, path)  # never leave a half-written file in place of the user's data


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    out = args.output
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".npy", ".h5ad"):
        raise SystemExit(f"--output must end in .npy or .h5ad, got {out!r}")
    from cosmic_jax.runtime import apply_cpu_devices

    apply_cpu_devices(args.cpu_devices, args.batch_size)
    emb = _make_embedder(args)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if kind == ".npy":
        x, ids = emb.embed_dataset(args.input)
        np.save(out, x)
    else:
        import anndata as ad
        import pandas as pd

        if os.path.exists(out):
            adata = ad.read_h5ad(out)
            x = emb.embed_anndata(adata, args.input, key=args.key, id_key=args.id_key)
        else:
            x, ids = emb.embed_dataset(args.input)
            from cosmic_jax.embed.embedder import _dupes

            dup = _dupes(ids)
            if dup:
                raise SystemExit(f"{args.input}: {len(dup)} duplicate cell_id(s), e.g. {dup[:5]}; "
                                 "cannot use them as obs_names")
            obs = pd.DataFrame({"cell_id": ids}, index=pd.Index(ids, name=None))
            adata = ad.AnnData(obs=obs)
            adata.obsm[args.key] = x
            adata.uns[args.key + "_meta"] = emb.metadata()
        _write_h5ad(adata, out)
    print(json.dumps({"output": out, "shape": list(x.shape), **emb.metadata()}), file=sys.stdout)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from cosmic_jax.embed.embedder import DEFAULT_POOL
    from cosmic_jax.embed.export import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.out, step=args.step, with_decoder=args.with_decoder,
                                 layer=args.layer, pool=args.pool or DEFAULT_POOL, overwrite=args.overwrite)
    print(json.dumps({"export": args.out, "files": sorted(manifest["files"])}))
    return 0
