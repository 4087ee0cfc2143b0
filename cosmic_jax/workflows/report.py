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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cosmic_jax.data.records import CropSource  # noqa: E402
from cosmic_jax.train.metrics import read_metrics  # noqa: E402

log = logging.getLogger(__name__)

HEADLINE = (("expr_var_explained_by_morph", "expression variance explained by morphology"),
            ("morph_var_explained_by_expr", "morphology-feature variance explained by expression"))
ALPHA = 0.05  # FDR level the analysis calls significant (q_t < 0.05)
DPI = 110
CROP_INCHES = 1.1  # >= 96 px per crop at DPI
N_LABELLED = 8  # hits named on a volcano plot
MEANING = (
    "**What the number means.** The first row is the share of the expression variance (in the "
    "expression embedding's gene space) that is predictable from morphology: the variance of the "
    "held-out conditional mean E[expression | morphology] over the total variance. It counts only "
    "what the morphology *representation* (MAE embedding and measured features) captures, so it is a "
    "lower bound of the share carried by the image itself: a better representation can only raise it. "
    "The second row is the same question the other way round, averaged over the measured morphology "
    "features. Intervals are bootstrap 95% CIs over cells; the truth column (synthetic data only) is "
    "the generator's value.")


# ----------------------------------------------------------------------------- reading


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _column(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([_float(r.get(key)) for r in rows])


# ----------------------------------------------------------------------------- Markdown


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}" if np.isfinite(v) else "–"
    return str(v)


def _ci(d: dict | None) -> str:
    """``0.250 – 0.350`` from {ci_low, ci_high} (numbers or CSV strings)."""
    lo, hi = (_float((d or {}).get(k)) for k in ("ci_low", "ci_high"))
    return f"{_num(lo)} – {_num(hi)}" if np.isfinite(lo) and np.isfinite(hi) else "–"


def _est_ci(d: Any) -> str:
    """``0.412 [0.391, 0.433]`` from an {estimate, ci_low, ci_high} dict (or a bare number)."""
    if not isinstance(d, dict):
        return _num(d)
    lo, hi = _float(d.get("ci_low")), _float(d.get("ci_high"))
    ci = f" [{_num(lo)}, {_num(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return _num(_float(d.get("estimate"))) + ci


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


def headline_section(summary: dict) -> list[str]:
    truth = summary.get("truth") or {}
    has_truth = any(k in truth for k, _ in HEADLINE)
    header = ["quantity", "estimate", "95% CI"] + (["truth", "CI covers truth"] if has_truth else [])
    rows = []
    for key, name in HEADLINE:
        if not summary.get(key):
            continue
        d = summary[key]
        row = [name, d.get("estimate"), _ci(d)]
        if has_truth:
            row += [truth.get(key), truth.get(f"{key}_ci_covers", "–")]
        rows.append(row)
    if not rows:
        return ["## How much of each modality shows in the other", "",
                "No morphology in this analysis: only the expression-side analyses ran.", ""]
    lines = ["## How much of each modality shows in the other", ""] + md_table(header, rows) + [MEANING, ""]
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
             "representation carries the shared signal.", ""] + md_table(header, rows))


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
    sig = [r["name"] for r in rows if _float(r.get("q_t")) < ALPHA]
    return ", ".join(sig[:n]) + (f" (+{len(sig) - n} more)" if len(sig) > n else "") if sig else "none"


def response_section(summary: dict, genes: list[dict[str, str]], feats: list[dict[str, str]]) -> list[str]:
    resp = summary.get("response")
    if not resp:
        return []
    n_t, n_r = resp.get("n_treated"), resp.get("n_responders")
    counts = [["treated cells", n_t], ["responders", n_r],
              ["resistant", (n_t - n_r) if isinstance(n_t, int) and isinstance(n_r, int) else "–"]]
    n_sig = lambda rows: sum(_float(r.get("q_t")) < ALPHA for r in rows)  # noqa: E731
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


