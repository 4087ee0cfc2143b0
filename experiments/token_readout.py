"""Where the MAE loses the morphology: in its tokens, or in pooling them (notes/science.md round 11).

For a finished ``cosmic analyze --mae RUN`` workdir W, compares linear read-outs (5-fold ridge, the
same folds for every representation) of
  - ``pooled``: the analysis's embedding (``W/embeddings.npz``: mean and std of the patch tokens of
    the read-out blocks, averaged over the 8 dihedral views);
  - ``tokens``: the same blocks' patch tokens of the oriented crop kept per grid position (the
    token map averaged with its left-right, up-down and 180-degree turned copies, which the
    orientation leaves undecided), flattened;
  - ``features``: the 8 measured features and the generic profile (the analysis's bar);
scored by the 5-fold R^2 of each measured feature and by the share of the variance of the first
20 expression PCs (log-normalised counts) that a cross-fitted ridge prediction carries
(``Cov(prediction, target) / Var(target)``, the analysis's "cov" estimator, in PC space).

    python experiments/token_readout.py --mae RUN --workdir W [--out W/token_readout.json]
"""

from __future__ import annotations

import argparse
import json
import os

import anndata
import jax
import numpy as np
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold

from cosmic_jax.data.records import CropSource
from cosmic_jax.embed.embedder import default_layers
from cosmic_jax.models.mae import MAE
from cosmic_jax.train.pretrain import load_for_inference

ALPHAS = np.logspace(-1, 5, 13)


def token_maps(mae: str, crops: str, order: list[str], batch: int = 128) -> np.ndarray:
    """(N, grid * grid * D * blocks) symmetrised token maps of the oriented crops, rows in ``order``."""
    cfg, params, _, _ = load_for_inference(mae)
    src = CropSource(crops)
    layers = default_layers(cfg.depth)
    fwd = jax.jit(lambda p, x: MAE(cfg).apply({"params": p}, x, method=MAE.encode, layer=layers, pool="none"))
    first = 1 if cfg.cls_token else 0
    g = cfg.image_size // cfg.patch_size
    out = []
    for s in range(0, len(src), batch):
        t = np.asarray(fwd(params, src.read_images(np.arange(s, min(s + batch, len(src))))))[:, :, first:]
        t = np.concatenate(list(t), axis=-1).reshape(t.shape[1], g, g, -1)  # (B, g, g, D * blocks)
        t = (t + t[:, ::-1] + t[:, :, ::-1] + t[:, ::-1, ::-1]) / 4
        out.append(t.reshape(len(t), -1).astype(np.float32))
    row = {c: i for i, c in enumerate(src.cell_ids())}
    return np.concatenate(out)[[row[c] for c in order]]


def ridge_cv(x: np.ndarray, y: np.ndarray, folds) -> np.ndarray:
    """Out-of-fold ridge predictions of y (N, K); alpha per fold by leave-one-out on the training cells
    (eigendecomposition of the training Gram matrix: cheap for wide x)."""
    pred = np.zeros_like(y)
    for tr, te in folds:
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        a, b = (x[tr] - mu) / sd, (x[te] - mu) / sd
        ym = y[tr].mean(0)
        yc = y[tr] - ym
        w, v = np.linalg.eigh(a @ a.T)
        vy = v.T @ yc
        best, best_err = None, np.inf
        for alpha in ALPHAS:
            shrink = w / (w + alpha)  # the hat matrix is v diag(shrink) v^T
            loo = (yc - v @ (shrink[:, None] * vy)) / (1 - (v**2) @ shrink)[:, None]
            err = np.mean(loo**2)
            if err < best_err:
                best, best_err = alpha, err
        coef_dual = v @ (vy / (w + best)[:, None])
        pred[te] = b @ (a.T @ coef_dual) + ym
    return pred


