"""Benchmark the variance decomposition: finite-S bias correction, CI coverage and speed.

    python experiments/bench_decomposition.py [--reps 40] [--cells 3000]

Uses the Gaussian toy of tests/test_variance.py (exact conditional sampler, known truth).
Prints JSON: mean error / sd of the estimate per S, naive (uncorrected) error, CI coverage,
and seconds for decompose() (with bootstrap) at several N.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_variance import GaussianToy  # noqa: E402

from cosmic_jax.analysis import variance as V  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--frac", type=float, default=0.5)
    args = p.parse_args()
    toy = GaussianToy(args.frac, seed=1)
    out = {"truth": args.frac, "cells": args.cells, "by_S": {}}
    for s in (2, 4, 16, 64):
        est, naive, cover = [], [], 0
        for r in range(args.reps):
            m, e = toy.draw(args.cells)
            mom = V.sampler_moments(m, toy.sampler, s, seed=r)
            dec = V.decompose(e, mom, n_boot=200, seed=r)
            est.append(dec.overall.estimate)
            naive.append(np.trace(np.cov(mom.mean, rowvar=False)) / np.trace(np.cov(e, rowvar=False)))
            cover += dec.overall.ci_low < args.frac < dec.overall.ci_high
        out["by_S"][s] = {"bias": float(np.mean(est) - args.frac), "sd": float(np.std(est)),
                          "naive_bias": float(np.mean(naive) - args.frac), "ci95_coverage": cover / args.reps}
    out["decompose_seconds"] = {}
    for n in (10_000, 100_000):
        toy2 = GaussianToy(args.frac, seed=2, de=50, dm=16, r=8)
        m, e = toy2.draw(n)
        mom = V.sampler_moments(m, toy2.sampler, 8, seed=0)
        t = time.perf_counter()
        V.decompose(e, mom, metric=np.eye(50), resid_sq=np.zeros(n), n_boot=200)
        out["decompose_seconds"][n] = round(time.perf_counter() - t, 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
