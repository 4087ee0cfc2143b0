"""Markdown report with figures for a finished `cosmic analyze` workdir (`cosmic report`, the end of `make demo`).

Reads only what the analysis wrote: ``W/analysis/summary.json`` (with ``summary["truth"]`` for a
synthetic dataset), the CSV tables (per_gene, per_feature, generation, response_genes,
response_features), ``joint_latent.npz`` and ``cells.h5ad``, and ``W/mae``'s metrics.jsonl and
reconstruction grids. Nothing is re-run, so the report can be rebuilt at any time:

    cosmic report --workdir W [--out W/report.md] [--nuclei DIR]

Writes ``report.md`` and a ``figures/`` folder beside it. Every number is a Markdown table.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from cosmic_jax.data.swap import write_text
from cosmic_jax.workflows import report_figures as F
from cosmic_jax.workflows.report_figures import ALPHA, column, to_float

log = logging.getLogger(__name__)

HEADLINE = (("expr_var_explained_by_morph", "expression variance explained by morphology"),
            ("morph_var_explained_by_expr", "morphology-feature variance explained by expression"))
MEANING = (
    "**What the number means.** The first row is the share of the expression variance (in the "
    "expression embedding's gene space) that is predictable from morphology: the variance of the "
    "held-out conditional mean E[expression | morphology] over the total variance. It counts only "
    "what the morphology *representation* (MAE embedding and measured features) captures, so it is a "
    "lower bound of the share carried by the image itself: a better representation can only raise it. "
    "The second row is the same question the other way round, averaged over the measured morphology "
    "features. The 95% CIs pool a bootstrap over cells with the spread over re-fits of the whole "
    "cross-fit (how they are made is stated under the table); the truth column (synthetic data only) "
    "is the generator's value.")


# ----------------------------------------------------------------------------- reading


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- Markdown


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "–"
        return f"{v:.1e}" if 0 < abs(v) < 10 ** -digits else f"{v:.{digits}f}"  # never a bare "-0.000"
    return str(v)


def _ci(d: dict | None) -> str:
    """``0.250 – 0.350`` from {ci_low, ci_high} (numbers or CSV strings)."""
    lo, hi = (to_float((d or {}).get(k)) for k in ("ci_low", "ci_high"))
    return f"{_num(lo)} – {_num(hi)}" if np.isfinite(lo) and np.isfinite(hi) else "–"


def _est_ci(d: Any) -> str:
    """``0.412 [0.391, 0.433]`` from an {estimate, ci_low, ci_high} dict (or a bare number)."""
    if not isinstance(d, dict):
        return _num(d)
    lo, hi = to_float(d.get("ci_low")), to_float(d.get("ci_high"))
    ci = f" [{_num(lo)}, {_num(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return _num(to_float(d.get("estimate"))) + ci


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown table lines (cells that are not strings go through ``_num``), then a blank line."""
    cell = lambda c: (c if isinstance(c, str) else _num(c)).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows] + [""]


def _label(key: str) -> str:
    return key.replace("_", " ")