def score(x: np.ndarray, feats: np.ndarray, pcs: np.ndarray, folds) -> dict:
    fz = (feats - feats.mean(0)) / feats.std(0)
    pf = ridge_cv(x, fz, folds)
    r2 = 1 - ((pf - fz) ** 2).mean(0)
    pe = ridge_cv(x, pcs, folds)
    share = float(sum(np.cov(pe[:, k], pcs[:, k])[0, 1] for k in range(pcs.shape[1])) / pcs.var(0, ddof=1).sum())
    return {"dim": int(x.shape[1]), "feature_r2": r2.round(3).tolist(), "feature_r2_mean": float(r2.mean()),
            "expr_pc_share": share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mae", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--pcs", type=int, nargs="*", default=[8, 32])
    p.add_argument("--no-tokens", dest="tokens", action="store_false")
    p.add_argument("--oof-data", default=None, help="also write a dataset folder whose cells.h5ad has obsm "
                   "X_ridge_oof (5-fold ridge predictions of the expression PCs from the embedding)")
    p.add_argument("--data", default=None, help="with --oof-data: the analysed dataset's cells.h5ad (crops and "
                   "truth.json beside it are linked)")
    a = p.parse_args()
    if a.oof_data and not a.data:
        p.error("--oof-data needs --data (the analysed dataset's cells.h5ad)")
    w = a.workdir
    cells = anndata.read_h5ad(f"{w}/analysis/cells.h5ad")
    ids = [str(c) for c in cells.obs["cell_id"]]
    f = np.load(f"{w}/features.npz")
    frow = {str(c): i for i, c in enumerate(f["cell_ids"])}
    fi = [frow[c] for c in ids]
    feats, prof = f["raw"][fi], f["profile"][fi]
    e = np.load(f"{w}/embeddings.npz")
    erow = {str(c): i for i, c in enumerate(e["cell_ids"])}
    pooled = e["X_cosmic"][[erow[c] for c in ids]]
    counts = np.asarray(cells.X.todense() if hasattr(cells.X, "todense") else cells.X, np.float64)
    logn = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    pcs = PCA(20, random_state=0).fit_transform(logn - logn.mean(0))
    folds = list(KFold(5, shuffle=True, random_state=0).split(pcs))
    features = np.c_[feats, prof[:, prof.std(0) > 0]]
    reps = {"pooled": pooled, "features": features, "pooled+features": np.c_[pooled, features]}
    for k in a.pcs:  # what the analysis's joint model receives: whitened PCs of the embedding
        reps[f"pooled_pca{k}"] = PCA(k, whiten=True, random_state=0).fit_transform(pooled)
    if a.tokens:
        reps["tokens"] = token_maps(a.mae, f"{w}/oriented_crops", ids)
        reps["tokens+pooled"] = np.c_[reps["tokens"], pooled]
    out = {"workdir": w, "mae": a.mae, "feature_names": [str(n) for n in f["names"]]}
    for name, x in reps.items():
        out[name] = score(x, feats, pcs, folds)
        r = out[name]
        print(f"{name:14s} dim {r['dim']:6d} feature R^2 {r['feature_r2_mean']:.3f} {r['feature_r2']} "
              f"expression-PC share {r['expr_pc_share']:.3f}", flush=True)
    with open(a.out or f"{w}/token_readout.json", "w") as fh:
        json.dump(out, fh, indent=1)
    if a.oof_data:  # diagnostic: the embedding's out-of-fold ridge prediction of the expression PCs
        # the analysed dataset's own cells.h5ad (the analysis's output copy holds its results, not the input)
        data = anndata.read_h5ad(a.data)
        if [str(c) for c in data.obs_names] != [str(c) for c in cells.obs_names]:
            raise SystemExit(f"{a.data}: rows differ from {w}/analysis/cells.h5ad")
        os.makedirs(a.oof_data, exist_ok=True)
        data.obsm["X_ridge_oof"] = ridge_cv(pooled, pcs, folds).astype(np.float32)
        data.write_h5ad(os.path.join(a.oof_data, "cells.h5ad"))
        for name in ("crops", "truth.json"):
            src = os.path.join(os.path.dirname(os.path.abspath(a.data)), name)
            if os.path.exists(src) and not os.path.exists(os.path.join(a.oof_data, name)):
                os.symlink(src, os.path.join(a.oof_data, name))


if __name__ == "__main__":
    main()
