"""Held-out evaluation (issue 11 item 3): `cosmic analyze --quick` on the holdout generator family.

Nobody tunes on this family: the lead runs this once, at the end. For each truth level it
generates a dataset (data_builders/families/holdout.py), imports it as a lab would (``cosmic data
paired --masks`` when the CLI has it, else ``holdout.write_paired``), runs ``cosmic analyze --data D
--workdir W --quick`` and tabulates estimate vs truth in both directions::

  python experiments/holdout_eval.py --out /tmp/holdout_eval            # 3 x 3,000 cells
  python experiments/holdout_eval.py --out /tmp/h --generate-only       # data + truth only
  python experiments/holdout_eval.py --out /tmp/h --n-cells 200 --levels 0.4 --analyze-arg=--pretrain-steps=20

Writes OUT/holdout_eval.json and OUT/holdout_eval.md (``--md`` to put the table elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from scipy.stats import spearmanr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_builders.families import holdout  # noqa: E402

CLI = [sys.executable, "-m", "cosmic_jax.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def has_paired_cli() -> bool:
    r = subprocess.run(CLI + ["data", "paired", "--help"], capture_output=True, env=_env())
    return r.returncode == 0


def import_dataset(d: str, use_cli: bool) -> str:
    """The directory `cosmic analyze --data` reads (cells.h5ad, crops/, truth.json)."""
    if not use_cli:
        holdout.write_paired(d)
        return d
    out = os.path.join(d, "paired")
    if os.path.exists(out):
        shutil.rmtree(out)
    raw = os.path.join(d, "raw")
    subprocess.run(CLI + ["data", "paired", "--adata", os.path.join(raw, "cells.h5ad"), "--images",
                          os.path.join(raw, "images.npy"), "--masks", os.path.join(raw, "masks.npy"), "--out", out],
                   check=True, env=_env())
    # Truth beside the data only so the summary reports it; the analysis does not fit on it.
    shutil.copy(os.path.join(d, "truth.json"), os.path.join(out, "truth.json"))
    return out


def run_analyze(data: str, workdir: str, extra: list[str]) -> dict:
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(CLI + ["analyze", "--data", data, "--workdir", workdir, "--quick", *extra], check=True, env=_env())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.perf_counter() - t, "cpu_s": cpu}


def _acc(ct: dict, rep: str) -> dict:
    r = ct.get(rep, {})
    return {k: r[k]["accuracy"] for k in ("linear", "knn") if k in r}


def score(workdir: str, truth: dict) -> dict:
    with open(os.path.join(workdir, "analysis", "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(workdir, "analysis", "per_gene.csv")) as f:
        rows = list(csv.DictReader(f))
    tg = truth["expr_var_explained_by_morph_per_gene"]
    est = np.array([float(r["explained_fraction"]) for r in rows if r["gene"] in tg])
    tru = np.array([tg[r["gene"]] for r in rows if r["gene"] in tg])
    out = {}
    for key in ("expr_var_explained_by_morph", "morph_var_explained_by_expr"):
        e = s[key]
        out[key] = {"truth": truth[key], "truth_mc_se": truth["mc_standard_errors"][key], "estimate": e["estimate"],
                    "ci": [e["ci_low"], e["ci_high"]], "covers": e["ci_low"] <= truth[key] <= e["ci_high"],
                    "baselines": {b: v[key]["estimate"] for b, v in s.get("decomposition_baselines", {}).items()}}
    out["per_gene"] = {"n": int(len(est)), "spearman": float(spearmanr(est, tru).statistic),
                       "within_0.05": float(np.mean(np.abs(est - tru) <= 0.05))}
    ct = s.get("celltype", {})
    out["celltype_accuracy"] = {"mae": _acc(ct, "morphology"), "features": _acc(ct, "morphology_features"),
                                "expression": _acc(ct, "expression")}
    out["analysis_timings_s"] = s.get("timings_s", {})
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Held-out family: cosmic analyze --quick ({meta['n_cells']} cells per dataset, "
             f"import: {meta['import']})", "",
             "| level | direction | truth (MC se) | estimate (95% CI) | covers | ridge / kNN | per-gene Spearman | "
             "genes within 0.05 | cell type MAE / features (linear) | runtime s (wall / cpu) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "score" not in r:
            continue
        sc = r["score"]
        for key, name in (("expr_var_explained_by_morph", "expr|morph"), ("morph_var_explained_by_expr", "morph|expr")):
            d = sc[key]
            base = " / ".join(f"{d['baselines'].get(b, float('nan')):.3f}" for b in ("ridge", "knn"))
            gene = (f"{sc['per_gene']['spearman']:.3f} | {100 * sc['per_gene']['within_0.05']:.0f} %"
                    if key.startswith("expr") else " | ")
            ct = sc["celltype_accuracy"]
            cts = f"{ct['mae'].get('linear', float('nan')):.2f} / {ct['features'].get('linear', float('nan')):.2f}"
            lines.append(f"| {r['shared_fraction']} | {name} | {d['truth']:.3f} ({d['truth_mc_se']:.3f}) | "
                         f"{d['estimate']:.3f} ({d['ci'][0]:.3f}-{d['ci'][1]:.3f}) | {'yes' if d['covers'] else 'no'} | "
                         f"{base} | {gene} | {cts} | {r['analyze']['wall_s']:.0f} / {r['analyze']['cpu_s']:.0f} |")
    lines += ["", "Generation (truth levels, MC standard errors, seconds):", "",
              "| level | seed | expr truth (se) | morph truth (se) | mixing w | generate s |", "|---|---|---|---|---|---|"]
    for r in results:
        g = r["generate"]
        lines.append(f"| {r['shared_fraction']} | {r['seed']} | {g['expr_var_explained_by_morph']:.4f} "
                     f"({g['mc_standard_errors']['expr_var_explained_by_morph']:.4f}) | "
                     f"{g['morph_var_explained_by_expr']:.4f} ({g['mc_standard_errors']['morph_var_explained_by_expr']:.4f}) "
                     f"| {g['mixing_weight']:.3f} | {r['generate_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="working folder: one dataset + run dir per level")
    p.add_argument("--n-cells", type=int, default=3000)
    p.add_argument("--levels", type=float, nargs="+", default=[0.15, 0.4, 0.7], help="shared_fraction per dataset")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="one per level (default 9001, 9002, ...)")
    p.add_argument("--crop-size", type=int, default=80)
    p.add_argument("--generate-only", action="store_true", help="data + truth only, no import / analysis")
    p.add_argument("--reuse", action="store_true", help="keep datasets already generated in OUT")
    p.add_argument("--analyze-arg", action="append", default=[], help="extra `cosmic analyze` argument (repeatable)")
    p.add_argument("--md", default=None, help="markdown table path (default OUT/holdout_eval.md)")
    args = p.parse_args(argv)
    seeds = args.seeds or [9001 + i for i in range(len(args.levels))]
    if len(seeds) != len(args.levels):
        p.error("--seeds needs one seed per level")
    os.makedirs(args.out, exist_ok=True)
    use_cli = False if args.generate_only else has_paired_cli()
    results = []
    for level, seed in zip(args.levels, seeds):
        d = os.path.join(args.out, f"holdout_{level:g}_s{seed}")
        r = {"shared_fraction": level, "seed": seed, "data": d}
        t = time.perf_counter()
        if args.reuse and os.path.exists(os.path.join(d, "truth.json")):
            with open(os.path.join(d, "generate.json")) as f:
                r["generate"] = json.load(f)
        else:
            r["generate"] = holdout.generate(d, args.n_cells, seed, level, crop_size=args.crop_size, overwrite=True)
            with open(os.path.join(d, "generate.json"), "w") as f:
                json.dump(r["generate"], f, indent=1)
        r["generate_s"] = time.perf_counter() - t
        print(json.dumps({"level": level, "seed": seed, **{k: r["generate"][k] for k in (
            "expr_var_explained_by_morph", "morph_var_explained_by_expr", "mixing_weight", "timings_s")}}), flush=True)
        if not args.generate_only:
            data = import_dataset(d, use_cli)
            work = os.path.join(args.out, f"run_{level:g}_s{seed}")
            r["analyze"] = run_analyze(data, work, args.analyze_arg)
            with open(os.path.join(d, "truth.json")) as f:
                r["score"] = score(work, json.load(f))
        results.append(r)
    meta = {"n_cells": args.n_cells, "import": "cosmic data paired" if use_cli else "holdout.write_paired",
            "crop_size": args.crop_size, "analyze_args": args.analyze_arg}
    with open(os.path.join(args.out, "holdout_eval.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = markdown(results, meta)
    with open(args.md or os.path.join(args.out, "holdout_eval.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