def generation_section(summary: dict) -> list[str]:
    gen = summary.get("generation") or {}
    if not gen:
        return []
    keys = [k for k in next(iter(gen.values())) if k != "n"]
    rows = [[m] + [v.get(k) for k in keys] for m, v in gen.items()]
    return (["## Generation quality: expression generated from morphology", "",
             "Held-out cells, per cell type then averaged (weighted by cells). r2 means: R² of the per-type "
             "mean expression (higher is better); the distribution distances (energy, MMD, Sinkhorn) between "
             "generated and real expression are lower-is-better.", ""]
            + md_table(["method"] + [_label(k) for k in keys], rows))


def per_feature_section(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    has_truth = any(np.isfinite(_float(r.get("truth"))) for r in rows)
    ordered = sorted(rows, key=lambda r: -_float(r.get("explained_fraction")))
    table = [[r["feature"], _float(r.get("explained_fraction")),
              _ci({"ci_low": r.get("ci_low"), "ci_high": r.get("ci_high")})]
             + ([_float(r.get("truth"))] if has_truth else []) for r in ordered]
    return (["## Per morphology feature: variance explained by expression", ""]
            + md_table(["feature", "explained fraction", "95% CI"] + (["truth"] if has_truth else []), table))


def per_gene_section(rows: list[dict[str, str]], n: int = 10) -> list[str]:
    if not rows:
        return []
    est = _column(rows, "explained_fraction")
    has_truth = "truth" in rows[0] and np.isfinite(_column(rows, "truth")).any()
    top = np.argsort(-np.nan_to_num(est, nan=-np.inf))[:n]
    table = [[rows[i]["gene"], est[i], _float(rows[i].get("total_var"))]
             + ([_float(rows[i].get("truth"))] if has_truth else []) for i in top]
    q = np.nanpercentile(est, [10, 50, 90]) if np.isfinite(est).any() else [np.nan] * 3
    return ([f"## Per gene: variance explained by morphology ({len(rows)} genes)", "",
             f"Median {_num(q[1])} (10th–90th percentile {_num(q[0])} – {_num(q[2])}); the {len(top)} highest:", ""]
            + md_table(["gene", "explained fraction", "total variance"] + (["truth"] if has_truth else []), table))


def timings_section(summary: dict, report_timings: dict[str, float]) -> list[str]:
    rows = [[f"analysis: {_label(k)}", v] for k, v in (summary.get("timings_s") or {}).items()]
    if summary.get("joint_fit_seconds") is not None:
        rows.append(["analysis: joint model fits (inside the stages above)", summary["joint_fit_seconds"]])
    rows += [[f"report: {_label(k)}", v] for k, v in report_timings.items()]
    return ["## Timings", ""] + md_table(["stage", "seconds"], [[k, _num(v, 1)] for k, v in rows]) if rows else []


# ----------------------------------------------------------------------------- figures


def _save(fig, fig_dir: str, name: str) -> str:
    out = os.path.join(fig_dir, name)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def volcano(rows: list[dict[str, str]], fig_dir: str, name: str, title: str) -> str | None:
    """Effect size vs -log10 q, significant points coloured by direction, the top hits named."""
    if not rows:
        return None
    eff_key = "log2fc" if "log2fc" in rows[0] else "cohen_d"
    eff = _column(rows, eff_key)
    q = np.clip(np.nan_to_num(_column(rows, "q_t"), nan=1.0), 1e-300, 1.0)
    y = -np.log10(q)
    sig = q < ALPHA
    fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    groups = ((~sig, "0.65", f"not significant ({int((~sig).sum())})"),
              (sig & (eff > 0), "tab:red", f"higher in responders ({int((sig & (eff > 0)).sum())})"),
              (sig & (eff <= 0), "tab:blue", f"lower in responders ({int((sig & (eff <= 0)).sum())})"))
    for sel, colour, lab in groups:
        if sel.any():
            ax.scatter(eff[sel], y[sel], s=14, c=colour, alpha=0.8, label=lab, edgecolors="none")
    ax.axhline(-np.log10(ALPHA), color="k", ls="--", lw=0.8, label=f"q = {ALPHA}")
    ax.axvline(0, color="0.8", lw=0.6)
    top = [i for i in np.lexsort((-np.abs(eff), q)) if sig[i]][:N_LABELLED]
    for rank, i in enumerate(top):
        ax.annotate(rows[i]["name"], (eff[i], y[i]), xytext=(6, 8 - 7 * (rank % 3)), textcoords="offset points",
                    fontsize=8, arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4"))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("log2 fold change (responder / resistant)" if eff_key == "log2fc" else "Cohen's d (responder − resistant)")
    ax.set_ylabel("−log10 q (Benjamini-Hochberg)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, fig_dir, name)


def per_gene_figure(rows: list[dict[str, str]], fig_dir: str) -> str | None:
    if not rows:
        return None
    est = _column(rows, "explained_fraction")
    truth = _column(rows, "truth") if "truth" in rows[0] else np.full_like(est, np.nan)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    ok = np.isfinite(truth) & np.isfinite(est)
    if ok.sum() > 1:
        ax.scatter(truth[ok], est[ok], s=12, alpha=0.7, label=f"genes ({int(ok.sum())})")
        hi = float(max(np.max(truth[ok]), np.max(est[ok]), 1e-3)) * 1.05
        lo = float(min(0.0, np.min(est[ok]), np.min(truth[ok])))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.9, label="y = x (estimate equals truth)")
        ax.set_xlabel("true explained fraction (generator)")
        ax.set_ylabel("estimated explained fraction")
        ax.set_title("Per gene: estimate vs truth")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.hist(est[np.isfinite(est)], bins=30, color="tab:blue")
        ax.set_xlabel("estimated explained fraction")
        ax.set_ylabel("genes")
        ax.set_title("Per gene: expression variance explained by morphology")
    return _save(fig, fig_dir, "per_gene_explained.png")


def per_feature_figure(rows: list[dict[str, str]], fig_dir: str) -> str | None:
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: _float(r.get("explained_fraction")))
    est, lo, hi = (_column(rows, k) for k in ("explained_fraction", "ci_low", "ci_high"))
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.0, max(3.2, 1.2 + 0.28 * len(rows))), layout="constrained")
    err = np.vstack([np.clip(est - lo, 0, None), np.clip(hi - est, 0, None)])
    ax.barh(pos, est, xerr=np.nan_to_num(err), color="tab:blue", alpha=0.8, capsize=2, label="estimate, 95% CI")
    truth = _column(rows, "truth") if "truth" in rows[0] else np.full_like(est, np.nan)
    if np.isfinite(truth).any():
        ax.scatter(truth, pos, marker="D", color="tab:orange", s=22, zorder=3, label="truth (generator)")
    ax.set_yticks(pos, [r["feature"] for r in rows], fontsize=8)
    ax.set_xlabel("fraction of the feature's variance explained by expression")
    ax.set_title("Per morphology feature")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, fig_dir, "per_feature_explained.png")


