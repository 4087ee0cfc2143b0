"""``cosmic fit-joint``: fit the joint morphology/expression model on an AnnData file.

    cosmic fit-joint --adata cells.h5ad --morph-key X_cosmic --expr-key X_pca --workdir W [--quick]

m comes from ``adata.obsm[--morph-key]``. e comes from ``adata.obsm[--expr-key]``; if that key is
absent and is ``X_pca``, it is computed from ``adata.X`` (counts: normalise_total + log1p + PCA with
``--n-pcs`` components, scanpy). Outputs: ``W/model`` (JointModel.save), ``W/checkpoints`` (resume),
``W/fit_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("fit-joint", help="fit the joint latent model with conditional flow decoders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adata", required=True, help="input .h5ad with paired morphology and expression")
    p.add_argument("--morph-key", default="X_cosmic", help="obsm key of the morphology embeddings")
    p.add_argument("--expr-key", default="X_pca", help="obsm key of the expression embeddings")
    p.add_argument("--n-pcs", type=int, default=50, help="PCA components when --expr-key X_pca is computed")
    p.add_argument("--labels-key", default=None, help="optional obs column for the label-retrieval diagnostic")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="default", help="JointConfig variant (default | quick | bench)")
    p.add_argument("--quick", action="store_true", help="shorthand for --config quick")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="JointConfig override, repeatable (e.g. --set ot=true --set flow_width=512)")
    p.set_defaults(func=run)


def expression_embedding(adata, key: str, n_pcs: int):
    """(N, De) expression embedding: obsm[key], or PCA of log-normalised counts for key X_pca."""
    import numpy as np

    if key in adata.obsm:
        return np.asarray(adata.obsm[key], dtype=np.float32)
    if key != "X_pca":
        raise KeyError(f"obsm[{key!r}] not found; available obsm keys: {sorted(adata.obsm.keys())}")
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    n_comps = min(n_pcs, work.n_obs - 1, work.n_vars - 1)
    sc.pp.pca(work, n_comps=n_comps, random_state=0)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32)


def run(args) -> int:
    import logging

    import anndata as ad
    import numpy as np

    if not logging.getLogger().handlers:  # show fit_joint's progress lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from cosmic_jax.configs.joint import get_config
    from cosmic_jax.joint.model import fit_joint

    if not os.path.exists(args.adata):
        raise FileNotFoundError(f"--adata {args.adata}: no such file")
    adata = ad.read_h5ad(args.adata)
    if args.morph_key not in adata.obsm:
        raise KeyError(f"{args.adata}: obsm[{args.morph_key!r}] not found; available: {sorted(adata.obsm.keys())}")
    m = np.asarray(adata.obsm[args.morph_key], dtype=np.float32)
    try:
        e = expression_embedding(adata, args.expr_key, args.n_pcs)
    except KeyError as err:
        raise KeyError(f"{args.adata}: {err.args[0]}") from err
    labels = None
    if args.labels_key:
        if args.labels_key not in adata.obs:
            raise KeyError(f"{args.adata}: obs[{args.labels_key!r}] not found; available: {list(adata.obs.columns)}")
        labels = adata.obs[args.labels_key].astype(str).to_numpy()
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = get_config("quick" if args.quick else args.config, overrides)
    model = fit_joint(m, e, cfg, workdir=args.workdir, seed=args.seed, labels=labels, verbose=True)
    h = model.loss_history
    summary = {
        "adata": os.path.abspath(args.adata), "morph_key": args.morph_key, "expr_key": args.expr_key,
        "n_cells": int(m.shape[0]), "dim_morph": model.dim_morph, "dim_expr": model.dim_expr,
        "model_dir": os.path.abspath(os.path.join(args.workdir, "model")),
        "final_loss": {k: float(np.mean(v[-50:])) for k, v in h.items()}, **model.info,
    }
    with open(os.path.join(args.workdir, "fit_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0
