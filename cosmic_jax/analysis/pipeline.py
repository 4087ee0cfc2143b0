"""Every analysis of paired cells, from arrays: expression embedding -> cross-fitted joint model -> results.

``run_analyses(adata, cfg, out_dir, x_morph=..., features=...)`` takes the expression AnnData and
the morphology representation(s) *already in AnnData row order* (matched by cell id by the caller)
and writes ``out_dir/summary.json`` plus CSV tables. It never pretrains, embeds or reads generator
truth: the end-to-end workflow is ``cosmic_jax.workflows.analyze`` and truth comparisons are
``cosmic_jax.evaluation``.

Stages:
  1. expression embedding (PCA with gene read-out, expression.py);
  2. morphology input m = [whitened PCs of the representation, standardised features] ("both",
     the headline) and expression PCs e; a K-fold cross-fitted joint model (one fit per fold serves
     every analysis), the whole cross-fit repeated ``cfg.refit_repeats`` times so the CI carries the
     fit's own variability (``variance.refit_decompose``), each re-fit extrapolated along the
     learning curve when ``cfg.extrapolate_fraction`` > 0 (a second cross-fit on that share of
     every fold's training cells);
  3. variance decomposition both ways (flow, ridge and kNN baselines) for "both" and, with
     ``cfg.refit_repeats_side`` > 0, for each representation alone ("mae", "features"), cell type,
     retrieval, generation quality, responders.
Expression-only data (no morphology) runs the expression-side analyses only.
"""

from __future__ import annotations

import csv
import dataclasses
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
from cosmic_jax.data.swap import write_text
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

    def __init__(self, m: np.ndarray, e: np.ndarray, config, seed: int, labels=None, name: str = ""):
        self.m, self.e, self.config, self.seed, self.labels, self.name = m, e, config, seed, labels, name
        self.models: dict[bytes, Any] = {}
        self.fit_seconds = 0.0

    def model(self, train: np.ndarray):
        key = np.sort(train).tobytes()
        if key not in self.models:
            t = time.perf_counter()
            lab = None if self.labels is None else self.labels[train]
            self.models[key] = fit_joint(self.m[train], self.e[train], self.config, seed=self.seed, labels=lab,
                                         pad_rows=len(self.m),  # every fold and share: one compile
                                         desc=f"joint fit {self.name}{len(self.models) + 1}")
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


HEADLINE = V.HEADLINE
LOWER_BOUND_NOTE = (
    "Each estimate counts only what the morphology representation captures: information the "
    "representation discards cannot be counted, so the expression share explained by morphology is a "
    "lower bound of the image's share (compare MAE alone, measured features alone and both). The "
    "morphology side is the share of the representation's own targets (measured features, or the MAE "
    "embedding's whitened PCs for 'mae') explained by expression; it too is a lower bound: where the "
    "expression signal shared with morphology is weak per gene, E[morphology | counts] is learned only "
    "in part from a few thousand cells (experiments/morph_attainability.py).")
CI_METHOD = (
    "95% CI from R re-fits of the whole K-fold cross-fit (new fold split and model seeds each), combined "
    "by Rubin's rules: estimate = mean over re-fits; variance = mean bootstrap-over-cells variance "
    "(within_var) + (1 + 1/R) x variance between re-fits (between_var); t reference with Rubin's df.")


def ci_method(extrapolate_fraction: float, band_rate: float = 1.0) -> str:
    """How the intervals were made, for the summary."""
    if extrapolate_fraction <= 0:
        return CI_METHOD
    f = extrapolate_fraction
    text = CI_METHOD + (
        f" Each re-fit (and each of its bootstrap replicates) is extrapolated to unlimited training data "
        f"from two cross-fits, the fold models fitted on all and on {f:g} of their training cells: "
        f"q = q(1) + (q(1) - q({f:g})) x {f / (1 - f):g} (a fit on finite data shrinks E[t|c]; the "
        f"estimates at both shares are kept as 'learning_curve').")
    if band_rate < 1.0:
        w = f**band_rate / (1 - f**band_rate)
        text += (f" That step assumes the learning curve of a parametric fit (shrinkage ~ 1/m); a flexible fit "
                 f"can learn slower, so the interval also reaches, on its side, the estimate extrapolated at "
                 f"~ m^-{band_rate:g} (step x {w:.3g}; kept as 'slow_rate'): it moves by their gap. A fraction's "
                 f"interval is clipped to [0, 1].")
    return text


