"""Ground truth of the held-out family by nested Monte Carlo (the only code that reads internals).

Outer draws of S, inner draws of everything else (private factors, nuisance, count noise,
pixel noise). Per quantity y: Var(E[y|S]) is estimated without bias by the one-way ANOVA
estimator Var_outer(inner mean) - mean_outer(inner variance) / n_inner, Var(y) by the pooled
variance of all draws; standard errors by a grouped delete-one-group jackknife over outer draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import brentq

from cosmic_jax.data import morph_features
from data_builders.families import holdout as H

DEFINITIONS = (
    "S = (cell_type, continuous program z in R^3, response status). "
    "x_g = log1p(counts_g / total_counts * 1e4). "
    "expr_var_explained_by_morph = sum_g Var(E[x_g|S]) / sum_g Var(x_g); "
    "expr_var_explained_by_morph_per_gene[g] = Var(E[x_g|S]) / Var(x_g). "
    "f = cosmic_jax.data.morph_features.measure_batch of the crops with pixels outside the nucleus mask "
    "set to 0 (as `cosmic data paired --masks` imports them); "
    "morph_var_explained_by_expr_per_feature[k] = Var(E[f_k|S]) / Var(f_k), "
    "morph_var_explained_by_expr = their mean. "
    "Nested Monte Carlo: outer draws of S, inner draws of everything else; Var(E[.|S]) = "
    "Var(inner means) - mean(inner variances) / n_inner; Var(.) pooled over all draws; "
    "mc_standard_errors from a grouped delete-one-group jackknife over outer draws. "
    "The expression mixing weight is calibrated (bracketing root search on the same fixed-seed "
    "Monte Carlo) so that expr_var_explained_by_morph equals shared_fraction; the morphology "
    "truth is not calibrated. responder_genes / responder_features: |standardised mean difference| "
    ">= 0.2 between responders and resistant cells that share every other draw."
)
RESPONDER_MIN_EFFECT = 0.2


def _anova_parts(sums: dict[str, np.ndarray], n_outer: np.ndarray, n_inner: int):
    """Between (Var(E[y|S])) and total variance per dim from outer-draw sums."""
    n_total = n_outer * n_inner
    between = (sums["m2"] - sums["m"] ** 2 / n_outer) / (n_outer - 1) - sums["v"] / n_outer / n_inner
    total = (sums["x2"] - sums["x"] ** 2 / n_total) / (n_total - 1)
    return between, total


def anova_ratio(x: np.ndarray, groups: int) -> dict[str, Any]:
    """Explained fractions of y by S from nested draws.

    Args:
      x: (n_outer, n_inner, D) draws; x[o, i] shares S with x[o, j].
      groups: jackknife groups (outer draws are assigned round-robin).

    Returns:
      {"per_dim", "per_dim_se" (D,), "overall" (sum ratio), "overall_se", "mean" (mean ratio), "mean_se"}.
    """
    x = np.asarray(x, np.float64)
    n_o, n_i, d = x.shape
    x = x - x.reshape(-1, d).mean(axis=0)  # centred: the sum-of-squares formulas stay exact
    m, v = x.mean(axis=1), x.var(axis=1, ddof=1)
    parts = {"m": m, "m2": m**2, "v": v, "x": x.sum(axis=1), "x2": (x**2).sum(axis=1)}
    grp = np.arange(n_o) % groups
    per_group = {k: np.zeros((groups, d)) for k in parts}
    for k, val in parts.items():
        np.add.at(per_group[k], grp, val)
    count = np.bincount(grp, minlength=groups).astype(float)
    totals = {k: val.sum(axis=0) for k, val in per_group.items()}

    def stats(sums, n):
        b, t = _anova_parts(sums, n, n_i)
        r = b / t
        return r, b.sum() / t.sum(), r.mean()

    full = stats(totals, float(n_o))
    loo = [stats({k: totals[k] - per_group[k][j] for k in totals}, n_o - count[j]) for j in range(groups)]

    def jk_se(vals):
        vals = np.asarray(vals)
        return np.sqrt((groups - 1) / groups * ((vals - vals.mean(axis=0)) ** 2).sum(axis=0))

    return {"per_dim": full[0], "per_dim_se": jk_se([s[0] for s in loo]),
            "overall": float(full[1]), "overall_se": float(jk_se([s[1] for s in loo])),
            "mean": float(full[2]), "mean_se": float(jk_se([s[2] for s in loo]))}


def _nested_state(world: H.World, n_outer: int, n_inner: int, rng: np.random.Generator):
    state = H.sample_state(world, n_outer, rng)
    return H.take(state, np.repeat(np.arange(n_outer), n_inner))


def calibrate_mixing(world: H.World, target: float, seed: int) -> tuple[float, dict[str, Any]]:
    """Mixing weight w with true expr_var_explained_by_morph == target, and that truth.

    One fixed-seed Monte Carlo (``cfg.expr_mc``) is re-evaluated at each w (common random numbers),
    and w is found by Brent's bracketing search on [0, 1].

    Raises:
      ValueError: target outside the reachable range [truth(w=0), truth(w=1)] of this world.
    """
    n_o, n_i = world.cfg.expr_mc
    rng = H.rng_for(seed, H.CALIB)
    state = _nested_state(world, n_o, n_i, rng)
    noise = H.expression_noise(world, n_o * n_i, rng)
    draws = H.count_draws(world, (n_o * n_i, len(world.genes)), rng)

    def evaluate(w: float) -> dict[str, Any]:
        mu = H.expression_mean(world, state, noise, w)
        x = H.log_normalise(H.sample_counts(world, mu, draws, H.rng_for(seed, H.CALIB, 1)))
        return anova_ratio(x.reshape(n_o, n_i, -1), world.cfg.jackknife_groups)

    lo, hi = evaluate(0.0)["overall"], evaluate(1.0)["overall"]
    if not lo < target < hi:
        raise ValueError(f"shared_fraction {target} is outside the reachable range [{lo:.3f}, {hi:.3f}] "
                         f"of the holdout family (seed {seed}, {len(world.genes)} genes)")
    w = brentq(lambda w: evaluate(w)["overall"] - target, 0.0, 1.0, xtol=1e-5)
    out = evaluate(w)
    out["reachable"] = [lo, hi]
    return float(w), out


def _features(crops: np.ndarray) -> np.ndarray:
    return np.concatenate([morph_features.measure_batch(crops[s:s + 512]) for s in range(0, len(crops), 512)])


def morphology_truth(world: H.World, a: float, seed: int) -> dict[str, Any]:
    """Explained fractions of the package's crop features by S (``cfg.morph_mc`` nested draws)."""
    n_o, n_i = world.cfg.morph_mc
    rng = H.rng_for(seed, H.MORPH_MC)
    state = _nested_state(world, n_o, n_i, rng)
    images, masks = H.render_cells(world, state, H.morph_private(n_o * n_i, rng), a, rng)
    f = _features(H.masked_crops(images, masks))
    out = anova_ratio(f.reshape(n_o, n_i, -1), world.cfg.jackknife_groups)
    out["names"] = list(morph_features.FEATURE_NAMES)
    return out