def umap_figure(latent_path: str, fig_dir: str, seed: int = 0) -> str | None:
    if not os.path.exists(latent_path):
        return None
    import umap  # heavy (numba); only when there is a latent to show

    with np.load(latent_path, allow_pickle=False) as data:
        z, labels = data["z"], data["cell_type"].astype(str)
    xy = umap.UMAP(n_neighbors=15, random_state=seed).fit_transform(z)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    for lab in np.unique(labels):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, alpha=0.8, label=f"{lab} ({int(sel.sum())})", edgecolors="none")
    ax.legend(title="cell type", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"Joint latent of {len(z)} held-out cells (UMAP)")
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, fig_dir, "joint_umap.png")


def loss_figure(mae_dir: str, fig_dir: str) -> str | None:
    if not os.path.exists(os.path.join(mae_dir, "metrics.jsonl")):
        return None
    rows = [r for r in read_metrics(mae_dir) if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6), layout="constrained")
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss (window mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("MAE pretraining loss")
    ax.legend(fontsize=8)
    return _save(fig, fig_dir, "mae_loss.png")


def _show(ax, img: np.ndarray) -> None:
    img = np.asarray(img, np.float32)
    img = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
    lo, hi = np.percentile(img, [0.5, 99.5])
    ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1), cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def crop_grid(crops_dir: str | None, fig_dir: str, name: str, title: str,
              groups: dict[str, str] | None = None, n: int = 4) -> str | None:
    """An n x n grid of crops; with ``groups`` (cell id -> group), one row per group (the first n)."""
    if not crops_dir or not glob.glob(os.path.join(crops_dir, "manifest*.json")):
        return None
    src = CropSource(crops_dir)
    if not len(src):
        return None
    rows: list[tuple[str, list[int]]] = []
    if groups:
        wanted = sorted(set(groups.values()))[:n]
        by_group: dict[str, list[int]] = {g: [] for g in wanted}
        for i in range(len(src)):  # stops as soon as every row is full
            g = groups.get(str(src.read(i)["cell_id"]))
            if g in by_group and len(by_group[g]) < n:
                by_group[g].append(i)
                if all(len(v) == n for v in by_group.values()):
                    break
        rows = [(g, idx) for g, idx in by_group.items() if idx]
    if not rows:
        idx = np.linspace(0, len(src) - 1, min(n * n, len(src))).astype(int).tolist()
        rows = [("", idx[r * n:(r + 1) * n]) for r in range(n) if idx[r * n:(r + 1) * n]]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * CROP_INCHES + 0.5, len(rows) * CROP_INCHES + 0.5),
                             squeeze=False, layout="constrained")
    for r, (group, idx) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            if c < len(idx):
                _show(ax, src[int(idx[c])]["image"])
            else:
                ax.axis("off")
        if group:
            axes[r][0].set_ylabel(group, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, fig_dir, name)


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