@dataclasses.dataclass
class Representation:
    """One morphology representation of the decomposition.

    Attributes:
      name: "both", "mae" or "features".
      m: (N, Dm) the joint model's morphology input (the condition of p(e|m)).
      targets: (N, F) the morphology-side targets; target_names their names.
      target_cols: their columns in ``m`` (None = all of ``m``).
      target_kind: what the targets are, for the summary.
      repeats: cross-fit repeats R.
    """

    name: str
    m: np.ndarray
    targets: np.ndarray
    target_names: list[str]
    target_cols: np.ndarray | None
    target_kind: str
    repeats: int


def representations(x_morph: np.ndarray | None, features: MorphFeatures | None, cfg) -> list[Representation]:
    """The representations to decompose, the headline first ("both" when both inputs exist)."""
    pcs = None if x_morph is None else pca_reduce(x_morph, cfg.morph_comps, cfg.seed)
    reps = []
    # The measured profile (features.context) joins the input, never the targets.
    feats_in = None if features is None else (
        features.values if features.context is None else np.concatenate([features.values, features.context], axis=1))
    if pcs is not None and features is not None:
        cols = np.arange(pcs.shape[1], pcs.shape[1] + features.values.shape[1])
        reps.append(Representation("both", np.concatenate([pcs, feats_in], axis=1), features.values,
                                   list(features.names), cols, "measured features", cfg.refit_repeats))
    side = cfg.refit_repeats_side if reps else cfg.refit_repeats
    if pcs is not None and side > 0:
        reps.append(Representation("mae", pcs, pcs, [f"morph_pc{i}" for i in range(pcs.shape[1])], None,
                                   "whitened PCs of the morphology embedding", side))
    if features is not None and side > 0:
        cols = None if features.context is None else np.arange(features.values.shape[1])
        reps.append(Representation("features", feats_in, features.values, list(features.names), cols,
                                   "measured features", side))
    return reps


def _band_rate(cfg) -> float:
    return float(cfg.get("extrapolate_band_rate", 1.0))  # configs saved before it existed: no band


def expression_decomposition(expr, m, fit_fn_for, repeats: int, cfg, strata):
    """Expression variance explained by morphology over ``repeats`` re-fits: overall (gene space), per gene."""
    dec = V.refit_decompose(expr.scores, m, fit_fn_for, repeats, cfg.num_samples, cfg.n_folds, cfg.seed, strata,
                            metric=expr.metric, resid_sq=expr.resid_sq, n_boot=cfg.n_boot, estimator=cfg.estimator,
                            extrapolate_fraction=cfg.extrapolate_fraction, band_rate=_band_rate(cfg))
    return dec, V.per_readout_explained(dec.explained_cov, expr.loadings, expr.gene_var)


def morphology_decomposition(targets: np.ndarray, e: np.ndarray, fit_fn_for, repeats: int, cfg, strata):
    """Morphology-target variance explained by expression (mean over targets of the ratios)."""
    return V.refit_decompose(targets, e, fit_fn_for, repeats, cfg.num_samples, cfg.n_folds, cfg.seed, strata,
                             aggregate="mean_ratio", n_boot=cfg.n_boot, estimator=cfg.estimator,
                             extrapolate_fraction=cfg.extrapolate_fraction, band_rate=_band_rate(cfg))


