"""Comparisons of an analysis with a synthetic dataset's ground truth (``DIR/truth.json``).

The only place outside the data generators that reads generator truth: the analyses never see it.
``compare(summary, out_dir, truth)`` adds truth columns to the per-gene / per-feature tables and
returns the truth-side numbers (per-gene Spearman, genes within 0.05, responder recovery, whether
the CI covers the truth); ``coverage_summary`` pools many datasets' comparisons into coverage rates.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from cosmic_jax.analysis import response
from cosmic_jax.analysis.variance import HEADLINE

TRUTH_FILE = "truth.json"
Z95 = 1.959964


def load_truth(data_dir: str | None) -> dict | None:
    """``data_dir/truth.json`` if the dataset has one (synthetic data), else None."""
    path = os.path.join(data_dir, TRUTH_FILE) if data_dir else None
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt truth file ({e})") from None


def _add_truth_column(path: str, key: str, truth: dict[str, float]) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["truth"] = truth.get(r[key], float("nan"))
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    return rows


def compare(summary: dict, out_dir: str, truth: dict) -> dict:
    """Truth-side numbers of one analysis (also written as truth columns of the CSV tables)."""
    out: dict[str, Any] = {k: truth[k] for k in HEADLINE if k in truth}
    genes = _add_truth_column(os.path.join(out_dir, "per_gene.csv"), "gene",
                              truth.get("expr_var_explained_by_morph_per_gene", {}))
    _add_truth_column(os.path.join(out_dir, "per_feature.csv"), "feature",
                      truth.get("morph_var_explained_by_expr_per_feature", {}))
    ok = [r for r in genes if np.isfinite(float(r["truth"]))]
    if len(ok) > 2:
        est = np.array([float(r["explained_fraction"]) for r in ok])
        tru = np.array([float(r["truth"]) for r in ok])
        out["per_gene_spearman"] = float(spearmanr(est, tru).statistic)
        out["genes_within_0.05"] = float(np.mean(np.abs(est - tru) <= 0.05))
    for k in HEADLINE:
        if k in summary and k in truth and summary[k]:
            e = summary[k]
            out[f"{k}_error"] = e["estimate"] - truth[k]
            out[f"{k}_ci_covers"] = bool(e["ci_low"] <= truth[k] <= e["ci_high"])
            if np.isfinite(e.get("within_var", np.nan)):
                # the interval without the fit's own variability: bootstrap over cells only
                out[f"{k}_bootstrap_only_ci_covers"] = bool(abs(out[f"{k}_error"]) <= Z95 * np.sqrt(e["within_var"]))
    for csv_name, key in (("response_genes.csv", "responder_genes"), ("response_features.csv", "responder_features")):
        path = os.path.join(out_dir, csv_name)
        if truth.get(key) and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [{**r, "q_t": float(r["q_t"])} for r in csv.DictReader(f)]
            out[key.replace("responder_", "") + "_recovery"] = response.recovery(rows, truth[key])
    return out


def coverage_summary(results: list[tuple[dict, dict]]) -> dict:
    """Calibration over many datasets from ``(summary, truth comparison)`` pairs: per headline
    quantity the CI coverage, the bootstrap-only coverage, the coverage of estimate +- 1.96 x the
    total standard error (what the CI would be with a normal instead of Rubin's t reference: with
    few re-fits the t degrees of freedom, not the variance, set much of the CI's width), mean
    error, RMSE, mean CI width and the median t degrees of freedom."""
    out: dict[str, Any] = {"n_datasets": len(results)}
    for k in HEADLINE:
        ok = [(s[k], c) for s, c in results if s.get(k) and f"{k}_error" in c]
        if not ok:
            continue
        err = np.array([c[f"{k}_error"] for _, c in ok])
        out[k] = {"coverage": float(np.mean([c[f"{k}_ci_covers"] for _, c in ok])),
                  "bootstrap_only_coverage": float(np.mean([c.get(f"{k}_bootstrap_only_ci_covers", np.nan)
                                                            for _, c in ok])),
                  "normal_reference_coverage": float(np.mean([
                      abs(c[f"{k}_error"]) <= Z95 * np.sqrt(e["total_var"]) if "total_var" in e else np.nan
                      for e, c in ok])),
                  "mean_error": float(err.mean()), "rmse": float(np.sqrt(np.mean(err**2))),
                  "mean_ci_width": float(np.mean([e["ci_high"] - e["ci_low"] for e, _ in ok])),
                  "median_df": float(np.median([e.get("df", np.inf) for e, _ in ok]))}
    return out