def _leaves(d: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, value) of every estimate dict or number under ``d``, in order."""
    if isinstance(d, dict) and "estimate" in d:
        return [(path, d)]
    if isinstance(d, dict):
        return [leaf for k, v in d.items() for leaf in _leaves(v, path + (str(k),))]
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return [(path, d)]
    return []


# ----------------------------------------------------------------------------- sections


def header_section(workdir: str, summary: dict) -> list[str]:
    n = summary.get("expression_embedding") or {}
    lines = ["# COSMIC analysis report", "",
             f"Workdir `{os.path.abspath(workdir)}`, data `{summary.get('data', '?')}`: "
             f"{n.get('n_cells', '?')} cells, {n.get('n_genes', '?')} genes "
             f"({n.get('n_comps', '?')} expression PCs).", ""]
    emb = summary.get("morphology_embedding")
    if isinstance(emb, dict):
        pose = " of the crops rotated onto each nucleus's major axis (`oriented_crops`)" if emb.get("oriented_crops") else ""
        lines += [f"Morphology: the {emb.get('dim', '?')}-dimensional MAE embedding `{emb.get('key', '?')}`{pose} from "
                  f"`{emb.get('mae', '?')}`, plus the measured morphology features.", ""]
    return lines


def headline_section(summary: dict) -> list[str]:
    truth = summary.get("truth") or {}
    has_truth = any(k in truth for k, _ in HEADLINE)
    has_curve = any("learning_curve" in (summary.get(k) or {}) for k, _ in HEADLINE)
    header = ["quantity", "estimate", "95% CI"] + (["before extrapolation (all / part of the training cells)"]
                                                   if has_curve else [])
    header += ["truth", "CI covers truth"] if has_truth else []
    rows = []
    for key, name in HEADLINE:
        if not summary.get(key):
            continue
        d = summary[key]
        row = [name, d.get("estimate"), _ci(d)]
        if has_curve:
            curve = sorted((d.get("learning_curve") or {}).items(), key=lambda kv: -float(kv[0]))
            row += [" / ".join(f"{_num(v)} ({float(share):g})" for share, v in curve) or "–"]
        if has_truth:
            row += [truth.get(key), truth.get(f"{key}_ci_covers", "–")]
        rows.append(row)
    if not rows:
        return ["## How much of each modality shows in the other", "",
                "No morphology in this analysis: only the expression-side analyses ran.", ""]
    lines = ["## How much of each modality shows in the other", ""] + md_table(header, rows) + [MEANING, ""]
    if summary.get("ci_method"):
        lines += [f"**Intervals.** {summary['ci_method']}", ""]
    extra = [(name, truth[k]) for k, name in (("per_gene_spearman", "per-gene Spearman correlation, estimate vs truth"),
                                              ("genes_within_0.05", "fraction of genes within 0.05 of the truth"))
             if k in truth]
    if extra:
        lines += md_table(["truth check", "value"], extra)
    return lines


def by_representation_section(summary: dict) -> list[str]:
    """``summary["decomposition_by_representation"]``: one row per representation, whatever it holds."""
    by_rep = summary.get("decomposition_by_representation")
    if not isinstance(by_rep, dict) or not by_rep:
        return []
    cols: list[tuple[str, ...]] = []
    table = {}
    for rep, body in by_rep.items():
        table[rep] = dict(_leaves(body))
        cols += [p for p in table[rep] if p not in cols]
    header = ["representation"] + [" / ".join(_label(k) for k in p) or "estimate" for p in cols]
    rows = [[_label(rep)] + [_est_ci(table[rep][p]) if p in table[rep] else "–" for p in cols] for rep in by_rep]
    return (["## By morphology representation", "",
             "The same decomposition with each morphology representation alone (estimate [95% CI]): which "
             "representation carries the shared signal. " + summary.get("decomposition_note", ""), ""]
            + md_table(header, rows))


def baselines_section(summary: dict) -> list[str]:
    base = summary.get("decomposition_baselines") or {}
    if not base or not any(summary.get(k) for k, _ in HEADLINE):
        return []
    methods = {"flow (joint model)": {k: summary.get(k) for k, _ in HEADLINE}, **base}
    rows = [[m] + [_est_ci(v.get(k)) if v.get(k) else "–" for k, _ in HEADLINE] for m, v in methods.items()]
    return (["## Baselines: the same decomposition with simpler predictors", "",
             "Each column is estimate [95% CI] with E[target | condition] from the joint flow model, a ridge "
             "regression or k nearest neighbours, all cross-fitted the same way. A flow estimate far below "
             "the baselines means the joint model underfits.", ""]
            + md_table(["method", "expression ← morphology", "morphology ← expression"], rows))


def celltype_section(summary: dict) -> list[str]:
    ct = summary.get("celltype") or {}
    if not ct or "skipped" in ct:
        return (["## Cell-type identity", "", f"Skipped: {ct['skipped']}.", ""] if ct.get("skipped") else [])
    rows = []
    for rep, d in ct.items():
        if rep == "generated_expression" or not isinstance(d, dict):
            continue
        rows.append([_label(rep), d.get("linear", {}).get("accuracy"), d.get("linear", {}).get("macro_f1"),
                     d.get("knn", {}).get("accuracy"), d.get("knn", {}).get("macro_f1"),
                     d.get("chance", {}).get("accuracy")])
    lines = ["## Cell-type identity", "",
             "Cross-validated cell-type classifiers on each representation (accuracy and macro-F1).", ""]
    lines += md_table(["representation", "linear acc.", "linear macro-F1", "kNN acc.", "kNN macro-F1", "chance acc."],
                      rows)
    gen = ct.get("generated_expression")
    if isinstance(gen, dict):
        lines += ["Expression *generated from morphology* (held-out cells), classified by a classifier "
                  "trained on real expression:", ""]
        lines += md_table(["", "accuracy", "macro-F1"],
                          [["generated expression", gen.get("accuracy"), gen.get("macro_f1")],
                           ["real expression (ceiling)", gen.get("real_accuracy"), gen.get("real_macro_f1")]])
    return lines


def retrieval_section(summary: dict) -> list[str]:
    r = summary.get("retrieval") or {}
    ks = sorted(int(k[3:]) for k in r if k.startswith("top") and k[3:].isdigit())
    if not ks:
        return []
    rows = [[f"top-{k}", r[f"top{k}"], r.get(f"chance_top{k}")] for k in ks]
    return (["## Cross-modal retrieval", "",
             f"For each held-out cell, the expression predicted from its morphology is compared with the real "
             f"expression of {r.get('num_candidates', '?')} candidate cells: is its own among the k nearest?", ""]
            + md_table(["", "hit rate", "chance"], rows))


def _top_hits(rows: list[dict[str, str]], n: int = 10) -> str:
    sig = [r["name"] for r in rows if to_float(r.get("q_t")) < ALPHA]
    return ", ".join(sig[:n]) + (f" (+{len(sig) - n} more)" if len(sig) > n else "") if sig else "none"


def response_section(summary: dict, genes: list[dict[str, str]], feats: list[dict[str, str]]) -> list[str]:
    resp = summary.get("response")
    if not resp:
        return []
    n_t, n_r = resp.get("n_treated"), resp.get("n_responders")
    counts = [["treated cells", n_t], ["responders", n_r],
              ["resistant", (n_t - n_r) if isinstance(n_t, int) and isinstance(n_r, int) else "–"]]
    n_sig = lambda rows: sum(to_float(r.get("q_t")) < ALPHA for r in rows)  # noqa: E731
    if genes:
        counts.append([f"significant genes (q < {ALPHA}) of {len(genes)}", n_sig(genes)])
    if feats:
        counts.append([f"significant morphology features (q < {ALPHA}) of {len(feats)}", n_sig(feats)])
    auc = resp.get("auc_morphology")
    if isinstance(auc, dict):
        counts.append(["response predicted from morphology: ROC AUC (chance 0.5)", auc.get("auc")])
    lines = ["## Responders vs resistant cells", "",
             "Among treated cells: Welch t test per gene / feature, Benjamini-Hochberg q-values.", ""]
    lines += md_table(["", "value"], counts)
    if genes:
        lines += [f"Significant genes (most significant first): {_top_hits(genes)}.", ""]
    if feats:
        lines += [f"Significant features: {_top_hits(feats)}.", ""]
    truth = summary.get("truth") or {}
    rec = [(what, truth[f"{what}_recovery"]) for what in ("genes", "features") if f"{what}_recovery" in truth]
    if rec:
        lines += ["Recovery of the generator's planted responder differences:", ""]
        lines += md_table(["", "recall", "precision", "significant", "planted", "missed"],
                          [[w, r.get("recall"), r.get("precision"), r.get("n_significant"), r.get("n_planted"),
                            ", ".join(r.get("missed") or []) or "none"] for w, r in rec])
    return lines


GENERATION_COLUMNS = {"r2_means": "R² of type means ↑", "energy": "energy distance ↓",
                      "mmd_w0": "MMD² (width ½ median) ↓", "mmd_w1": "MMD² (width median) ↓",
                      "mmd_w2": "MMD² (width 2× median) ↓", "sinkhorn": "Sinkhorn ↓"}


def generation_section(summary: dict) -> list[str]:
    gen = summary.get("generation") or {}
    if not gen:
        return []
    keys = [k for k in next(iter(gen.values())) if k != "n"]
    rows = [[m] + [v.get(k) for k in keys] for m, v in gen.items()]
    return (["## Generation quality: expression generated from morphology", "",
             "Held-out cells, per cell type, then averaged weighted by cells. ↑ higher is better, ↓ lower is "
             "better. MMD² is the unbiased estimate: values at or slightly below 0 mean the generated and "
             "real expression cannot be told apart.", ""]
            + md_table(["method"] + [GENERATION_COLUMNS.get(k, _label(k)) for k in keys], rows))


def per_feature_section(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    has_truth = any(np.isfinite(to_float(r.get("truth"))) for r in rows)
    ordered = sorted(rows, key=lambda r: -to_float(r.get("explained_fraction")))
    table = [[r["feature"], to_float(r.get("explained_fraction")),
              _ci({"ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})]
             + ([to_float(r.get("truth"))] if has_truth else []) for r in ordered]
    return (["## Per morphology feature: variance explained by expression", ""]
            + md_table(["feature", "explained fraction", "95% CI"] + (["truth"] if has_truth else []), table))


def per_gene_section(rows: list[dict[str, str]], n: int = 10) -> list[str]:
    if not rows:
        return []
    est = column(rows, "explained_fraction")
    has_truth = "truth" in rows[0] and np.isfinite(column(rows, "truth")).any()
    top = np.argsort(-np.nan_to_num(est, nan=-np.inf))[:n]
    table = [[rows[i]["gene"], est[i], to_float(rows[i].get("total_var"))]
             + ([to_float(rows[i].get("truth"))] if has_truth else []) for i in top]
    q = np.nanpercentile(est, [10, 50, 90]) if np.isfinite(est).any() else [np.nan] * 3
    return ([f"## Per gene: variance explained by morphology ({len(rows)} genes)", "",
             f"Median {_num(q[1])} (10th–90th percentile {_num(q[0])} – {_num(q[2])}); the {len(top)} highest:", ""]
            + md_table(["gene", "explained fraction", "total variance"] + (["truth"] if has_truth else []), table))


def timings_section(summary: dict, report_timings: dict[str, float]) -> list[str]:
    rows = [[f"analysis: {_label(k)}", v] for k, v in (summary.get("timings_s") or {}).items()]
    if summary.get("joint_fit_seconds") is not None:
        rows.append(["analysis: joint model fits (inside the stages above)", summary["joint_fit_seconds"]])
    rows += [[f"report: {_label(k)}", v] for k, v in report_timings.items()]
    return ["## Timings", ""] + md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in rows]) if rows else []


# ----------------------------------------------------------------------------- the report


def _cell_types(cells_h5ad: str, key: str) -> dict[str, str] | None:
    """cell id -> cell type from the analysis' ``cells.h5ad`` (obs only), or None."""
    if not os.path.exists(cells_h5ad) or not key:
        return None
    import anndata

    obs = anndata.read_h5ad(cells_h5ad, backed="r").obs
    if key not in obs.columns:
        return None
    ids = obs["cell_id"].astype(str) if "cell_id" in obs.columns else obs.index.astype(str)
    return dict(zip(ids, obs[key].astype(str)))