def decompose_representation(rep: Representation, expr, labels, cfg) -> tuple[dict, list, Any, np.ndarray, Any]:
    """Both directions with the flow (R re-fits of the joint model) and the ridge / kNN baselines.

    Returns:
      (summary block, the R JointFits (repeat 0 serves the other analyses), flow expression
      decomposition, per-gene fractions, flow morphology decomposition).
    """
    e = expr.scores
    fits = [JointFits(rep.m, e, cfg.joint, cfg.seed + r, labels, name=f"{rep.name} re-fit {r + 1}/{rep.repeats} fold ")
            for r in range(rep.repeats)]
    flow_e, per_gene = expression_decomposition(expr, rep.m, lambda r: fits[r].expr_given_morph, rep.repeats, cfg,
                                                labels)
    flow_m = morphology_decomposition(rep.targets, e, lambda r: lambda tr: fits[r].morph_given_expr(tr, rep.target_cols),
                                      rep.repeats, cfg, labels)
    block = {"morph_target": rep.target_kind, "n_morph_inputs": int(rep.m.shape[1]),
             "flow": {HEADLINE[0]: flow_e.overall.to_dict(), HEADLINE[1]: flow_m.overall.to_dict()}}
    for kind in ("ridge", "knn"):
        fit_e, fit_m = generation.baseline_fit_fn(kind, rep.m, e), generation.baseline_fit_fn(kind, e, rep.targets)
        be, _ = expression_decomposition(expr, rep.m, lambda r: fit_e, rep.repeats, cfg, labels)
        bm = morphology_decomposition(rep.targets, e, lambda r: fit_m, rep.repeats, cfg, labels)
        block[kind] = {HEADLINE[0]: be.overall.to_dict(), HEADLINE[1]: bm.overall.to_dict()}
    return block, fits, flow_e, per_gene, flow_m


class _Stages:
    """One log line per analysis stage with its elapsed wall and CPU time (long stages are never silent).
    CPU time (all threads of this process) is what a shared machine's load does not inflate."""

    def __init__(self, total: int):
        self.total, self.done, self.timings, self.cpu = total, 0, {}, {}
        self._name, self._t, self._c = None, time.perf_counter(), time.process_time()

    def next(self, name: str) -> None:
        self.end()
        self.done += 1
        self._name, self._t, self._c = name, time.perf_counter(), time.process_time()
        log.info("analyze [%d/%d] %s", self.done, self.total, name.replace("_", " "))

    def end(self) -> None:
        if self._name is not None:
            self.timings[self._name] = time.perf_counter() - self._t
            self.cpu[self._name] = time.process_time() - self._c
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

    # --- the decomposition, for each morphology representation (the headline first)
    reps = representations(x_morph, features, cfg)
    head = reps[0]
    m, e, targets, target_names = head.m, expr.scores, head.targets, head.target_names
    by_rep = {}
    stages.next("variance_decomposition")
    by_rep[head.name], head_fits, dec_e, per_gene, dec_m = decompose_representation(head, expr, labels, cfg)
    fits = head_fits[0]
    stages.next("decomposition_by_representation")
    for rep in reps[1:]:
        by_rep[rep.name] = decompose_representation(rep, expr, labels, cfg)[0]
    summary[HEADLINE[0]] = by_rep[head.name]["flow"][HEADLINE[0]]
    summary[HEADLINE[1]] = by_rep[head.name]["flow"][HEADLINE[1]]
    summary["headline_representation"] = head.name
    summary["decomposition_baselines"] = {k: by_rep[head.name][k] for k in ("ridge", "knn")}
    summary["decomposition_by_representation"] = by_rep
    summary["decomposition_note"] = LOWER_BOUND_NOTE
    summary["ci_method"] = ci_method(cfg.extrapolate_fraction, _band_rate(cfg))
    write_csv(os.path.join(out_dir, "per_gene.csv"),
              [{"gene": str(g), "explained_fraction": float(f), "total_var": float(v)}
               for g, f, v in zip(expr.gene_names, per_gene, expr.gene_var)])
    write_csv(os.path.join(out_dir, "per_feature.csv"),
              [{"feature": n, "explained_fraction": float(f), "ci_low": float(lo), "ci_high": float(hi)}
               for n, f, lo, hi in zip(target_names, dec_m.per_dim, *dec_m.per_dim_ci)])
    mom_e = dec_e.moments[0]

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
    summary["joint_fit_seconds"] = sum(f.fit_seconds for f in head_fits)
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
    summary["timings_cpu_s"] = {k: round(v, 2) for k, v in stages.cpu.items()}
    summary = clean_json(summary)
    write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary
