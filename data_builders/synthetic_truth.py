"""Ground truth of the synthetic generator: nested Monte Carlo, calibration, attainability.

The truth is Var(E[y | S]) / Var(y) for y = log-normalised expression (per gene) and y =
measured morphology features (per feature), S = (cell type, response, shared programs); see
:data:`DEFINITIONS`. :func:`calibrate` sets the expression shared/private split so the overall
expression truth hits a target, and :func:`attainability` checks that the truth is reachable
from what the data show (held-out R^2 of one modality predicted from S, the render
parameters, measured features, raw pixels, or the other modality).

The model functions (sampling, rendering) live in :mod:`data_builders.synthetic`, which
re-exports everything here; that module is imported lazily to avoid an import cycle. The MC,
calibration and the generic part of ``truth.json`` also serve other generator families
(``data_builders/families``): pass their module as ``gen``. A generator module provides
``sample_state(world, n, rng)`` (dict of per-cell arrays), ``sample_counts(world, state, rng)``
(dict with ``counts``), ``sample_images(world, state, rng)`` (images first), ``log_normalize``,
``_rng(seed, *stream)`` and the stream ``_CALIB``; its ``world`` has ``config`` (with the MC sizes
``*_mc_outer`` / ``*_mc_inner``, ``calib_*``, ``mc_groups``, ``chunk_cells``, ``n_genes``),
``angle``, ``seed``, ``gene_names``, ``cell_types``, ``shared_scale`` and ``private_scale``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import numpy as np

from cosmic_jax.configs.overrides import to_dict
from cosmic_jax.data import morph_features


class SignalSplit:
    """The expression signal's split of a generator's World (``config.expr_signal_sd``, ``angle``):
    the sd of its shared (S-driven) and private parts, the angle set by :func:`calibrate`."""

    @property
    def shared_scale(self) -> float:
        return float(self.config.expr_signal_sd * np.cos(self.angle))

    @property
    def private_scale(self) -> float:
        return float(self.config.expr_signal_sd * np.sin(self.angle))


DEFINITIONS = """\
S = everything that drives morphology AND expression jointly: cell type, response status
(untreated / resistant / responder) and the shared continuous programs (obsm['true_shared']).
Expression: x_g = log1p(counts_g / library_size * 1e4), library_size = total counts of the cell.
expr_var_explained_by_morph_per_gene[g] = Var(E[x_g | S]) / Var(x_g).
expr_var_explained_by_morph = sum_g Var(E[x_g | S]) / sum_g Var(x_g) (all genes).
Morphology: f = morph_features.measure(crop) (features listed in feature_names; standardising
does not change the ratios). morph_var_explained_by_expr_per_feature[k] = Var(E[f_k | S]) / Var(f_k);
morph_var_explained_by_expr = mean over features of that ratio.
Variances are over the population the generator samples from (cell-type, treatment and response
proportions as configured), estimated by nested Monte Carlo: outer draws of S, inner draws of
everything else (private programs, library size, negative-binomial noise; for images the private
programs, orientation, texture field, nucleoli and pixel noise), with the unbiased ANOVA
correction Var(E[y|S]) = Var(inner means) - E[inner var] / n_inner. *_se are jackknife standard
errors over groups of outer draws. Because expression and morphology are conditionally
independent given S, these equal the fractions explainable from the other modality whenever S is
recoverable from it (an upper bound otherwise)."""


class _Nested:
    """Sufficient statistics of a nested design y[outer, inner, d], grouped for the jackknife."""

    def __init__(self, n_groups: int, n_inner: int, dim: int):
        self.n_inner = n_inner
        self.count = np.zeros(n_groups)
        self.s1 = np.zeros((n_groups, dim))  # sum of inner means
        self.s2 = np.zeros((n_groups, dim))  # sum of squared inner means
        self.sw = np.zeros((n_groups, dim))  # sum of inner variances
        self.t1 = np.zeros((n_groups, dim))  # sum over all samples (for the population mean)
        self.t2 = np.zeros((n_groups, dim))

    def add(self, y: np.ndarray, group: np.ndarray) -> None:
        """y: (n_outer_chunk, n_inner, dim); group: (n_outer_chunk,) group index per outer draw."""
        m = y.mean(axis=1)
        w = y.var(axis=1, ddof=1)
        np.add.at(self.count, group, 1.0)
        np.add.at(self.s1, group, m)
        np.add.at(self.s2, group, m**2)
        np.add.at(self.sw, group, w)
        np.add.at(self.t1, group, y.sum(axis=1))
        np.add.at(self.t2, group, (y**2).sum(axis=1))

    @staticmethod
    def _bw(count, s1, s2, sw, n_inner):
        var_means = (s2 - s1**2 / count) / (count - 1)
        within = sw / count
        return var_means - within / n_inner, within

    def estimates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Between (D,), within (D,), and leave-one-group-out between/within (K, D)."""
        tot = [a.sum(axis=0) for a in (self.count, self.s1, self.s2, self.sw)]
        b, w = self._bw(*tot, self.n_inner)
        loo = [t - a for t, a in zip(tot, (self.count, self.s1, self.s2, self.sw))]  # (K,), (K, D)...
        bl, wl = self._bw(loo[0][:, None], loo[1], loo[2], loo[3], self.n_inner)
        return b, w, bl, wl

    def population_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.count.sum() * self.n_inner
        mean = self.t1.sum(axis=0) / n
        return mean, np.sqrt(np.maximum(self.t2.sum(axis=0) / n - mean**2, 0.0))