# ----------------------------------------------------------------------------- the report


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

    figure_steps: list[tuple[str, str, Callable[[], str | None]]] = [
        ("analysed crops", "Crops of the analysed dataset, one row per cell type",
         lambda: crop_grid(crops_dir, fig_dir, "analysed_crops.png", "Analysed crops (rows: cell type)",
                           _cell_types(os.path.join(adir, "cells.h5ad"), label_key))),
        ("real crops", "Real nuclei crops (shipped fluorescence images)",
         lambda: crop_grid(nuclei_dir, fig_dir, "real_crops.png", "Real nuclei crops")),
        ("MAE loss", "MAE pretraining loss", lambda: loss_figure(mae_dir, fig_dir)),
        ("MAE reconstructions", "MAE reconstructions (rows: original / masked input / reconstruction)", recon),
        ("joint-latent UMAP", "Joint latent by cell type",
         lambda: umap_figure(os.path.join(adir, "joint_latent.npz"), fig_dir, int(summary.get("config", {}).get("seed", 0)))),
        ("per-gene figure", "Per gene: estimate vs truth", lambda: per_gene_figure(tables["per_gene"], fig_dir)),
        ("per-feature figure", "Per morphology feature", lambda: per_feature_figure(tables["per_feature"], fig_dir)),
        ("gene volcano", "Responder vs resistant: genes",
         lambda: volcano(tables["response_genes"], fig_dir, "volcano_genes.png", "Responder vs resistant: genes")),
        ("feature volcano", "Responder vs resistant: morphology features",
         lambda: volcano(tables["response_features"], fig_dir, "volcano_features.png",
                         "Responder vs resistant: morphology features")),
    ]
    figures, report_timings = [], {}
    for i, (step, title, make) in enumerate(figure_steps, 1):
        t = time.perf_counter()
        log.info("report [%d/%d] %s", i, len(figure_steps), step)
        path = make()
        report_timings[step] = time.perf_counter() - t
        if path:
            figures.append((title, path))

    n = (summary.get("expression_embedding") or {})
    lines = ["# COSMIC analysis report", "",
             f"Workdir `{os.path.abspath(workdir)}`; data `{summary.get('data', '?')}`: "
             f"{n.get('n_cells', '?')} cells, {n.get('n_genes', '?')} genes.", ""]
    lines += headline_section(summary)
    lines += by_representation_section(summary)
    lines += baselines_section(summary)
    lines += per_gene_section(tables["per_gene"])
    lines += per_feature_section(tables["per_feature"])
    lines += celltype_section(summary)
    lines += retrieval_section(summary)
    lines += response_section(summary, tables["response_genes"], tables["response_features"])
    lines += generation_section(summary)
    lines += ["## Figures", ""]
    for title, path in figures:
        lines += [f"### {title}", "", f"![{title}]({os.path.relpath(path, out_base)})", ""]
    lines += timings_section(summary, report_timings)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, out_path)
    log.info("report: wrote %s (%d figures) in %.1f s", out_path, len(figures), sum(report_timings.values()))
    return out_path
