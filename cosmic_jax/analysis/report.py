"""Markdown report with PNG plots from a `cosmic analyze` workdir (what `make demo` ends with).

Reads only files the pipeline wrote (``W/analysis/summary.json`` and CSV tables, ``W/mae``'s
metrics and reconstruction grids, the optional joint-latent dump), so the report can be rebuilt
without re-running anything: ``python -m cosmic_jax.analysis.report --workdir W``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
from typing import Any

import numpy as np


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "estimate" in v:
        lo, hi = v.get("ci_low"), v.get("ci_high")
        ci = f" (95% CI {lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
        return f"{v['estimate']:.3f}{ci}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, fig_dir: str, name: str, tight: bool = True) -> str:
    if tight:
        fig.tight_layout()
    out = os.path.join(fig_dir, name)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _loss_curve(mae_dir: str, fig_dir: str) -> str | None:
    path = os.path.join(mae_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("MAE pretraining loss")
    return _save(plt, fig, fig_dir, "mae_loss.png")


def _per_gene_chart(rows: list[dict[str, str]], fig_dir: str) -> str | None:
    if not rows:
        return None
    est_key = next((k for k in rows[0] if k in ("estimate", "explained_fraction", "frac")), None)
    if est_key is None:
        return None
    est = np.array([float(r[est_key]) for r in rows])
    truth = np.array([float(r["truth"]) for r in rows]) if "truth" in rows[0] and rows[0]["truth"] else None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if truth is not None:
        ax.scatter(truth, est, s=8, alpha=0.6)
        lim = [0, max(1e-3, float(np.nanmax(np.r_[truth, est])))]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("true fraction (generator)")
        ax.set_ylabel("estimated fraction")
    else:
        order = np.argsort(est)[::-1]
        ax.bar(np.arange(len(est)), est[order])
        ax.set_xlabel("genes (sorted)")
        ax.set_ylabel("estimated fraction")
    ax.set_title("Expression variance reflected in morphology, per gene")
    return _save(plt, fig, fig_dir, "per_gene_explained.png")


def _umap(latent_path: str, fig_dir: str) -> str | None:
    if not os.path.exists(latent_path):
        return None
    data = np.load(latent_path, allow_pickle=False)
    z, labels = data["z"], data["cell_type"].astype(str)
    import umap

    xy = umap.UMAP(n_neighbors=15, random_state=0).fit_transform(z)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for lab in np.unique(labels):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, label=lab)
    ax.legend(markerscale=3, fontsize=7)
    ax.set_title("Joint latent (UMAP) by cell type")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(plt, fig, fig_dir, "joint_umap.png")


def _responder_chart(rows: list[dict[str, str]], fig_dir: str, name: str, title: str) -> str | None:
    eff_key = next((k for k in ("cohen_d", "effect_size", "log2fc") if rows and k in rows[0]), None)
    if eff_key is None:
        return None
    q_key = next((k for k in ("q_t", "q_mw", "q_value") if k in rows[0]), None)
    eff = np.array([float(r[eff_key]) for r in rows])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if q_key:
        q = np.clip(np.array([float(r[q_key]) for r in rows]), 1e-300, 1)
        ax.scatter(eff, -np.log10(q), s=8, alpha=0.7)
        ax.axhline(-np.log10(0.05), color="k", ls="--", lw=0.8)
        ax.set_ylabel("-log10 q (BH)")
    else:
        ax.bar(np.arange(len(eff)), np.sort(eff))
    ax.set_xlabel(eff_key.replace("_", " "))
    ax.set_title(title)
    return _save(plt, fig, fig_dir, name)


def _crop_grid(nuclei_dir: str, fig_dir: str, n: int = 16) -> str | None:
    if not nuclei_dir or not glob.glob(os.path.join(nuclei_dir, "manifest*.json")):
        return None
    from cosmic_jax.data.records import CropSource

    src = CropSource(nuclei_dir)
    idx = np.linspace(0, len(src) - 1, min(n, len(src))).astype(int)
    plt = _plt()
    fig, axes = plt.subplots(2, (len(idx) + 1) // 2, figsize=(len(idx) * 0.6, 1.5))
    for ax, i in zip(np.ravel(axes), idx):
        ax.imshow(src[int(i)]["image"][..., 0], cmap="gray")
        ax.axis("off")
    fig.suptitle(f"real nuclei crops ({len(src)} in {os.path.basename(nuclei_dir)})", fontsize=8)
    return _save(plt, fig, fig_dir, "real_crops.png", tight=False)


def write_report(workdir: str, data_dir: str | None = None, nuclei_dir: str | None = None,
                 out_path: str | None = None) -> str:
    """Write ``report.md`` (+ ``figures/``) for a `cosmic analyze` workdir; returns its path."""
    adir = os.path.join(workdir, "analysis")
    summary_path = os.path.join(adir, "summary.json")
    if not os.path.exists(summary_path):
        raise FileNotFoundError(f"{summary_path}: no analysis summary; run `cosmic analyze` first")
    summary = json.load(open(summary_path))
    out_path = out_path or os.path.join(workdir, "report.md")
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "figures")
    os.makedirs(fig_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out_path)))  # noqa: E731

    lines = ["# COSMIC demo report", ""]
    truth = summary.get("truth", {})
    lines += ["## How much of each modality shows in the other", "",
              "| quantity | estimate (95% CI) | generator truth |", "|---|---|---|"]
    for key in ("expr_var_explained_by_morph", "morph_var_explained_by_expr"):
        if key in summary:
            lines.append(f"| {key} | {_fmt(summary[key])} | {_fmt(truth.get(key, '-'))} |")
    if "per_gene_spearman_vs_truth" in summary:
        lines.append(f"\nPer-gene Spearman correlation with the truth: {summary['per_gene_spearman_vs_truth']:.3f}")
    lines.append("")

    figs = []
    mae_dir = os.path.join(workdir, "mae")
    figs.append(("Real nuclei crops (shipped fluorescence images)", _crop_grid(nuclei_dir, fig_dir)))
    figs.append(("MAE pretraining loss", _loss_curve(mae_dir, fig_dir)))
    recon = sorted(glob.glob(os.path.join(mae_dir, "recon", "*.png")))
    if recon:
        dst = os.path.join(fig_dir, "mae_reconstructions.png")
        shutil.copyfile(recon[-1], dst)
        figs.append(("MAE reconstructions (original / masked / reconstructed)", dst))
    figs.append(("Joint latent by cell type", _umap(os.path.join(adir, "joint_latent.npz"), fig_dir)))
    figs.append(("Per-gene explained variance", _per_gene_chart(_read_csv(os.path.join(adir, "per_gene.csv")), fig_dir)))
    figs.append(("Responders vs resistant: genes", _responder_chart(
        _read_csv(os.path.join(adir, "response_genes.csv")), fig_dir, "response_genes.png", "responder vs resistant genes")))
    figs.append(("Responders vs resistant: morphology features", _responder_chart(
        _read_csv(os.path.join(adir, "response_features.csv")), fig_dir, "response_features.png",
        "responder vs resistant morphology")))

    for key, title in (("celltype", "Cell-type identity"), ("retrieval", "Cross-modal retrieval"),
                       ("response", "Responders vs resistant"), ("generation", "Generation quality"),
                       ("decomposition_baselines", "Decomposition baselines")):
        if key in summary:
            lines += [f"## {title}", "", "```json", json.dumps(summary[key], indent=1)[:4000], "```", ""]
    lines += ["## Figures", ""]
    for title, path in figs:
        if path:
            lines += [f"### {title}", "", f"![{title}]({rel(path)})", ""]
    if "timings_s" in summary:
        lines += ["## Timings (s)", "", "```json", json.dumps(summary["timings_s"], indent=1), "```", ""]
    with open(out_path, "w") as f:
        f.write("\n".join(lines))
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the Markdown report of a `cosmic analyze` workdir.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--nuclei", default=None, help="a real-crop dataset to show a few crops from")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    print(write_report(a.workdir, nuclei_dir=a.nuclei, out_path=a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