def _jackknife(stat: Callable[[np.ndarray, np.ndarray], np.ndarray], nested: _Nested):
    b, w, bl, wl = nested.estimates()
    full = stat(b, w)
    reps = np.stack([stat(bl[k], wl[k]) for k in range(len(bl))])
    k = len(reps)
    se = np.sqrt((k - 1) / k * ((reps - reps.mean(axis=0)) ** 2).sum(axis=0))
    return full, se


def _run_nested(
    world, rng: np.random.Generator, n_outer: int, n_inner: int, n_groups: int, dim: int,
    inner_fn: Callable[[dict[str, np.ndarray], np.random.Generator], np.ndarray], chunk: int, gen,
) -> _Nested:  # fmt: skip
    nested = _Nested(n_groups, n_inner, dim)
    for start in range(0, n_outer, chunk):
        m = min(chunk, n_outer - start)
        state = gen.sample_state(world, m, rng)
        inner = np.repeat(np.arange(m), n_inner)
        rep = {k: v[inner] for k, v in state.items()}
        y = inner_fn(rep, rng).reshape(m, n_inner, dim)
        nested.add(y, (start + np.arange(m)) % n_groups)
    return nested


def expression_truth(
    world, rng: np.random.Generator, n_outer: int | None = None, n_inner: int | None = None, *, gen
) -> dict[str, Any]:
    """Nested-MC truth of Var(E[x_g | S]) / Var(x_g) (see :data:`DEFINITIONS`).

    Args:
      gen: the generator module of ``world`` (:mod:`data_builders.synthetic` or a family's).

    Returns:
      dict: ``per_gene`` (G,), ``per_gene_se`` (G,), ``overall`` float, ``overall_se`` float.
    """
    syn, cfg = gen, world.config
    n_outer = n_outer or cfg.expr_mc_outer
    n_inner = n_inner or cfg.expr_mc_inner
    nested = _run_nested(
        world, rng, n_outer, n_inner, cfg.mc_groups, cfg.n_genes,
        lambda st, r: syn.log_normalize(syn.sample_counts(world, st, r)["counts"]), chunk=1000, gen=syn,
    )  # fmt: skip
    per_gene, per_gene_se = _jackknife(lambda b, w: b / (b + w), nested)
    overall, overall_se = _jackknife(lambda b, w: np.array(b.sum() / (b + w).sum()), nested)
    return {
        "per_gene": per_gene, "per_gene_se": per_gene_se,
        "overall": float(overall), "overall_se": float(overall_se),
    }  # fmt: skip


