"""How much of the morphology features' variance counts can explain, as the training set grows.

The generator's morphology-side truth is Var(E[f | S]) / Var(f) (S = cell type, response, shared
programs). Counts reach it only where S can be read off them; at a low expression shared fraction
the shared signal per gene is weak, so E[f | counts] has to be learned from many cells. This script
measures that learning curve on one large generated dataset: ridge and an MLP (sklearn) on the
z-scored log-normalised genes predict the z-scored 8 core features (measured from the crops, as
`cosmic analyze` does), fitted on growing training sets and scored with the "cov" estimator
(mean over features of Cov(prediction, f) / Var(f)) on a fixed held-out set. Generator internals
are read only as the truth to compare with.

  cosmic data synthetic --out /tmp/big --cells 20000 --seed 900 --shared-fraction 0.1 --config quick
  python experiments/morph_attainability.py --data /tmp/big
"""

from __future__ import annotations

import argparse
import json
import os

import anndata as ad
import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.neural_network import MLPRegressor

from cosmic_jax.analysis.expression import iter_lognorm
from cosmic_jax.analysis.morphology import measure_crops


def explained(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over columns of Cov(pred, y) / Var(y)."""
    return float(np.mean([np.cov(pred[:, k], y[:, k])[0, 1] / y[:, k].var(ddof=1) for k in range(y.shape[1])]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a generated dataset (cells.h5ad, crops/, truth.json)")
    p.add_argument("--sizes", type=int, nargs="+", default=(2000, 4000, 8000, 17000))
    p.add_argument("--test", type=int, default=3000, help="held-out cells")
    a = p.parse_args(argv)
    cells = ad.read_h5ad(os.path.join(a.data, "cells.h5ad"))
    with open(os.path.join(a.data, "truth.json")) as f:
        truth = json.load(f)
    x = np.concatenate([block for _, block, _ in iter_lognorm(cells, "counts")])
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    feats = measure_crops(os.path.join(a.data, "crops"), profile=False)
    row = {c: i for i, c in enumerate(feats.cell_ids)}
    f = feats.values[[row[c] for c in cells.obs["cell_id"].astype(str)]]
    perm = np.random.default_rng(0).permutation(len(x))
    test, pool = perm[: a.test], perm[a.test:]
    print(f"truth: morph_var_explained_by_expr {truth['morph_var_explained_by_expr']:.3f} "
          f"(se {truth['morph_var_explained_by_expr_se']:.3f}); expression side {truth['expr_var_explained_by_morph']:.3f}")
    print("| training cells | ridge | MLP 256x256 |\n|---|---|---|")
    for n in a.sizes:
        tr = pool[:n]
        ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x[tr], f[tr])
        mlp = MLPRegressor(hidden_layer_sizes=(256, 256), alpha=1e-3, early_stopping=True, max_iter=300,
                           random_state=0).fit(x[tr], f[tr])
        print(f"| {len(tr)} | {explained(ridge.predict(x[test]), f[test]):.3f} | "
              f"{explained(mlp.predict(x[test]), f[test]):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
