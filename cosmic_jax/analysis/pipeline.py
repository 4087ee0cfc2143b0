"""``cosmic analyze``: MAE -> embeddings -> expression embedding -> cross-fitted joint model -> analyses.

Stages (each cached under the workdir W so a rerun skips finished work):
  1. MAE: W itself or W/mae if it holds a pretraining checkpoint, else pretrain a small one there.
  2. Morphology embedding obsm["X_cosmic"] of every crop (W/embeddings.npz, keyed by cell_id).
  3. Expression embedding (PCA with gene read-out, expression.py) and morphology features
     (obsm["morph_features"] when present, else measured from the crops).
  4. K-fold cross-fitted joint model on m = [whitened PCs of X_cosmic, standardised features] and
     e = expression PCs; one fit per fold serves every analysis (fits are memoised by fold).
  5. Analyses -> W/analysis/summary.json + CSV tables.

Expression-only data (no crops, e.g. scanpy's pbmc68k_reduced) runs the expression side only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

from cosmic_jax.analysis import celltype, generation, response
from cosmic_jax.analysis import variance as V
from cosmic_jax.analysis.expression import align_cells, cell_ids_of, embed_expression
from cosmic_jax.analysis.morphology import measure_crops, pca_reduce, standardize_features

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AnalyzeConfig:
    """Settings of one ``cosmic analyze`` run (``quick`` picks the CPU-minutes values)."""

    n_folds: int = 5
    num_samples: int = 16  # S draws per held-out cell for E[.|.]
    n_boot: int = 300
    expr_comps: int = 30
    morph_comps: int = 16  # PCs of X_cosmic in the joint model's morphology input
    n_top_genes: int | None = None
    pretrain_config: str = "test"
    pretrain_steps: int = 2000
    joint_variant: str = "default"
    joint_overrides: tuple[str, ...] = ()
    label_key: str = "cell_type"
    estimator: str = "cov"  # variance.decompose: "cov" (robust to the fit's estimation noise) or "var"
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> "AnalyzeConfig":
        base = dict(n_folds=3, num_samples=8, n_boot=100, expr_comps=20, morph_comps=8,
                    pretrain_steps=300, joint_variant="analysis")
        return cls(**{**base, **kw})


def _write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0].keys())
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})


def _has_checkpoint(path: str) -> bool:
    ck = os.path.join(path, "checkpoints")
    return os.path.exists(os.path.join(path, "config.json")) and os.path.isdir(ck) and any(
        d.isdigit() for d in os.listdir(ck))


def ensure_mae(crops_dir: str, workdir: str, cfg: AnalyzeConfig) -> str:
    """A pretraining workdir with a checkpoint: W, W/mae, or a fresh small MAE trained in W/mae."""
    for cand in (workdir, os.path.join(workdir, "mae")):
        if _has_checkpoint(cand):
            return cand
    from cosmic_jax.configs.pretrain import get_config
    from cosmic_jax.data.records import CropSource
    from cosmic_jax.train.pretrain import train_and_evaluate

    h, w, c = CropSource(crops_dir).image_shape
    if h != w:
        raise V.AnalysisInputError(f"{crops_dir}: crops are {h}x{w}; the MAE needs square crops")
    overrides = [f"steps={cfg.pretrain_steps}", f"model.image_size={h}", f"model.channels={c}",
                 f"seed={cfg.seed}", "progress=false", f"recon_every={cfg.pretrain_steps}"]
    mae_dir = os.path.join(workdir, "mae")
    log.info("no MAE checkpoint in %s: pretraining %s for %d steps in %s", workdir, cfg.pretrain_config,
             cfg.pretrain_steps, mae_dir)
    train_and_evaluate(get_config(cfg.pretrain_config, overrides), crops_dir, mae_dir)
    return mae_dir


def morphology_embedding(adata, crops_dir: str, mae_dir: str, cache: str) -> np.ndarray:
    """obsm["X_cosmic"] (N, D) in AnnData row order, cached in ``cache`` (npz, keyed by cell_id)."""
    ids = cell_ids_of(adata)
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["cell_ids"].astype(str), ids):
                adata.obsm["X_cosmic"] = z["X_cosmic"]
                return z["X_cosmic"]
    from cosmic_jax.embed.embedder import Embedder

    emb = Embedder.from_checkpoint(mae_dir).embed_anndata(adata, crops=crops_dir, key="X_cosmic")
    np.savez(cache, X_cosmic=emb, cell_ids=ids.astype("U"))
    return emb


class JointFits:
    """Memoised ``fit_fn(train_idx) -> JointModel``: every analysis sharing a fold reuses one fit."""

    def __init__(self, m: np.ndarray, e: np.ndarray, config, seed: int, labels=None):
        self.m, self.e, self.config, self.seed, self.labels = m, e, config, seed, labels
        self.models: dict[bytes, Any] = {}
        self.fit_seconds = 0.0

    def model(self, train: np.ndarray):
        key = np.sort(train).tobytes()
        if key not in self.models:
            from cosmic_jax.joint.model import fit_joint

            t = time.perf_counter()
            lab = None if self.labels is None else self.labels[train]
            self.models[key] = fit_joint(self.m[train], self.e[train], self.config, seed=self.seed, labels=lab)
            self.fit_seconds += time.perf_counter() - t
        return self.models[key]

    def expr_given_morph(self, train):
        mdl = self.model(train)
        return lambda c, s, seed: mdl.sample_expr_given_morph(c, s, seed)

    def morph_given_expr(self, train, cols: np.ndarray | None = None):
        mdl = self.model(train)
        if cols is None:
            return lambda c, s, seed: mdl.sample_morph_given_expr(c, s, seed)
        return lambda c, s, seed: mdl.sample_morph_given_expr(c, s, seed)[..., cols]


def expression_decomposition(expr, m, fit_fn, cfg: AnalyzeConfig, strata) -> tuple[V.VarianceDecomposition, np.ndarray, V.ConditionalMoments]:
    """Expression variance explained by morphology, overall (gene space) and per gene."""
    mom = V.cross_fit_moments(m, fit_fn, cfg.num_samples, cfg.n_folds, cfg.seed, strata)
    dec = V.decompose(expr.scores, mom, metric=expr.metric, resid_sq=expr.resid_sq, n_boot=cfg.n_boot, seed=cfg.seed,
                      estimator=cfg.estimator)
    per_gene = V.per_readout_explained(dec.explained_cov, expr.loadings, expr.gene_var)
    return dec, per_gene, mom


def morphology_decomposition(feats: np.ndarray, e: np.ndarray, fit_fn, cfg: AnalyzeConfig, strata):
    """Morphology-feature variance explained by expression (mean over features of the ratios)."""
    mom = V.cross_fit_moments(e, fit_fn, cfg.num_samples, cfg.n_folds, cfg.seed, strata)
    return V.decompose(feats, mom, aggregate="mean_ratio", n_boot=cfg.n_boot, seed=cfg.seed, estimator=cfg.estimator)


def _truth(data_dir: str | None) -> dict | None:
    p = os.path.join(data_dir, "truth.json") if data_dir else None
    if p and os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None


def run_analysis(data_dir: str | None, workdir: str, cfg: AnalyzeConfig, h5ad: str | None = None,
                 crops_dir: str | None = None, use_raw: bool = False, input_kind: str = "auto",
                 morph_override: np.ndarray | None = None) -> dict:
    """Run every stage and write ``workdir/analysis``; returns the summary dict.

    Args:
      data_dir: dataset dir with cells.h5ad, crops/ and optionally truth.json.
      workdir: run directory W.
      cfg: AnalyzeConfig.
      h5ad / crops_dir: explicit paths (default data_dir/cells.h5ad, data_dir/crops).
      use_raw / input_kind: where / what the expression values are (see embed_expression).
      morph_override: (N, D) morphology embedding to use instead of the MAE (tests, ablations).
    """
    import anndata

    out_dir = os.path.join(workdir, "analysis")
    os.makedirs(out_dir, exist_ok=True)
    h5ad = h5ad or os.path.join(data_dir, "cells.h5ad")
    if not os.path.exists(h5ad):
        raise FileNotFoundError(f"expression file not found: {h5ad}")
    crops_dir = crops_dir or (os.path.join(data_dir, "crops") if data_dir else None)
    if crops_dir and not os.path.isdir(crops_dir):
        crops_dir = None
    adata = anndata.read_h5ad(h5ad)
    truth = _truth(data_dir)
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"data": os.path.abspath(h5ad), "config": dataclasses.asdict(cfg)}
    rng_seed = cfg.seed

    t = time.perf_counter()
    expr = embed_expression(adata, n_comps=cfg.expr_comps, input_kind=input_kind, use_raw=use_raw,
                            n_top_genes=cfg.n_top_genes, seed=rng_seed)
    timings["expression_embedding"] = time.perf_counter() - t
    summary["expression_embedding"] = {"n_cells": int(len(expr.scores)), "n_genes": int(len(expr.gene_names)),
                                       "n_comps": int(expr.scores.shape[1]), "input_kind": expr.input_kind,
                                       "captured_fraction": expr.captured_fraction()}
    labels = None
    if cfg.label_key in adata.obs.columns:
        labels = np.asarray(adata.obs[cfg.label_key]).astype(str)
    summary["celltype"] = {}
    if labels is not None:
        summary["celltype"]["expression"] = celltype.probe(expr.scores, labels, seed=rng_seed, name="expression")

    have_morph = crops_dir is not None or morph_override is not None
    if not have_morph:
        log.info("no crops: expression-side analyses only")
        summary.update(_response_expression(adata, expr, use_raw, input_kind, truth, out_dir))
        return _finish(summary, timings, out_dir)

    # --- morphology representation
    t = time.perf_counter()
    if morph_override is not None:
        x_morph = np.asarray(morph_override, np.float64)
        summary["morphology_embedding"] = "override"
    else:
        mae_dir = ensure_mae(crops_dir, workdir, cfg)
        timings["pretrain"] = time.perf_counter() - t
        x_morph = morphology_embedding(adata, crops_dir, mae_dir, os.path.join(workdir, "embeddings.npz"))
        summary["morphology_embedding"] = {"key": "X_cosmic", "mae": os.path.abspath(mae_dir),
                                           "dim": int(x_morph.shape[1])}
    timings["morphology_embedding"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = _morph_features(adata, crops_dir)
    timings["morphology_features"] = time.perf_counter() - t
    m_pcs = pca_reduce(x_morph, cfg.morph_comps, rng_seed)
    m = np.concatenate([m_pcs, feats.values], axis=1)
    feat_cols = np.arange(m_pcs.shape[1], m.shape[1])
    e = expr.scores

    from cosmic_jax.configs.joint import get_config as joint_config

    jcfg = joint_config(cfg.joint_variant, list(cfg.joint_overrides))
    fits = JointFits(m, e, jcfg, rng_seed, labels)
    strata = labels

    # --- variance decomposition (flow model + baselines)
    t = time.perf_counter()
    dec_e, per_gene, mom_e = expression_decomposition(expr, m, fits.expr_given_morph, cfg, strata)
    dec_m = morphology_decomposition(feats.values, e, lambda tr: fits.morph_given_expr(tr, feat_cols), cfg, strata)
    summary["expr_var_explained_by_morph"] = dec_e.overall.to_dict()
    summary["morph_var_explained_by_expr"] = dec_m.overall.to_dict()
    timings["decomposition_flow"] = time.perf_counter() - t
    baselines = {}
    for kind in ("ridge", "knn"):
        be, _, _ = expression_decomposition(expr, m, generation.baseline_fit_fn(kind, m, e), cfg, strata)
        bm = morphology_decomposition(feats.values, e, generation.baseline_fit_fn(kind, e, feats.values), cfg, strata)
        baselines[kind] = {"expr_var_explained_by_morph": be.overall.to_dict(),
                           "morph_var_explained_by_expr": bm.overall.to_dict()}
    summary["decomposition_baselines"] = baselines
    gene_rows = [{"gene": str(g), "explained_fraction": float(f), "total_var": float(v)}
                 for g, f, v in zip(expr.gene_names, per_gene, expr.gene_var)]
    feat_rows = [{"feature": n, "explained_fraction": float(f), "ci_low": float(lo), "ci_high": float(hi)}
                 for n, f, lo, hi in zip(feats.names, dec_m.per_dim, *dec_m.per_dim_ci)]
    if truth:
        tg = truth.get("expr_var_explained_by_morph_per_gene", {})
        tf = truth.get("morph_var_explained_by_expr_per_feature", {})
        for r in gene_rows:
            r["truth"] = tg.get(r["gene"], float("nan"))
        for r in feat_rows:
            r["truth"] = tf.get(r["feature"], float("nan"))
        summary["truth"] = {k: truth[k] for k in ("expr_var_explained_by_morph", "morph_var_explained_by_expr")}
        from scipy.stats import spearmanr

        ok = [r for r in gene_rows if np.isfinite(r["truth"])]
        if len(ok) > 2:
            summary["per_gene_spearman_vs_truth"] = float(
                spearmanr([r["explained_fraction"] for r in ok], [r["truth"] for r in ok]).statistic)
    _write_csv(os.path.join(out_dir, "per_gene.csv"), gene_rows)
    _write_csv(os.path.join(out_dir, "per_feature.csv"), feat_rows)

    # --- cell type, retrieval, generation
    t = time.perf_counter()
    if labels is not None:
        ct = summary["celltype"]
        ct["morphology"] = celltype.probe(x_morph, labels, seed=rng_seed, name="morphology")
        ct["morphology_features"] = celltype.probe(feats.values, labels, seed=rng_seed, name="features")
        z = _cross_fitted_latent(fits, m, e, labels, cfg)
        ct["joint_latent"] = celltype.probe(z, labels, seed=rng_seed, name="joint latent")
        # Kept for the report's UMAP; plain arrays, no pickle.
        np.savez(os.path.join(out_dir, "joint_latent.npz"), z=z, cell_type=np.asarray(labels).astype("U"))
        ct["generated_expression"] = celltype.generated_expression_probe(
            m, e, labels, fits.expr_given_morph, n_folds=cfg.n_folds, seed=rng_seed)
    summary["retrieval"] = celltype.retrieval(mom_e.mean, e, num_candidates=min(len(e), 1000), seed=rng_seed)
    if labels is not None:
        rows = generation.generation_quality(
            m, e, labels, {"flow": fits.expr_given_morph, "ridge": generation.baseline_fit_fn("ridge", m, e),
                           "knn": generation.baseline_fit_fn("knn", m, e)}, n_folds=cfg.n_folds, seed=rng_seed)
        _write_csv(os.path.join(out_dir, "generation.csv"), rows)
        summary["generation"] = {r["method"]: {k: v for k, v in r.items() if k not in ("method", "cell_type")}
                                 for r in rows if r["cell_type"] == "ALL"}
    timings["celltype_generation"] = time.perf_counter() - t

    # --- response
    summary.update(_response_expression(adata, expr, use_raw, input_kind, truth, out_dir))
    resp = _responders(adata)
    if resp is not None:
        treated, is_resp = resp
        rows = response.differential(feats.values[treated], is_resp, feats.names, name="morphology features")
        _write_csv(os.path.join(out_dir, "response_features.csv"), rows)
        r = summary.setdefault("response", {})
        r["features_significant"] = [x["name"] for x in rows if x["q_t"] < 0.05]
        r["auc_morphology"] = response.response_auc(np.c_[x_morph, feats.values][treated], is_resp, seed=rng_seed)
        if truth and truth.get("responder_features"):
            r["feature_recovery"] = response.recovery(rows, truth["responder_features"])
    timings["joint_fit_total"] = fits.fit_seconds
    return _finish(summary, timings, out_dir)


def _cross_fitted_latent(fits: JointFits, m, e, labels, cfg) -> np.ndarray:
    """Joint latent of every cell from the fold model that did not train on it."""
    fold = V.fold_indices(len(m), cfg.n_folds, cfg.seed, labels)
    z = None
    for k in range(cfg.n_folds):
        test = np.flatnonzero(fold == k)
        zk = fits.model(np.flatnonzero(fold != k)).joint_latent(m[test], e[test])
        z = np.zeros((len(m), zk.shape[1])) if z is None else z
        z[test] = zk
    return z


def _morph_features(adata, crops_dir):
    ids = cell_ids_of(adata)
    if "morph_features" in adata.obsm:
        f = adata.obsm["morph_features"]
        names = list(getattr(f, "columns", [f"f{i}" for i in range(np.shape(f)[1])]))
        return standardize_features(np.asarray(f), names, ids)
    if crops_dir is None:
        raise V.AnalysisInputError("no obsm['morph_features'] and no crops to measure them from")
    feats = measure_crops(crops_dir)
    _, order = align_cells(ids, feats.cell_ids, "expression cells", f"crops in {crops_dir}")
    return standardize_features(feats.raw[order], feats.names, ids)


def _responders(adata):
    """(treated mask, responder-among-treated bool) from obs["response"], or None."""
    if "response" not in adata.obs.columns:
        return None
    r = np.asarray(adata.obs["response"]).astype(str)
    treated = np.isin(r, ["responder", "resistant"])
    if treated.sum() < 10:
        return None
    return treated, r[treated] == "responder"


def _response_expression(adata, expr, use_raw, input_kind, truth, out_dir) -> dict:
    resp = _responders(adata)
    if resp is None:
        return {}
    from cosmic_jax.analysis.expression import iter_lognorm

    treated, is_resp = resp
    rows_idx = np.flatnonzero(treated)
    x = np.concatenate([b for _, b, _ in iter_lognorm(adata, expr.input_kind, use_raw, rows=rows_idx)])
    rows = response.differential(x, is_resp, list(expr.gene_names), log_normalised=True, name="expression")
    _write_csv(os.path.join(out_dir, "response_genes.csv"), rows)
    out = {"n_treated": int(treated.sum()), "n_responders": int(is_resp.sum()),
           "genes_significant": [r["name"] for r in rows if r["q_t"] < 0.05][:50]}
    if truth and truth.get("responder_genes"):
        out["gene_recovery"] = response.recovery(rows, truth["responder_genes"])
    return {"response": out}


def _finish(summary: dict, timings: dict, out_dir: str) -> dict:
    summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}

    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            return None if not np.isfinite(o) else float(o)
        if isinstance(o, np.integer):
            return int(o)
        return o

    summary = clean(summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
