"""``cosmic fit-joint``: fit the joint morphology/expression model on an AnnData file.

    cosmic fit-joint --adata cells.h5ad --morph-key X_cosmic --expr-key X_pca --workdir W [--config quick]

m comes from ``adata.obsm[--morph-key]``. e comes from ``adata.obsm[--expr-key]``; if that key is
absent and is ``X_pca``, it is the analyses' expression embedding of ``adata.X`` (counts are
normalised + log1p, then PCA with ``--n-pcs`` components). Outputs: ``W/model`` (JointModel.save), ``W/checkpoints`` (a rerun
resumes), ``W/metrics.jsonl`` + ``W/tb`` (TensorBoard), ``W/fit_summary.json``.
"""

from __future__ import annotations

import json
import os

from cosmic_jax.commands import add_config, setup_logging
from cosmic_jax.configs import joint as joint_configs


def register(subparsers) -> None:
    p = subparsers.add_parser("fit-joint", help="fit the joint latent model with conditional flow decoders",
                              description=__doc__)
    p.add_argument("--adata", required=True, help="input .h5ad with paired morphology and expression")
    p.add_argument("--morph-key", default="X_cosmic", help="obsm key of the morphology embeddings")
    p.add_argument("--expr-key", default="X_pca", help="obsm key of the expression embeddings")
    p.add_argument("--n-pcs", type=int, default=50, help="PCA components when --expr-key X_pca is computed")
    p.add_argument("--labels-key", default=None, help="optional obs column for the label-retrieval diagnostic")
    p.add_argument("--workdir", required=True)
    add_config(p, joint_configs, "default")
    p.set_defaults(func=run)


def expression_embedding(adata, key: str, n_pcs: int, where: str):
    """(N, De) expression embedding: obsm[key], or the analyses' PCA embedding for key X_pca."""
    import numpy as np

    from cosmic_jax.analysis.expression import embed_expression

    if key in adata.obsm:
        return np.asarray(adata.obsm[key], dtype=np.float32)
    if key != "X_pca":
        raise KeyError(f"{where}: obsm[{key!r}] not found; available obsm keys: {sorted(adata.obsm.keys())}")
    return embed_expression(adata, n_comps=n_pcs).scores.astype(np.float32)


def run(args) -> int:
    setup_logging()
    import numpy as np  # jax and friends load here, not at `cosmic --help` time

    from cosmic_jax.data.anndata_io import read_h5ad
    from cosmic_jax.joint.fit import fit_joint

    adata = read_h5ad(args.adata)
    if args.morph_key not in adata.obsm:
        raise KeyError(f"{args.adata}: obsm[{args.morph_key!r}] not found; available: {sorted(adata.obsm.keys())}")
    m = np.asarray(adata.obsm[args.morph_key], dtype=np.float32)
    e = expression_embedding(adata, args.expr_key, args.n_pcs, args.adata)
    labels = None
    if args.labels_key:
        if args.labels_key not in adata.obs:
            raise KeyError(f"{args.adata}: obs[{args.labels_key!r}] not found; available: {list(adata.obs.columns)}")
        labels = adata.obs[args.labels_key].astype(str).to_numpy()
    model = fit_joint(m, e, args.cfg, workdir=args.workdir, labels=labels)
    h = model.loss_history
    summary = {
        "adata": os.path.abspath(args.adata), "morph_key": args.morph_key, "expr_key": args.expr_key,
        "n_cells": int(m.shape[0]), "dim_morph": model.dim_morph, "dim_expr": model.dim_expr,
        "model_dir": os.path.abspath(os.path.join(args.workdir, "model")),
        "final_loss": {k: v[-1] for k, v in h.items() if k != "step" and v}, **model.info,
    }
    with open(os.path.join(args.workdir, "fit_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0
