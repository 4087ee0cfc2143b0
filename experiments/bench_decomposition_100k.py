"""Wall time of the full cross-fitted variance decomposition on 100,000 cells (issue 6: "minutes, not hours").

Data: m ~ N(0, I_64), e = tanh(m W) + sigma * noise (64-d), the flow benchmark's problem
(``cosmic_jax.testing.toys.TanhToy``), so the true fraction of Var(e) explained by m is known (Monte
Carlo over the generator). Both directions are run the way `cosmic analyze` runs them: K joint fits
(one per fold, each giving p(e|m) and p(m|e)), S samples per held-out cell from each flow,
`decompose` with bootstrap CIs.

    python experiments/bench_decomposition_100k.py --json bench_out/decomp100k.jsonl
    python experiments/bench_decomposition_100k.py --cells 20000 --config.steps=500               # shorter
    python experiments/bench_decomposition_100k.py --cells 2000 --folds 2 --samples 2 --n-boot 20 \
        --config quick --config.steps=50                                                          # smoke

``--config`` names a joint config variant (``configs/joint.py``); ``--config.KEY=VALUE`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from cosmic_jax.analysis import variance as V
from cosmic_jax.analysis.pipeline import JointFits
from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.testing.toys import TanhToy

D = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=8, help="S draws per held-out cell")
    ap.add_argument("--sigma", type=float, default=0.3)
    ap.add_argument("--config", default="default", choices=joint_configs.VARIANTS, help="joint config variant")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--json", default=None)
    args, overrides = ap.parse_known_args()
    try:
        cfg = load_config(joint_configs, args.config, overrides)
    except ConfigError as err:
        ap.error(str(err))

    toy = TanhToy(D, args.sigma, seed=0)
    m, e = toy.draw(args.cells)
    truth = toy.explained_fraction()
    fits = JointFits(m, e, cfg, seed=0)
    t0 = time.perf_counter()
    mom_e = V.cross_fit_moments(m, fits.expr_given_morph, args.samples, args.folds, seed=0)
    t_e = time.perf_counter() - t0
    fit_after_e = fits.fit_seconds
    dec_e = V.decompose(e, mom_e, n_boot=args.n_boot, seed=0)
    t1 = time.perf_counter()
    mom_m = V.cross_fit_moments(e, fits.morph_given_expr, args.samples, args.folds, seed=0)  # same folds: fits reused
    t_m = time.perf_counter() - t1
    dec_m = V.decompose(m, mom_m, n_boot=args.n_boot, seed=0)
    total = time.perf_counter() - t0
    s = cfg.sampling
    rec = dict(
        bench="decomposition", cells=args.cells, folds=args.folds, samples=args.samples, config=args.config,
        overrides=overrides, joint_steps=cfg.steps, solver=f"{s.solver}{s.steps}_p{s.time_power}",
        fit_s=fits.fit_seconds, fits=len(fits.models),
        sample_expr_s=t_e - fit_after_e, sample_morph_s=t_m - (fits.fit_seconds - fit_after_e),
        total_s=total, expr_truth=truth, expr_estimate=dec_e.overall.estimate,
        expr_ci=[dec_e.overall.ci_low, dec_e.overall.ci_high], morph_estimate=dec_m.overall.estimate,
        loadavg=os.getloadavg()[0], time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    print(json.dumps(rec, indent=1), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