def write_report(workdir: str, out_path: str | None = None, nuclei_dir: str | None = None,
                 crops_dir: str | None = None) -> str:
    """Write ``report.md`` and ``figures/`` for a finished `cosmic analyze` workdir; returns the report path.

    Args:
      workdir: the analysis workdir W (reads W/analysis/ and W/mae/).
      out_path: the report file (default W/report.md); figures go to ``figures/`` beside it.
      nuclei_dir: a real-crop dataset (`cosmic data nuclei`) to show crops from, or None.
      crops_dir: the analysed crops (default: ``crops/`` beside the analysed cells.h5ad, if present).
    """
    adir = os.path.join(workdir, "analysis")
    summary_path = os.path.join(adir, "summary.json")
    if not os.path.exists(summary_path):
        raise FileNotFoundError(f"{summary_path}: no analysis summary; run `cosmic analyze --workdir {workdir}` first")
    try:
        with open(summary_path) as f:
            summary = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{summary_path}: not a JSON summary ({e})") from None
    out_path = os.path.abspath(out_path or os.path.join(workdir, "report.md"))
    out_base = os.path.dirname(out_path)
    fig_dir = os.path.join(out_base, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    if crops_dir is None and summary.get("data"):
        cand = os.path.join(os.path.dirname(summary["data"]), "crops")
        crops_dir = cand if os.path.isdir(cand) else None
    tables = {n: _read_csv(os.path.join(adir, f"{n}.csv"))
              for n in ("per_gene", "per_feature", "response_genes", "response_features")}
    mae_dir = os.path.join(workdir, "mae")
    label_key = (summary.get("config") or {}).get("label_key") or "cell_type"

    def recon() -> str | None:
        grids = sorted(glob.glob(os.path.join(mae_dir, "recon", "*.png")))
        return shutil.copyfile(grids[-1], os.path.join(fig_dir, "mae_reconstructions.png")) if grids else None

    figure_steps: dict[str, Callable[[], str | None]] = {
        "analysed crops": lambda: F.crop_grid(crops_dir, fig_dir, "analysed_crops.png", "Analysed crops",
                                              _cell_types(os.path.join(adir, "cells.h5ad"), label_key)),
        "real crops": lambda: F.crop_grid(nuclei_dir, fig_dir, "real_crops.png", "Real nuclei crops"),
        "MAE loss": lambda: F.loss_figure(mae_dir, fig_dir),
        "MAE reconstructions": recon,
        "joint-latent UMAP": lambda: F.umap_figure(os.path.join(adir, "joint_latent.npz"), fig_dir,
                                                   int((summary.get("config") or {}).get("seed", 0))),
        "per-gene figure": lambda: F.per_gene_figure(tables["per_gene"], fig_dir),
        "per-feature figure": lambda: F.per_feature_figure(tables["per_feature"], fig_dir),
        "gene volcano": lambda: F.volcano(tables["response_genes"], fig_dir, "volcano_genes.png",
                                          "Responder vs resistant genes"),
        "feature volcano": lambda: F.volcano(tables["response_features"], fig_dir, "volcano_features.png",
                                             "Responder vs resistant features"),
    }
    figures, report_timings = {}, {}
    for i, (step, make) in enumerate(figure_steps.items(), 1):
        t = time.perf_counter()
        log.info("report [%d/%d] %s", i, len(figure_steps), step)
        figures[step] = make()
        report_timings[step] = time.perf_counter() - t

    def fig(step: str, caption: str) -> list[str]:
        path = figures.get(step)
        return [f"![{caption}]({os.path.relpath(path, out_base)})", "", f"*{caption}*", ""] if path else []

    lines = header_section(workdir, summary)
    lines += headline_section(summary)
    lines += by_representation_section(summary)
    lines += baselines_section(summary)
    lines += per_gene_section(tables["per_gene"]) + fig("per-gene figure", "Per gene: estimate against truth")
    lines += per_feature_section(tables["per_feature"]) + fig("per-feature figure", "Per feature, with 95% CIs")
    lines += celltype_section(summary) + fig("joint-latent UMAP", "Joint latent (cross-fitted), coloured by cell type")
    lines += retrieval_section(summary)
    lines += response_section(summary, tables["response_genes"], tables["response_features"])
    lines += fig("gene volcano", "Genes: effect against significance; significant points coloured, top hits named")
    lines += fig("feature volcano", "Morphology features: Cohen's d against significance")
    lines += generation_section(summary)
    data_figs = (fig("analysed crops", "Crops of the analysed dataset, one row per cell type")
                 + fig("real crops", "Real nuclei crops segmented from the shipped fluorescence images")
                 + fig("MAE loss", "MAE pretraining loss")
                 + fig("MAE reconstructions", "MAE reconstructions at the last step (rows: original / visible "
                                              "patches / reconstruction)"))
    if data_figs:
        lines += ["## Data and morphology model", ""] + data_figs
    lines += timings_section(summary, report_timings)
    write_text(out_path, "\n".join(lines))
    log.info("report: wrote %s (%d figures) in %.1f s", out_path, sum(map(bool, figures.values())),
             sum(report_timings.values()))
    return out_path
