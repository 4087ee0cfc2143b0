"""Held-out evaluation (issue 11 item 3): `cosmic analyze --quick` on the holdout generator family.

Nobody tunes on this family: the lead runs this once, at the end. For each truth level it
generates a dataset (data_builders/families/holdout.py), imports it as a lab would (``cosmic data
paired --masks --config.crop.norm=none`` when the CLI has it, else ``holdout.write_paired``), runs ``cosmic
analyze --data D --workdir W --quick`` and tabulates estimate vs truth in both directions::

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


def paired_cli_args() -> list[str] | None:
    """Extra `cosmic data paired` arguments, or None when the command does not exist yet.

    The truth's features are measured on the masked pixels as they are; an import that rescales
    each crop (``crop.norm`` "crop" or "dataset") would change them, so ask for none.
    """
    r = subprocess.run(CLI + ["data", "paired", "--help"], capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        return None
    return ["--config.crop.norm=none"]


def import_dataset(d: str, cli_args: list[str] | None) -> str:
    """The directory `cosmic analyze --data` reads (cells.h5ad, crops/, truth.json)."""
    if cli_args is None:
        holdout.write_paired(d)
        return d
    out = os.path.join(d, "paired")
    if os.path.exists(out):
        shutil.rmtree(out)
    raw = os.path.join(d, "raw")
    subprocess.run(CLI + ["data", "paired", "--adata", os.path.join(raw, "cells.h5ad"), "--images",
                          os.path.join(raw, "images.npy"), "--masks", os.path.join(raw, "masks.npy"), "--out", out,
                          *cli_args], check=True, env=_env())
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


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _row(r: dict, key: str) -> str:
    sc, d = r["score"], r["score"][key]
    base = " / ".join(_fmt(d["baselines"].get(b)) for b in ("ridge", "knn"))
    pg = sc["per_gene"]
    gene = f"{pg['spearman']:.3f} | {100 * pg['within_0.05']:.0f} %" if key.startswith("expr") else "- | -"
    ct = sc["celltype_accuracy"]
    cells = [str(r["shared_fraction"]), "expr from morph" if key.startswith("expr") else "morph from expr",
             f"{d['truth']:.3f} ({d['truth_mc_se']:.3f})", f"{d['estimate']:.3f} ({d['ci'][0]:.3f}-{d['ci'][1]:.3f})",
             "yes" if d["covers"] else "no", base, gene,
             f"{_fmt(ct['mae'].get('linear'), 2)} / {_fmt(ct['features'].get('linear'), 2)}",
             f"{r['analyze']['wall_s']:.0f} / {r['analyze']['cpu_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Held-out family: cosmic analyze --quick ({meta['n_cells']} cells per dataset, "
             f"import: {meta['import']})", "",
             "| level | direction | truth (MC se) | estimate (95% CI) | covers | ridge / kNN | per-gene Spearman | "
             "genes within 0.05 | cell type MAE / features (linear) | runtime s (wall / cpu) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "score" in r:
            lines += [_row(r, "expr_var_explained_by_morph"), _row(r, "morph_var_explained_by_expr")]
    lines += ["", "Generation (truth levels, MC standard errors, seconds):", "",
              "| level | seed | expr truth (se) | morph truth (se) | mixing w | generate s |",
              "|---|---|---|---|---|---|"]
    for r in results:
        g, se = r["generate"], r["generate"]["mc_standard_errors"]
        lines.append(f"| {r['shared_fraction']} | {r['seed']} | {g['expr_var_explained_by_morph']:.4f} "
                     f"({se['expr_var_explained_by_morph']:.4f}) | {g['morph_var_explained_by_expr']:.4f} "
                     f"({se['morph_var_explained_by_expr']:.4f}) | {g['mixing_weight']:.3f} | {r['generate_s']:.0f} |")
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
    cli_args = None if args.generate_only else paired_cli_args()
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
            data = import_dataset(d, cli_args)
            work = os.path.join(args.out, f"run_{level:g}_s{seed}")
            r["analyze"] = run_analyze(data, work, args.analyze_arg)
            with open(os.path.join(d, "truth.json")) as f:
                r["score"] = score(work, json.load(f))
        results.append(r)
    how = "holdout.write_paired" if cli_args is None else " ".join(["cosmic data paired --masks", *cli_args])
    meta = {"n_cells": args.n_cells, "import": how,
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