def morphology_truth(
    world, rng: np.random.Generator, n_outer: int | None = None, n_inner: int | None = None, *, gen
) -> dict[str, Any]:
    """Nested-MC truth of Var(E[f_k | S]) / Var(f_k) on measured features (images rendered).

    Args:
      gen: the generator module of ``world`` (:mod:`data_builders.synthetic` or a family's).

    Returns:
      dict: ``per_feature`` (F,), ``per_feature_se``, ``overall`` (mean over features),
      ``overall_se``, and the population ``feature_mean`` / ``feature_std`` (F,) of raw features.
    """
    syn, cfg = gen, world.config
    n_outer = n_outer or cfg.morph_mc_outer
    n_inner = n_inner or cfg.morph_mc_inner
    nested = _run_nested(
        world, rng, n_outer, n_inner, cfg.mc_groups, len(morph_features.FEATURE_NAMES),
        lambda st, r: morph_features.measure_batch(syn.sample_images(world, st, r)[0]),
        chunk=max(1, cfg.chunk_cells // n_inner), gen=syn,
    )  # fmt: skip
    per_f, per_f_se = _jackknife(lambda b, w: b / (b + w), nested)
    overall, overall_se = _jackknife(lambda b, w: np.array(np.mean(b / (b + w))), nested)
    mean, std = nested.population_mean_std()
    return {
        "per_feature": per_f, "per_feature_se": per_f_se, "overall": float(overall),
        "overall_se": float(overall_se), "feature_mean": mean, "feature_std": std,
    }  # fmt: skip


def calibrate(world, shared_fraction: float, rng_seed: int | None = None, xtol: float = 2e-3, *, gen):
    """Set the shared/private angle so the overall expression truth equals ``shared_fraction``.

    Uses a fixed-seed (common random numbers) MC estimate inside Brent's method, so the
    objective is a smooth function of the angle. ``gen``: the generator module of ``world``.
    """
    from scipy.optimize import brentq

    syn, cfg = gen, world.config
    seed = world.seed if rng_seed is None else rng_seed

    def frac(angle: float) -> float:
        w = dataclasses.replace(world, angle=float(angle))
        return expression_truth(w, syn._rng(seed, syn._CALIB), cfg.calib_outer, cfg.calib_inner, gen=syn)["overall"]

    hi, lo = frac(0.0), frac(np.pi / 2)
    if not lo + 0.005 < shared_fraction < hi - 0.005:
        raise ValueError(
            f"shared_fraction={shared_fraction} is not reachable with this config: the overall true "
            f"expression fraction ranges over ({lo:.3f}, {hi:.3f}) (raise expr_signal_sd or "
            "library_size_mean for larger values)"
        )
    angle = brentq(lambda t: frac(t) - shared_fraction, 0.0, np.pi / 2, xtol=xtol)
    return dataclasses.replace(world, angle=float(angle))


def truth_dict(world, shared_fraction: float, n_cells: int, et: dict, mt: dict, *, gen) -> dict[str, Any]:
    """The ``truth.json`` content from :func:`expression_truth` (et) / :func:`morphology_truth` (mt)."""
    resp_features = sorted({f for p in gen.RESPONDER_PARAMS for f in morph_features.PARAM_TO_FEATURES[p]})
    truth = truth_core(world, shared_fraction, n_cells, et, mt, DEFINITIONS)
    truth.update({
        "responder_genes": world.responder_genes,
        "responder_log_fold_change": {world.gene_names[g]: float(world.responder_lfc[g])
                                      for g in np.flatnonzero(world.responder_lfc)},  # fmt: skip
        "responder_features": resp_features,
        "responder_morph_params": list(gen.RESPONDER_PARAMS),
        "response_levels": list(gen.RESPONSE_LEVELS),
    })
    return truth


def truth_core(world, shared_fraction: float, n_cells: int, et: dict, mt: dict, definitions: str) -> dict[str, Any]:
    """The ``truth.json`` keys every generator family writes (truths, MC record, definitions)."""
    cfg = world.config
    fn = list(morph_features.FEATURE_NAMES)
    return {
        "expr_var_explained_by_morph": et["overall"],
        "expr_var_explained_by_morph_se": et["overall_se"],
        "morph_var_explained_by_expr": mt["overall"],
        "morph_var_explained_by_expr_se": mt["overall_se"],
        "expr_var_explained_by_morph_per_gene": dict(zip(world.gene_names, map(float, et["per_gene"]))),
        "expr_var_explained_by_morph_per_gene_se": dict(zip(world.gene_names, map(float, et["per_gene_se"]))),
        "morph_var_explained_by_expr_per_feature": dict(zip(fn, map(float, mt["per_feature"]))),
        "morph_var_explained_by_expr_per_feature_se": dict(zip(fn, map(float, mt["per_feature_se"]))),
        "cell_types": world.cell_types,
        "feature_names": fn,
        "feature_standardization": {"mean": mt["feature_mean"].tolist(), "std": mt["feature_std"].tolist()},
        "shared_fraction_target": float(shared_fraction),
        "expr_shared_scale": world.shared_scale,
        "expr_private_scale": world.private_scale,
        "seed": world.seed,
        "n_cells": int(n_cells),
        "n_genes": cfg.n_genes,
        "monte_carlo": {
            "expr": {"n_outer": cfg.expr_mc_outer, "n_inner": cfg.expr_mc_inner},
            "morph": {"n_outer": cfg.morph_mc_outer, "n_inner": cfg.morph_mc_inner},
            "calibration": {"n_outer": cfg.calib_outer, "n_inner": cfg.calib_inner},
            "jackknife_groups": cfg.mc_groups,
        },
        "definitions": definitions,
    }


def build_anndata(world, shared_fraction, state, cell_ids, counts, lib_factor, z_m, z_e, params, feats, et, mt, *,
                  gen):
    """The ``cells.h5ad`` AnnData: counts, obs labels, per-gene truth in var, latents in obsm."""
    import anndata as ad
    import pandas as pd

    syn, cfg = gen, world.config
    response = np.asarray(syn.RESPONSE_LEVELS, dtype=object)[state["response"]]
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "cell_type": pd.Categorical(np.asarray(world.cell_types, dtype=object)[state["cell_type"]],
                                        categories=world.cell_types),
            "treatment": pd.Categorical(np.where(state["response"] > 0, "treated", "control"),
                                        categories=["control", "treated"]),
            "response": pd.Categorical(response, categories=list(syn.RESPONSE_LEVELS)),
            "library_size": counts.sum(axis=1).astype(np.int64),
            "true_library_factor": lib_factor,
        },
        index=pd.Index(cell_ids, name="cell"),
    )  # fmt: skip
    var = pd.DataFrame(
        {
            "gene_name": world.gene_names,
            "is_responder_gene": world.responder_lfc != 0,
            "responder_log_fold_change": world.responder_lfc,
            "true_expr_frac_explained_by_morph": et["per_gene"],
            "true_expr_frac_explained_by_morph_se": et["per_gene_se"],
            "true_shared_mix": world.shared_mix,
        },
        index=pd.Index(world.gene_names, name="gene"),
    )
    param_cols = list(syn.render.MORPH_PARAMS) + ["orientation", "nucleoli_count"]
    obsm = {
        "true_shared": state["shared"],
        "true_morph_private": z_m,
        "true_expr_private": z_e,
        "true_morph_params": pd.DataFrame(params, index=obs.index, columns=param_cols),
    }
    if cfg.measure_features:
        z = morph_features.standardize(feats, mt["feature_mean"], mt["feature_std"])
        obsm["morph_features"] = pd.DataFrame(z, index=obs.index, columns=list(morph_features.FEATURE_NAMES))
    varm = {
        "true_celltype_effects": (world.shared_scale * world.expr_celltype).T,
        "true_shared_loadings": world.shared_scale * world.expr_shared,
        "true_expr_private_loadings": world.private_scale * world.expr_private,
    }
    uns = {
        "synthetic": {
            "config_json": json.dumps(to_dict(cfg), sort_keys=True),
            "seed": world.seed,
            "shared_fraction": float(shared_fraction),
            "expr_shared_scale": world.shared_scale,
            "expr_private_scale": world.private_scale,
            "response_levels": list(syn.RESPONSE_LEVELS),
            "feature_names": list(morph_features.FEATURE_NAMES),
            "feature_mean": mt["feature_mean"],
            "feature_std": mt["feature_std"],
        }
    }
    return ad.AnnData(X=counts, obs=obs, var=var, obsm=obsm, varm=varm, uns=uns)


