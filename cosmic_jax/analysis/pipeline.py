"""Every analysis of paired cells, from arrays: expression embedding -> cross-fitted joint model -> results.

``run_analyses(adata, cfg, out_dir, x_morph=..., features=...)`` takes the expression AnnData and
the morphology representation(s) *already in AnnData row order* (matched by cell id by the caller)
and writes ``out_dir/summary.json`` plus CSV tables. It never pretrains, embeds or reads generator
truth: the end-to-end workflow is ``cosmic_jax.workflows.analyze`` and truth comparisons are
``cosmic_jax.evaluation``.

Stages:
  1. expression embedding (PCA with gene read-out, expression.py);
  2. morphology input m = [whitened PCs of the representation, standardised features] and
     expression PCs e; a K-fold cross-fitted joint model (one fit per fold serves every analysis);
  3. variance decomposition both ways (flow, ridge and kNN baselines), cell type, retrieval,
     generation quality, responders.
Expression-only data (no morphology) runs the expression-side analyses only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from cosmic_jax.analysis import celltype, generation, response
from cosmic_jax.analysis import variance as V
from cosmic_jax.analysis.expression import embed_expression, iter_lognorm
from cosmic_jax.analysis.morphology import MorphFeatures, pca_reduce
from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.joint.fit import fit_joint

log = logging.getLogger(__name__)

RESPONSE_GROUPS = ("resistant", "responder")


def write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})


def obs_column(adata, key: str, default: str, where: str) -> np.ndarray | None:
    """``obs[key]`` as str; key "auto" uses ``default`` when present; a named key that is missing is an error."""
    if not key:
        return None
    if key == "auto":
        key = default if default in adata.obs.columns else ""
        return np.asarray(adata.obs[key]).astype(str) if key else None
    if key not in adata.obs.columns:
        raise V.AnalysisInputError(f"{where}: obs has no column {key!r} (columns: {list(adata.obs.columns)}); "
                                   "name an existing column or pass an empty key to skip")
    return np.asarray(adata.obs[key]).astype(str)


class JointFits:
    """Memoised ``fit_fn(train_idx) -> JointModel``: every analysis sharing a fold reuses one fit."""

    def __init__(self, m: np.ndarray, e: np.ndarray, config, seed: int, labels=None):
        self.m, self.e, self.config, self.seed, self.labels = m, e, config, seed, labels
        self.models: dict[bytes, Any] = {}
        self.fit_seconds = 0.0

    def model(self, train: np.ndarray):
        key = np.sort(train).tobytes()
        if key not in self.models:
            t = time.perf_counter()
            lab = None if self.labels is None else self.labels[train]
            self.models[key] = fit_joint(self.m[train], self.e[train], self.config, seed=self.seed, labels=lab,
                                         desc=f"joint fit {len(self.models) + 1}")
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


def expression_decomposition(expr, m, fit_fn, cfg, strata):
    """Expression variance explained by morphology, overall (gene space) and per gene."""
    mom = V.cross_fit_moments(m, fit_fn, cfg.num_samples, cfg.n_folds, cfg.seed, strata)
    dec = V.decompose(expr.scores, mom, metric=expr.metric, resid_sq=expr.resid_sq, n_boot=cfg.n_boot, seed=cfg.seed,
                      estimator=cfg.estimator)
    per_gene = V.per_readout_explained(dec.explained_cov, expr.loadings, expr.gene_var)
    return dec, per_gene, mom


def morphology_decomposition(feats: np.ndarray, e: np.ndarray, fit_fn, cfg, strata):
    """Morphology-feature variance explained by expression (mean over features of the ratios)."""
    mom = V.cross_fit_moments(e, fit_fn, cfg.num_samples, cfg.n_folds, cfg.seed, strata)
    return V.decompose(feats, mom, aggregate="mean_ratio", n_boot=cfg.n_boot, seed=cfg.seed, estimator=cfg.estimator)


class _Stages:
    """One log line per analysis stage with its elapsed time (long stages are never silent)."""

    def __init__(self, total: int):
        self.total, self.done, self.timings = total, 0, {}
        self._name, self._t = None, time.perf_counter()

    def next(self, name: str) -> None:
        self.end()
        self.done += 1
        self._name, self._t = name, time.perf_counter()
        log.info("analyze [%d/%d] %s", self.done, self.total, name.replace("_", " "))

    def end(self) -> None:
        if self._name is not None:
            self.timings[self._name] = time.perf_counter() - self._t
            self._name = None


def run_analyses(adata, cfg: ml_collections.ConfigDict, out_dir: str, x_morph: np.ndarray | None = None,
                 features: MorphFeatures | None = None, where: str = "AnnData") -> dict:
    """Run every analysis and write ``out_dir``; returns the summary dict (also ``summary.json``).

    Args:
      adata: expression AnnData (counts or log-normalised, see ``cfg.input_kind``).
      cfg: ``configs/analyze.py`` config.
      out_dir: output folder (created).
      x_morph: (N, D) morphology representation in ``adata`` row order (MAE embedding or a given
        obsm), or None.
      features: measured morphology features in ``adata`` row order (the targets of the
        morphology side of the decomposition), or None (then ``x_morph`` is the target).
      where: the input's name in error messages.
    """
    os.makedirs(out_dir, exist_ok=True)
    stages = _Stages(6 if (x_morph is not None or features is not None) else 2)
    summary: dict[str, Any] = {"config": cfg_io.to_dict(cfg)}
    labels = obs_column(adata, cfg.label_key, "cell_type", where)
    resp = _responders(adata, cfg, where)

    stages.next("expression_embedding")
    expr = embed_expression(adata, n_comps=cfg.expr_comps, input_kind=cfg.input_kind, use_raw=cfg.use_raw,
                            n_top_genes=cfg.n_top_genes, seed=cfg.seed)
    summary["expression_embedding"] = {"n_cells": int(len(expr.scores)), "n_genes": int(len(expr.gene_names)),
                                       "n_comps": int(expr.scores.shape[1]), "input_kind": expr.input_kind,
                                       "captured_fraction": expr.captured_fraction()}
    summary["celltype"] = {} if labels is not None else {"skipped": "no cell-type column"}
    if labels is not None:
        summary["celltype"]["expression"] = celltype.probe(expr.scores, labels, seed=cfg.seed, name="expression")
    if x_morph is None and features is None:
        log.info("no morphology: expression-side analyses only")
        stages.next("response")
        summary.update(_response_expression(adata, expr, cfg, resp, out_dir))
        return _finish(summary, stages, out_dir)

    # --- morphology input m (condition of p(e|m)) and the targets of p(m|e)
    parts, target_cols = [], None
    if x_morph is not None:
        parts.append(pca_reduce(x_morph, cfg.morph_comps, cfg.seed))
    if features is not None:
        target_cols = np.arange(sum(p.shape[1] for p in parts), sum(p.shape[1] for p in parts) + features.values.shape[1])
        parts.append(features.values)
    m = np.concatenate(parts, axis=1)
    targets = features.values if features is not None else m
    target_names = features.names if features is not None else [f"morph_pc{i}" for i in range(m.shape[1])]
    e = expr.scores
    fits = JointFits(m, e, cfg.joint, cfg.seed, labels)
    strata = labels

    stages.next("variance_decomposition")
    dec_e, per_gene, mom_e = expression_decomposition(expr, m, fits.expr_given_morph, cfg, strata)
    dec_m = morphology_decomposition(targets, e, lambda tr: fits.morph_given_expr(tr, target_cols), cfg, strata)
    summary["expr_var_explained_by_morph"] = dec_e.overall.to_dict()
    summary["morph_var_explained_by_expr"] = dec_m.overall.to_dict()

    stages.next("decomposition_baselines")
    baselines = {}
    for kind in ("ridge", "knn"):
        be, _, _ = expression_decomposition(expr, m, generation.baseline_fit_fn(kind, m, e), cfg, strata)
        bm = morphology_decomposition(targets, e, generation.baseline_fit_fn(kind, e, targets), cfg, strata)
        baselines[kind] = {"expr_var_explained_by_morph": be.overall.to_dict(),
                           "morph_var_explained_by_expr": bm.overall.to_dict()}
    summary["decomposition_baselines"] = baselines
    write_csv(os.path.join(out_dir, "per_gene.csv"),
              [{"gene": str(g), "explained_fraction": float(f), "total_var": float(v)}
               for g, f, v in zip(expr.gene_names, per_gene, expr.gene_var)])
    write_csv(os.path.join(out_dir, "per_feature.csv"),
              [{"feature": n, "explained_fraction": float(f), "ci_low": float(lo), "ci_high": float(hi)}
               for n, f, lo, hi in zip(target_names, dec_m.per_dim, *dec_m.per_dim_ci)])

    stages.next("cell_type_and_retrieval")
    if labels is not None:
        ct = summary["celltype"]
        if x_morph is not None:
            ct["morphology"] = celltype.probe(x_morph, labels, seed=cfg.seed, name="morphology")
        if features is not None:
            ct["morphology_features"] = celltype.probe(features.values, labels, seed=cfg.seed, name="features")
        z = _cross_fitted_latent(fits, m, e, labels, cfg)
        ct["joint_latent"] = celltype.probe(z, labels, seed=cfg.seed, name="joint latent")
        np.savez(os.path.join(out_dir, "joint_latent.npz"), z=z, cell_type=np.asarray(labels).astype("U"))
        ct["generated_expression"] = celltype.generated_expression_probe(
            m, e, labels, fits.expr_given_morph, n_folds=cfg.n_folds, seed=cfg.seed)
    summary["retrieval"] = celltype.retrieval(mom_e.mean, e, num_candidates=min(len(e), 1000), seed=cfg.seed)

    stages.next("generation_quality")
    if labels is not None:
        rows = generation.generation_quality(
            m, e, labels, {"flow": fits.expr_given_morph, "ridge": generation.baseline_fit_fn("ridge", m, e),
                           "knn": generation.baseline_fit_fn("knn", m, e)}, n_folds=cfg.n_folds, seed=cfg.seed)
        write_csv(os.path.join(out_dir, "generation.csv"), rows)
        summary["generation"] = {r["method"]: {k: v for k, v in r.items() if k not in ("method", "cell_type")}
                                 for r in rows if r["cell_type"] == "ALL"}

    stages.next("response")
    summary.update(_response_expression(adata, expr, cfg, resp, out_dir))
    if resp is not None:
        treated, is_resp = resp
        rows = response.differential(targets[treated], is_resp, target_names, name="morphology features")
        write_csv(os.path.join(out_dir, "response_features.csv"), rows)
        r = summary.setdefault("response", {})
        r["features_significant"] = [x["name"] for x in rows if x["q_t"] < 0.05]
        r["auc_morphology"] = response.response_auc(m[treated], is_resp, seed=cfg.seed)
    summary["joint_fit_seconds"] = fits.fit_seconds
    return _finish(summary, stages, out_dir)


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


def _responders(adata, cfg, where: str):
    """(treated mask, responder-among-treated bool) from the response column, or None."""
    r = obs_column(adata, cfg.response_key, "response", where)
    if r is None:
        return None
    treated = np.isin(r, RESPONSE_GROUPS)
    if treated.sum() < 10:
        if cfg.response_key != "auto":
            raise V.AnalysisInputError(f"{where}: obs[{cfg.response_key!r}] has {int(treated.sum())} cells labelled "
                                       f"{' or '.join(RESPONSE_GROUPS)}; need at least 10")
        return None
    return treated, r[treated] == "responder"


def _response_expression(adata, expr, cfg, resp, out_dir) -> dict:
    if resp is None:
        return {}
    treated, is_resp = resp
    x = np.concatenate([b for _, b, _ in iter_lognorm(adata, expr.input_kind, cfg.use_raw, rows=np.flatnonzero(treated))])
    rows = response.differential(x, is_resp, list(expr.gene_names), log_normalised=True, name="expression")
    write_csv(os.path.join(out_dir, "response_genes.csv"), rows)
    return {"response": {"n_treated": int(treated.sum()), "n_responders": int(is_resp.sum()),
                         "genes_significant": [r["name"] for r in rows if r["q_t"] < 0.05][:50]}}


def clean_json(o):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def _finish(summary: dict, stages: _Stages, out_dir: str) -> dict:
    stages.end()
    summary["timings_s"] = {k: round(v, 2) for k, v in stages.timings.items()}
    summary = clean_json(summary)
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    return summary
