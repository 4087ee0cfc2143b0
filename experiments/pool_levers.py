"""Pooled read-outs of an MAE's patch tokens on an analysis's oriented crops (notes/science.md round 9).

For the analysis's read-out blocks (a middle one and the last), each dihedral view's patch tokens are
pooled by mean, std, max and 90th percentile (averaged over the 8 views) and scored: cell type
(5-fold logistic / 15-NN accuracy) and the 5-fold ridge R^2 of each measured feature.

    python experiments/pool_levers.py --mae RUN --workdir W     # W: a finished `cosmic analyze --mae RUN`
"""

from __future__ import annotations

import argparse

import anndata
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import cross_val_predict, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from cosmic_jax.data.records import CropSource
from cosmic_jax.embed.embedder import default_layers
from cosmic_jax.models.mae import MAE, dihedral_views
from cosmic_jax.train.pretrain import load_for_inference

STATS = {"mean": lambda t: t.mean(2), "std": lambda t: t.std(2), "max": lambda t: t.max(2),
         "p90": lambda t: np.quantile(t, 0.9, axis=2)}
COMBOS = ("mean", "std", "max", "p90", "mean+std", "mean+std+max", "mean+std+p90")


def pooled_tokens(mae: str, crops: str, batch: int = 256) -> tuple[dict[str, np.ndarray], list[str]]:
    cfg, params, _, _ = load_for_inference(mae)
    src = CropSource(crops)
    layers = default_layers(cfg.depth)
    tokens = jax.jit(lambda p, x: MAE(cfg).apply({"params": p}, x, method=MAE.encode, layer=layers, pool="none"))
    first = 1 if cfg.cls_token else 0
    out: dict[str, list] = {k: [] for k in STATS}
    for s in range(0, len(src), batch):
        x = jnp.asarray(src.read_images(np.arange(s, min(s + batch, len(src)))))
        sums = {k: 0.0 for k in STATS}
        for view in dihedral_views(x):
            t = np.asarray(tokens(params, view))[:, :, first:]  # (layers, B, patches, D)
            for k, f in STATS.items():
                sums[k] = sums[k] + np.concatenate(list(f(t)), axis=-1) / 8
        for k in STATS:
            out[k].append(sums[k])
    return {k: np.concatenate(v) for k, v in out.items()}, src.cell_ids()


def score(z: np.ndarray, features, labels) -> str:
    z = StandardScaler().fit_transform(z)
    r2 = []
    for col in features.columns:
        y = features[col].to_numpy()
        y = (y - y.mean()) / y.std()
        p = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 4, 13)), z, y, cv=5)
        r2.append(1 - np.mean((p - y) ** 2))
    lin = cross_val_score(LogisticRegression(max_iter=2000, C=0.1), z, labels, cv=5).mean()
    knn = cross_val_score(KNeighborsClassifier(15), z, labels, cv=5).mean()
    per = " ".join(f"{c}:{v:.2f}" for c, v in zip(features.columns, r2))
    return f"dim {z.shape[1]:4d} cell type {lin:.3f} / {knn:.3f} feature R^2 {np.mean(r2):.3f} ({per})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mae", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--label-key", default="cell_type")
    args = p.parse_args()
    pooled, ids = pooled_tokens(args.mae, f"{args.workdir}/oriented_crops")
    cells = anndata.read_h5ad(f"{args.workdir}/analysis/cells.h5ad")
    row = {c: i for i, c in enumerate(ids)}
    order = np.array([row[c] for c in cells.obs["cell_id"]])
    labels = cells.obs[args.label_key].astype(str).to_numpy()
    for combo in COMBOS:
        z = np.hstack([pooled[k][order] for k in combo.split("+")])
        print(f"{combo:14s} {score(z, cells.obsm['morph_features'], labels)}", flush=True)


if __name__ == "__main__":
    main()