# ----------------------------------------------------------------------------- attainability


def _heldout_r2(inputs: np.ndarray, target: np.ndarray, n_train: int, seed: int):
    """Held-out R^2 (sum-of-variance weighted over target columns) of a nonlinear regression.

    Kernel ridge regression (RBF, Nystroem features, ridge penalty chosen by leave-one-out CV
    on the training cells): closed-form, so the check stays fast on a CPU.

    Returns:
      (overall R^2, per-column R^2 (D,)) on the held-out cells.
    """
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tr, te = slice(0, n_train), slice(n_train, None)
    d = inputs.shape[1]
    model = make_pipeline(
        StandardScaler(),
        Nystroem(gamma=0.5 / d, n_components=min(1000, n_train), random_state=seed),
        RidgeCV(alphas=np.logspace(-3, 2, 6)),
    )
    model.fit(inputs[tr], target[tr])
    pred = model.predict(inputs[te])
    resid = ((target[te] - pred) ** 2).sum(0)
    total = ((target[te] - target[te].mean(0)) ** 2).sum(0)
    return float(1 - resid.sum() / total.sum()), 1 - resid / total


def attainability(world, n_cells: int = 6000, seed: int = 0, test_fraction: float = 0.2, *, gen) -> dict[str, Any]:
    """Check that the truth is reachable from what the data show (held-out R^2, MLP regressors).

    Expression side (sum-of-variance weighted R^2 of x over all genes) predicted from (a) the
    true S, (b) the true render parameters, (c) the measured morphology features, (d) the raw
    crops (PCA, 64 comps); morphology side (mean over features of R^2 of the standardised
    measured features) predicted from the expression PCs (50). Regressions: RBF kernel ridge. Each should approach the truth (a
    held-out estimate is slightly below it from finite training data).

    Args:
      world: a (calibrated) :class:`data_builders.synthetic.World`.
      gen: its generator module (:mod:`data_builders.synthetic`).
      n_cells: cells simulated; the last ``test_fraction`` are held out.

    Returns:
      dict of held-out R^2 values: ``expr_from_state``, ``expr_from_params``, ``expr_from_features``,
      ``expr_from_pixels``, ``morph_from_expr`` and ``morph_from_expr_per_feature`` (F,),
      ``cell_type_accuracy_from_features`` (held-out logistic regression).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    syn = gen
    rng = syn._rng(seed, syn._CHECK)
    state = syn.sample_state(world, n_cells, rng)
    images, _, params, nuis = syn.sample_images(world, state, rng)
    x = syn.log_normalize(syn.sample_counts(world, state, rng)["counts"])
    feats = morph_features.measure_batch(images)
    n_train = int(round(n_cells * (1 - test_fraction)))
    k = world.config.n_cell_types
    s_in = np.concatenate(
        [np.eye(k)[state["cell_type"]], (state["response"] == syn.RESPONDER)[:, None], state["shared"]], axis=1
    )
    p_in = np.stack([params[n] for n in params] + [np.cos(2 * nuis["orientation"]), nuis["nucleoli_count"]], 1)
    flat = images.reshape(n_cells, -1).astype(np.float64)
    pix = PCA(64, random_state=seed).fit(flat[:n_train]).transform(flat)
    expr_pcs = PCA(50, random_state=seed).fit(x[:n_train]).transform(x)
    out: dict[str, Any] = {}
    for name, inp in (("state", s_in), ("params", p_in), ("features", feats), ("pixels", pix)):
        out[f"expr_from_{name}"] = _heldout_r2(inp, x, n_train, seed)[0]
    fz = (feats - feats[:n_train].mean(0)) / feats[:n_train].std(0)
    _, per_f = _heldout_r2(expr_pcs, fz, n_train, seed)
    out["morph_from_expr"] = float(per_f.mean())
    out["morph_from_expr_per_feature"] = dict(zip(morph_features.FEATURE_NAMES, map(float, per_f)))
    sc = StandardScaler().fit(feats[:n_train])
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(feats[:n_train]), state["cell_type"][:n_train])
    out["cell_type_accuracy_from_features"] = float(
        (clf.predict(sc.transform(feats[n_train:])) == state["cell_type"][n_train:]).mean()
    )
    return out
