"""Round 3 of the embedding/feature levers: generic measured features as morphology input.

For each paired dataset: the 8 core features (``morph_features.FEATURE_NAMES``), the generic
profile (``morph_features.PROFILE_NAMES``) and combinations, scored by the expression variance they
explain (cross-fitted RBF kernel ridge E[e|m] + the "cov" estimator, 3 folds: seconds; or the
analysis's joint model with ``--evals flow``), against the dataset's truth.

    python experiments/feature_levers.py --data /tmp/sci/data/syn_r202_f07 --out /tmp/fl \
        --inputs core profile core+profile --evals krr
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embed_levers import Dataset, expr_explained  # noqa: E402


def profile(ds: Dataset) -> np.ndarray:
    from cosmic_jax.data import morph_features as mf

    t = time.process_time()
    raw = np.concatenate([mf.profile_batch(ds.images[s:s + 256]) for s in range(0, len(ds.images), 256)])
    ds.profile_cpu_s = time.process_time() - t
    return (raw - raw.mean(0)) / np.where(raw.std(0) > 0, raw.std(0), 1.0)


def morph_input(spec: str, core: np.ndarray, prof: np.ndarray, seed: int) -> np.ndarray:
    from cosmic_jax.analysis.morphology import pca_reduce

    parts = []
    for p in spec.split("+"):
        if p == "core":
            parts.append(core)
        elif p == "profile":
            parts.append(prof)
        elif p.startswith("ppca"):  # whitened PCs of the profile
            parts.append(pca_reduce(prof, int(p[4:]), seed))
        elif p.startswith("apca"):  # whitened PCs of core + profile
            parts.append(pca_reduce(np.c_[core, prof], int(p[4:]), seed))
        else:
            raise ValueError(f"unknown input part {p!r}")
    return np.concatenate(parts, axis=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--inputs", nargs="+", default=["core", "profile", "core+profile"])
    p.add_argument("--evals", default="krr")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        for path in a.data:
            ds = Dataset(path)
            prof = profile(ds)
            for spec in a.inputs:
                m = morph_input(spec, ds.feats.values, prof, a.seed)
                for kind in a.evals.split(","):
                    t = time.process_time()
                    r = expr_explained(ds, m, kind, a.seed)
                    row = {"data": ds.name, "input": spec, "eval": kind, "dim": m.shape[1],
                           "truth": ds.truth["expr_var_explained_by_morph"], **r,
                           "eval_cpu_s": time.process_time() - t, "core_cpu_s": ds.feature_cpu_s,
                           "profile_cpu_s": ds.profile_cpu_s}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