def _effect(resp: np.ndarray, res: np.ndarray) -> np.ndarray:
    sd = np.sqrt((resp.var(axis=0) + res.var(axis=0)) / 2)
    return (resp.mean(axis=0) - res.mean(axis=0)) / np.maximum(sd, 1e-12)


def responder_truth(world: H.World, w: float, a: float, seed: int) -> dict[str, list[str]]:
    """Genes and features that responding moves (paired arms: responder vs resistant, same draws)."""
    n = world.cfg.response_mc
    rng = H.rng_for(seed, H.RESP_MC)
    state = H.sample_state(world, n, rng)
    noise = H.expression_noise(world, n, rng)
    draws = H.count_draws(world, (n, len(world.genes)), rng)
    private = H.morph_private(n, rng)
    x, f = {}, {}
    for code in (1, H.RESPONDER):
        arm = {**state, "response": np.full(n, code)}
        mu = H.expression_mean(world, arm, noise, w)
        x[code] = H.log_normalise(H.sample_counts(world, mu, draws, H.rng_for(seed, H.RESP_MC, 1)))
        images, masks = H.render_cells(world, arm, private, a, H.rng_for(seed, H.RESP_MC, 2))
        f[code] = _features(H.masked_crops(images, masks))
    d_gene, d_feat = _effect(x[H.RESPONDER], x[1]), _effect(f[H.RESPONDER], f[1])
    return {"responder_genes": [g for g, d in zip(world.genes, d_gene) if abs(d) >= RESPONDER_MIN_EFFECT],
            "responder_features": [k for k, d in zip(morph_features.FEATURE_NAMES, d_feat)
                                   if abs(d) >= RESPONDER_MIN_EFFECT]}


def truth_dict(world: H.World, seed: int, shared_fraction: float, a: float, w: float, expr: dict, morph: dict,
               resp: dict) -> dict[str, Any]:
    """truth.json content (JSON-able)."""
    names = morph["names"]
    return {
        "family": H.FAMILY,
        "seed": int(seed),
        "shared_fraction": float(shared_fraction),
        "expr_var_explained_by_morph": expr["overall"],
        "expr_var_explained_by_morph_per_gene": {g: float(r) for g, r in zip(world.genes, expr["per_dim"])},
        "morph_var_explained_by_expr": morph["mean"],
        "morph_var_explained_by_expr_per_feature": {k: float(r) for k, r in zip(names, morph["per_dim"])},
        **resp,
        "mc_standard_errors": {
            "expr_var_explained_by_morph": expr["overall_se"],
            "expr_var_explained_by_morph_per_gene_median": float(np.median(expr["per_dim_se"])),
            "morph_var_explained_by_expr": morph["mean_se"],
            "morph_var_explained_by_expr_per_feature": {k: float(s) for k, s in zip(names, morph["per_dim_se"])},
            "expr_mc": list(world.cfg.expr_mc),
            "morph_mc": list(world.cfg.morph_mc),
            "jackknife_groups": world.cfg.jackknife_groups,
        },
        "calibration": {"mixing_weight": w, "morph_shared": float(a), "reachable_expr_range": expr["reachable"]},
        "definitions": DEFINITIONS,
    }
