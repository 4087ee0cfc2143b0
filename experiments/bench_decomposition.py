"""Benchmark the variance decomposition: both estimators' bias, CI coverage and speed.

    python experiments/bench_decomposition.py [--reps 40] [--cells 3000] [--frac 0.5]
    python experiments/bench_decomposition.py --reps 2 --cells 500 --timing-cells 2000   # smoke

Uses the Gaussian toy of the variance tests (``cosmic_jax.testing.toys``, known truth). Samplers: "exact" (the true
conditional), "noisy" (true mean + a fixed per-cell error of 10% of the total variance: what a
flexible fit on few cells looks like held out) and "shrunk" (mean x 0.9). For each estimator
("cov" = Cov(S-sample mean, target), "var" = finite-S-corrected Var(S-sample mean)) prints JSON:
mean error / sd of the estimate per S, the naive (uncorrected Var) error, CI coverage, and seconds
for decompose() (with bootstrap) at several N (``--timing-cells``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from cosmic_jax.analysis import variance as V
from cosmic_jax.testing.toys import GaussianToy, NoisyShrunkSampler


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--frac", type=float, default=0.5)
    p.add_argument("--timing-cells", default="10000,100000", help="N of the decompose() timings, comma separated")
    args = p.parse_args()
    toy = GaussianToy(args.frac, seed=1)
    noise_sd = np.sqrt(0.1 * np.trace(toy.s_ee) / len(toy.noise_var))
    out = {"truth": args.frac, "cells": args.cells, "reps": args.reps, "by_sampler": {}}
    for kind in ("exact", "noisy", "shrunk"):
        res = out["by_sampler"][kind] = {}
        for s in (2, 4, 16, 64) if kind == "exact" else (8,):
            est = {"cov": [], "var": []}
            naive, cover = [], {"cov": 0, "var": 0}
            for r in range(args.reps):
                m, e = toy.draw(args.cells)
                sampler = {"exact": toy.sampler, "noisy": NoisyShrunkSampler(toy, 1.0, noise_sd, r),
                           "shrunk": NoisyShrunkSampler(toy, 0.9, 0.0, r)}[kind]
                mom = V.sampler_moments(m, sampler, s, seed=r)
                for how in est:
                    dec = V.decompose(e, mom, n_boot=200, seed=r, estimator=how)
                    est[how].append(dec.overall.estimate)
                    cover[how] += dec.overall.ci_low < args.frac < dec.overall.ci_high
                naive.append(np.trace(np.cov(mom.mean, rowvar=False)) / np.trace(np.cov(e, rowvar=False)))
            res[s] = {how: {"bias": round(float(np.mean(v) - args.frac), 4), "sd": round(float(np.std(v)), 4),
                            "ci95_coverage": cover[how] / args.reps} for how, v in est.items()}
            res[s]["naive_bias"] = round(float(np.mean(naive) - args.frac), 4)
    out["decompose_seconds"] = {}
    for n in (int(v) for v in args.timing_cells.split(",")):
        toy2 = GaussianToy(args.frac, seed=2, de=50, dm=16, r=8)
        m, e = toy2.draw(n)
        mom = V.sampler_moments(m, toy2.sampler, 8, seed=0)
        for how in ("cov", "var"):
            t = time.perf_counter()
            V.decompose(e, mom, metric=np.eye(50), resid_sq=np.zeros(n), n_boot=200, estimator=how)
            out["decompose_seconds"][f"{how}_{n}"] = round(time.perf_counter() - t, 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
