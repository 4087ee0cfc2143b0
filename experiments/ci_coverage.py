"""Coverage of the decomposition's 95% CI over generated datasets (issue 11, item 4).

(Not named coverage.py: run as a script, that name would shadow the ``coverage`` package numba imports.)

For i = 0..N-1: generate a paired dataset of one generator family (seed ``seed0 + i``, expression
truth spread evenly over ``--truths LO HI``), run `cosmic analyze` on it (the quick config unless
``--config NAME``; overrides as ``--config.KEY=VALUE``), and compare both headline estimates with
the dataset's ``truth.json``. The MAE is pretrained once, on the first dataset's crops, and reused
for the rest (as a foundation model is; ``--mae RUN`` reuses an existing run instead). Writes
``OUT/coverage.md`` (table + coverage rates) and ``OUT/coverage.json``; each dataset's row is kept
in ``OUT/rows/`` so an interrupted run resumes. A dataset's files are deleted once it is analysed
(``--keep-data`` keeps them).

Besides the reported CI (re-fits combined by Rubin's rules), the table gives the coverage of the
bootstrap-only interval ``estimate +- 1.96 sqrt(within_var)`` (what the CI would be without the
fit's own variability), of ``estimate +- 1.96 sqrt(total_var)`` (the same variance with a normal
instead of Rubin's t reference: with 2 re-fits the t degrees of freedom are ~2 and set much of the
width) and, per dataset, the share of the CI's variance from re-fit variability.

  python experiments/ci_coverage.py --out /tmp/cov --n 20                      # default family
  python experiments/ci_coverage.py --out /tmp/cov_tex --family texture --mae RUN
  python experiments/ci_coverage.py --out /tmp/cov_tiny --n 3 --cells 300 \\
      --config.pretrain.steps=20 --config.joint.steps=50                      # smoke test
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import logging
import os
import shutil
import time

import numpy as np

from cosmic_jax import evaluation
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.workflows.analyze import analyze

HEADLINE = dict(zip(evaluation.HEADLINE, ("expr<-morph", "morph<-expr")))


def generator(family: str, variant: str):
    """``gen(out_dir, n_cells, seed, shared_fraction)`` of a family: "synthetic" (the default one,
    with a named config variant) or a module ``data_builders.families.<family>``."""
    if family == "synthetic":
        from data_builders.synthetic import generate, make_config

        cfg = make_config(variant)
        return lambda out, n, seed, frac: generate(out, n, seed, frac, cfg)
    try:
        module = importlib.import_module(f"data_builders.families.{family}")
    except ModuleNotFoundError as e:
        raise ValueError(f"unknown generator family {family!r} (no data_builders.families.{family})") from e
    return lambda out, n, seed, frac: module.generate(out, n, seed, frac)


def mae_run(out: str, given: str | None, i: int) -> str | None:
    """The MAE for dataset i: ``--mae`` if given, else dataset 0 pretrains in w000/mae for all."""
    return given or (os.path.join(out, "w000", "mae") if i > 0 else None)


def dataset_row(i: int, seed: int, frac: float, summary: dict, cpu_s: float, wall_s: float) -> dict:
    """What the table needs of one analysed dataset: the headline estimates and their truth comparison."""
    return {"i": i, "seed": seed, "target_fraction": frac, "cpu_s": cpu_s, "wall_s": wall_s,
            "truth": summary["truth"], **{k: summary[k] for k in HEADLINE}}


def _table(rows: list[dict]) -> list[str]:
    lines = ["| # | seed | " + " | ".join(f"{n} truth | estimate (95% CI) | covered | between share"
                                          for n in HEADLINE.values()) + " | per-gene Spearman |",
             "|---" * (3 + 4 * len(HEADLINE)) + "|"]
    for r in rows:
        cells, t = [], r["truth"]
        for key in HEADLINE:
            d = r[key]
            share = (1 + 1 / d["repeats"]) * d["between_var"] / d["total_var"] if d.get("total_var") else float("nan")
            cells += [f"{t[key]:.3f}", f"{d['estimate']:.3f} ({d['ci_low']:.3f}-{d['ci_high']:.3f})",
                      "yes" if t[f"{key}_ci_covers"] else "**no**", f"{share:.2f}"]
        sp = t.get("per_gene_spearman")
        lines.append(f"| {r['i']} | {r['seed']} | " + " | ".join(cells) + f" | {'–' if sp is None else f'{sp:.3f}'} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--family", default="synthetic", help="'synthetic' or a data_builders.families module name")
    p.add_argument("--variant", default="quick", help="synthetic config variant (family 'synthetic' only)")
    p.add_argument("--n", type=int, default=20, help="number of datasets")
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--truths", type=float, nargs=2, default=(0.1, 0.7), metavar=("LO", "HI"))
    p.add_argument("--seed0", type=int, default=100)
    p.add_argument("--mae", default=None, metavar="RUN", help="reuse this pretraining run for every dataset")
    p.add_argument("--config", default="quick", help="analyze config variant")
    p.add_argument("--keep-data", action="store_true")
    a, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    cfg = load_config(analyze_configs, a.config, overrides)
    gen = generator(a.family, a.variant)
    rows_dir = os.path.join(a.out, "rows")
    os.makedirs(rows_dir, exist_ok=True)
    fracs = np.linspace(a.truths[0], a.truths[1], a.n)
    for i, frac in enumerate(fracs):
        seed, row_path = a.seed0 + i, os.path.join(rows_dir, f"{i:03d}.json")
        work = os.path.join(a.out, f"w{i:03d}")
        if os.path.exists(row_path):
            continue
        data = os.path.join(a.out, f"data{i:03d}")
        t, c = time.perf_counter(), time.process_time()
        gen(data, a.cells, seed, float(frac))
        summary = analyze(data, work, cfg, mae=mae_run(a.out, a.mae, i))
        row = dataset_row(i, seed, float(frac), summary, time.process_time() - c, time.perf_counter() - t)
        with open(row_path, "w") as f:
            json.dump(row, f, indent=1)
        if not a.keep_data:
            shutil.rmtree(data)
        logging.info("dataset %d/%d done: %s", i + 1, a.n,
                     {n: (round(row[k]["estimate"], 3), round(row["truth"][k], 3), row["truth"][f"{k}_ci_covers"])
                      for k, n in HEADLINE.items()})
    rows = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(rows_dir, "*.json")))]
    result = {"family": a.family, "config": a.config, "overrides": overrides, "cells": a.cells,
              "mae": mae_run(a.out, a.mae, 1), "median_cpu_s": float(np.median([r["cpu_s"] for r in rows])),
              "summary": evaluation.coverage_summary([(r, r["truth"]) for r in rows]), "rows": rows}
    with open(os.path.join(a.out, "coverage.json"), "w") as f:
        json.dump(result, f, indent=1)
    s = result["summary"]
    lines = [f"# Coverage: family {a.family}, {len(rows)} datasets of {a.cells} cells, `analyze --config {a.config}` "
             f"{' '.join(overrides)}", "", *_table(rows), "",
             "| direction | CI coverage | bootstrap-only coverage | normal-reference coverage | mean error | RMSE | "
             "mean CI width | median df |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s[k]['coverage']:.2f} | {s[k]['bootstrap_only_coverage']:.2f} | "
              f"{s[k]['normal_reference_coverage']:.2f} | {s[k]['mean_error']:+.3f} | {s[k]['rmse']:.3f} | "
              f"{s[k]['mean_ci_width']:.3f} | {s[k]['median_df']:.1f} |" for k, n in HEADLINE.items()]
    with open(os.path.join(a.out, "coverage.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
