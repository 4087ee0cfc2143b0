"""What the held-out family lets any morphology reach: the analysis fed the generator's own answers.

The held-out family's truth is Var(E[x|S]) / Var(x) with S = (cell type, program z, response). The
pixels show S only through the render parameters, some of them clipped or mixed with private
draws (notes/holdout_family.md), so even a perfect image representation reads less than the truth.
This diagnostic (it reads generator internals, so it is never a test of the user's path) runs the
same quick joint-model decomposition on the same counts with the morphology replaced by

  state:  S itself (type one-hot, z, responder flag): what the estimator reaches with everything;
  params: the exact render parameters of each cell (what the pixels can show at best);

and puts both beside the pixel analysis of notes/holdout_eval (`--pixels FILE`, a holdout_eval.json)::

  python experiments/holdout_ceiling.py --out /tmp/ceil --pixels notes/holdout_eval/holdout_eval_session11.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import anndata as ad
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cosmic_jax.analysis.morphology import standardize_features  # noqa: E402
from cosmic_jax.analysis.pipeline import run_analyses  # noqa: E402
from cosmic_jax.analysis.variance import HEADLINE  # noqa: E402
from cosmic_jax.configs import analyze as analyze_configs  # noqa: E402
from cosmic_jax.configs.overrides import load_config  # noqa: E402
from data_builders.families import holdout  # noqa: E402

LEVELS = ((0.15, 9001), (0.4, 9002), (0.7, 9003))  # as experiments/holdout_eval.py
LOG_PARAMS = ("radius", "brightness", "foci_rate", "foci_amp", "nucleoli_rate")


def oracles(n_cells: int, seed: int, frac: float) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Rebuild each cell's S and render parameters from the seed, exactly as `holdout.generate` drew them."""
    cfg = holdout.HoldoutConfig()
    world = holdout.make_world(cfg, seed)
    state = holdout.sample_state(world, n_cells, holdout.rng_for(seed, holdout.STATE))
    private = holdout.morph_private(n_cells, holdout.rng_for(seed, holdout.MORPH))
    params = holdout.morph_params(world, state, private, frac)
    names = sorted(params)
    p = np.column_stack([np.log(params[k]) if k in LOG_PARAMS else params[k] for k in names])
    s = holdout.shared_activity(world, state)
    s_names = [f"type{i}" for i in range(s.shape[1] - 4)] + ["z1", "z2", "z3", "responder"]
    keep = s.std(0) > 0
    return {"state": (s[:, keep], [n for n, k in zip(s_names, keep) if k]), "params": (p, names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-cells", type=int, default=3000)
    ap.add_argument("--pixels", help="a holdout_eval.json to put beside (the pixel analysis)")
    ap.add_argument("--levels", type=float, nargs="*", default=[lv for lv, _ in LEVELS])
    args = ap.parse_args()
    cfg = load_config(analyze_configs, "quick", ["--config.refit_repeats=1", "--config.refit_repeats_side=0"])
    rows = []
    for frac, seed in LEVELS:
        if frac not in args.levels:
            continue
        d = os.path.join(args.out, f"h{frac}")
        if not os.path.exists(os.path.join(d, "truth.json")):
            holdout.generate(d, n_cells=args.n_cells, seed=seed, shared_fraction=frac, overwrite=True)
        truth = json.load(open(os.path.join(d, "truth.json")))
        adata = ad.read_h5ad(os.path.join(d, "raw", "cells.h5ad"))
        ids = np.asarray(adata.obs["cell_id"]).astype(str)
        adata.obs_names = ids
        for name, (x, cols) in oracles(adata.n_obs, seed, frac).items():
            t = time.process_time()
            summary = run_analyses(adata, cfg, os.path.join(d, f"w_{name}"), features=standardize_features(x, cols, ids))
            est = summary[HEADLINE[0]]
            base = summary["decomposition_baselines"]
            rows.append({"level": frac, "morphology": name, "truth": truth["expr_var_explained_by_morph"],
                         "estimate": est["estimate"], "ci": [est["ci_low"], est["ci_high"]],
                         "ridge": base["ridge"][HEADLINE[0]]["estimate"], "knn": base["knn"][HEADLINE[0]]["estimate"],
                         "cpu_s": round(time.process_time() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.pixels:
        for r in json.load(open(args.pixels))["results"]:
            if r["shared_fraction"] in args.levels:
                sc = r["score"][HEADLINE[0]]
                rows.append({"level": r["shared_fraction"], "morphology": "pixels (" + os.path.basename(args.pixels) + ")",
                             "truth": sc["truth"], "estimate": sc["estimate"], "ci": sc["ci"],
                             "ridge": sc["baselines"]["ridge"], "knn": sc["baselines"]["knn"]})
    with open(os.path.join(args.out, "holdout_ceiling.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
