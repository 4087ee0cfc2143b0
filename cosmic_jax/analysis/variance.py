"""Law-of-total-variance decomposition: how much of one modality's variance the other reflects.

For a target t (expression embedding) and a condition c (morphology), ``Var(t) = Var(E[t|c]) +
E[Var(t|c)]``; the explained fraction is ``Var(E[t|c]) / Var(t)``. ``E[t|c]`` is estimated from a
conditional generative model by averaging S samples per cell (``mu_hat``, fitted on other cells:
cross-fitting, below). Two estimators of ``Cov(E[t|c])``:

* ``"cov"`` (default): ``Cov(mu_hat(c), t)`` over held-out cells. Write ``t = mu(c) + eps`` with
  ``E[eps|c] = 0``; ``mu_hat`` was fitted without this cell and its S draws are independent of
  ``eps``, so ``E[Cov(mu_hat, t)] = Cov(mu_hat, mu)``. Any error of ``mu_hat`` that is uncorrelated
  with ``mu`` (the estimation noise of a flexible fit on few cells, and the S-sample noise: no
  finite-S correction needed) averages out; a shrunk fit ``a mu`` gives ``a Var(mu)``.
* ``"var"``: ``Cov(mu_hat) - E[within-cell cov] / S`` (the finite-S correction: unbiased for any
  S >= 2). Unbiased only for an exact sampler: estimation noise N adds +N and shrinkage gives
  ``a^2 Var(mu)``. On the synthetic generator (notes/analysis.md) the cross-fitted flow's "var"
  estimate read 0.27 at truth 0.19 and 0.86-0.88 at 0.80 (morphology) from the noise term,
  where "cov" read 0.18 and 0.75-0.77.

The conditional model is never scored on the cells it was fitted on: cells are split into K folds,
``fit_fn(train_indices)`` returns a sampler fitted on the other folds, and that sampler is evaluated
on the held-out fold (cross-fitting). Confidence intervals come from a bootstrap over cells; with
``refit_decompose`` the whole cross-fit is repeated R times (new fold split and model seed each
time) and the repeats are combined by Rubin's rules, so the interval also carries the fit's own
variability (see ``combine_repeats``).

Sampler interface (shared with the joint model adapters and the baselines in generation.py)::

    sampler(cond: (n, Dc) array, num_samples: int, seed: int) -> (S, n, Dt) array
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np
from scipy import stats

# The two headline quantities (summary.json keys): expression variance explained by morphology and back.
HEADLINE = ("expr_var_explained_by_morph", "morph_var_explained_by_expr")
Sampler = Callable[[np.ndarray, int, int], np.ndarray]
FitFn = Callable[[np.ndarray], Sampler]


class AnalysisInputError(ValueError):
    """Bad input to an analysis; the message names the array / key / cell at fault."""


@dataclasses.dataclass
class Estimate:
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return {"estimate": float(self.estimate), "ci_low": float(self.ci_low), "ci_high": float(self.ci_high)}


@dataclasses.dataclass
class ConditionalMoments:
    """Per-cell moments of S samples from p(t | c), each cell scored by a model that never saw it.

    Attributes:
      mean: (N, D) sample mean of the S draws per cell.
      within_diag: (N, D) unbiased (ddof=1) within-cell sample variance per dimension.
      within_cov: (D, D) average over cells of the within-cell sample covariance.
      num_samples: S.
      fold: (N,) fold index each cell was held out in (-1 when the sampler was fitted elsewhere).
    """

    mean: np.ndarray
    within_diag: np.ndarray
    within_cov: np.ndarray
    num_samples: int
    fold: np.ndarray


def check_matrix(x, name: str, ndim: int = 2) -> np.ndarray:
    """Float64 array of the expected rank with no NaN/Inf; errors name the array and bad rows."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim:
        raise AnalysisInputError(f"{name}: expected a {ndim}-d array, got shape {x.shape}")
    bad = ~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1) if x.size else np.zeros(0, bool)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise AnalysisInputError(
            f"{name}: {bad.sum()} row(s) contain NaN/Inf (first rows: {rows[:5].tolist()})"
        )
    return x


def moments_from_samples(samples: np.ndarray, where: str = "sampler") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce (S, n, D) samples to per-cell mean (n, D), within variance (n, D), summed within cov (D, D)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3:
        raise AnalysisInputError(f"{where}: must return (S, n, D) samples, got shape {samples.shape}")
    if samples.shape[0] < 2:
        raise AnalysisInputError(f"{where}: need num_samples >= 2 for the finite-S bias correction")
    if not np.isfinite(samples).all():
        raise AnalysisInputError(f"{where}: returned NaN/Inf samples")
    s = samples.shape[0]
    mean = samples.mean(axis=0)
    dev = samples - mean[None]
    within_diag = (dev**2).sum(axis=0) / (s - 1)
    within_cov_sum = np.einsum("snd,sne->de", dev, dev) / (s - 1)
    return mean, within_diag, within_cov_sum


def sampler_moments(cond: np.ndarray, sampler: Sampler, num_samples: int, seed: int = 0,
                    batch_size: int = 4096, where: str = "sampler") -> ConditionalMoments:
    """Moments of ``sampler`` on every row of ``cond`` (a sampler fitted on other data).

    Args:
      cond: (N, Dc) conditioning values.
      sampler: ``(cond (n, Dc), S, seed) -> (S, n, Dt)``.
      num_samples: S >= 2.
      seed: base seed; each batch gets ``seed + batch_index``.
    Returns:
      ConditionalMoments with fold = -1.
    """
    cond = check_matrix(cond, "cond")
    means, diags, cov_sum = [], [], 0.0
    for b, start in enumerate(range(0, len(cond), batch_size)):
        chunk = cond[start : start + batch_size]
        samples = sampler(chunk, num_samples, seed + b)
        if np.shape(samples)[:2] != (num_samples, len(chunk)):
            raise AnalysisInputError(
                f"{where}: returned shape {np.shape(samples)}, expected ({num_samples}, {len(chunk)}, D)"
            )
        m, d, c = moments_from_samples(samples, where)
        means.append(m)
        diags.append(d)
        cov_sum = cov_sum + c
    n = len(cond)
    return ConditionalMoments(
        np.concatenate(means), np.concatenate(diags), cov_sum / n, num_samples, np.full(n, -1)
    )


def fold_indices(n: int, n_folds: int, seed: int = 0, strata: np.ndarray | None = None) -> np.ndarray:
    """(n,) fold id per cell, shuffled with ``seed``; stratified on ``strata`` when given."""
    if n_folds < 2:
        raise AnalysisInputError(f"n_folds={n_folds}: cross-fitting needs at least 2 folds")
    if n < 2 * n_folds:
        raise AnalysisInputError(f"{n} cells are too few for {n_folds}-fold cross-fitting")
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    offset = 0
    for idx in groups:
        idx = rng.permutation(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return fold


def subsample_train(train: np.ndarray, fraction: float, seed: int, fold: int) -> np.ndarray:
    """A fixed random ``fraction`` of a fold's training cells (sorted), the same for every caller
    with the same (seed, fold): both directions of one joint model then share one fit."""
    if not 0.0 < fraction <= 1.0:
        raise AnalysisInputError(f"train_fraction={fraction}: must be in (0, 1]")
    if fraction == 1.0:
        return train
    keep = max(2, int(round(fraction * len(train))))
    return np.sort(np.random.default_rng([seed, fold, 1]).choice(train, keep, replace=False))


def cross_fit_moments(cond: np.ndarray, fit_fn: FitFn, num_samples: int, n_folds: int = 5,
                      seed: int = 0, strata: np.ndarray | None = None,
                      train_fraction: float = 1.0) -> ConditionalMoments:
    """K-fold cross-fitted conditional moments: every cell is scored by a model fitted without it.

    Args:
      cond: (N, Dc) conditioning values (e.g. morphology embedding).
      fit_fn: ``fit_fn(train_indices (n_train,)) -> sampler``; must fit only on those cells.
      num_samples: S >= 2 samples per held-out cell.
      n_folds: K >= 2.
      seed: fold assignment and sampling seed.
      strata: optional (N,) labels to stratify the folds (e.g. cell type).
      train_fraction: fit each fold's model on this random share of its training cells (the
        learning-curve point of ``refit_decompose``'s extrapolation); 1 = all of them.
    Returns:
      ConditionalMoments over all N cells, with the fold each was held out in.
    """
    cond = check_matrix(cond, "cond")
    fold = fold_indices(len(cond), n_folds, seed, strata)
    parts = {}
    for k in range(n_folds):
        test = np.flatnonzero(fold == k)
        train = subsample_train(np.flatnonzero(fold != k), train_fraction, seed, k)
        sampler = fit_fn(train)
        parts[k] = (test, sampler_moments(cond[test], sampler, num_samples, seed=seed * 1000 + k * 97,
                                          where=f"sampler of fold {k}"))
    d = parts[0][1].mean.shape[1]
    mean = np.zeros((len(cond), d))
    diag = np.zeros((len(cond), d))
    cov = np.zeros((d, d))
    for test, mom in parts.values():
        mean[test], diag[test] = mom.mean, mom.within_diag
        cov += mom.within_cov * len(test)
    return ConditionalMoments(mean, diag, cov / len(cond), num_samples, fold)


@dataclasses.dataclass
class VarianceDecomposition:
    """Fraction of the target's variance reflected in the condition.

    Attributes:
      overall: explained fraction with bootstrap CI.
      per_dim: (D,) explained fraction per target dimension (embedding dim or feature).
      per_dim_ci: (2, D) bootstrap CI of per_dim.
      explained_cov: (D, D) estimate of Cov(E[t|c]) (symmetric; with "cov" not necessarily PSD).
      target_var: (D,) Var(t_k) over the scored cells.
      aggregate: "total" (sum of explained / sum of total variance) or "mean_ratio".
      overall_boot_var / per_dim_boot_var: variance of the bootstrap replicates (NaN without them).
      overall_boot / per_dim_boot: the replicates themselves, (B,) and (B, D) (B = 0 without them);
        ``decompose`` calls with the same ``seed`` and cell count draw the same resamples.
    """

    overall: Estimate
    per_dim: np.ndarray
    per_dim_ci: np.ndarray
    explained_cov: np.ndarray
    target_var: np.ndarray
    aggregate: str
    overall_boot_var: float
    per_dim_boot_var: np.ndarray
    overall_boot: np.ndarray
    per_dim_boot: np.ndarray


def _weighted_cov(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-replicate weighted unbiased covariance of matching columns, (B, D); w rows sum to n.
    ``x is y`` gives the variance."""
    n = w.shape[1]
    return (w @ (x * y) / n - (w @ x / n) * (w @ y / n)) * n / (n - 1)


def _from_replicates(point: float, per_dim: np.ndarray, explained_cov: np.ndarray, target_var: np.ndarray,
                     aggregate: str, overall_b: np.ndarray, per_b: np.ndarray, ci: float) -> VarianceDecomposition:
    """A decomposition with its intervals from bootstrap replicates (B,) / (B, D); B = 0: no CI."""
    d = len(per_dim)
    if len(overall_b) == 0:
        return VarianceDecomposition(Estimate(point, np.nan, np.nan), per_dim, np.full((2, d), np.nan),
                                     explained_cov, target_var, aggregate, np.nan, np.full(d, np.nan),
                                     np.zeros(0), np.zeros((0, d)))
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    # the percentile interval of a fraction, clipped to the [0, 1] a fraction can take (as combine_repeats)
    return VarianceDecomposition(Estimate(point, *np.clip(np.quantile(overall_b, q), 0.0, 1.0)), per_dim,
                                 np.clip(np.quantile(per_b, q, axis=0), 0.0, 1.0), explained_cov, target_var, aggregate,
                                 float(np.var(overall_b, ddof=1)), np.var(per_b, axis=0, ddof=1), overall_b, per_b)


def decompose(target: np.ndarray, moments: ConditionalMoments, metric: np.ndarray | None = None,
              resid_sq: np.ndarray | None = None,
              aggregate: Literal["total", "mean_ratio"] = "total",
              n_boot: int = 200, ci: float = 0.95, seed: int = 0,
              estimator: Literal["cov", "var"] = "cov") -> VarianceDecomposition:
    """Explained-variance fractions from cross-fitted moments.

    Args:
      target: (N, D) the real target values of the scored cells (same rows as ``moments``).
      moments: cross-fitted conditional moments of the target given the condition.
      metric: optional (D, D) PSD matrix G; the overall fraction becomes tr(C G) / tr(Cov(t) G)
        (G = L L^T with gene read-out loadings L (D, G) gives sums over genes).
      resid_sq: optional (N,) per-cell squared norm of the target part outside the embedding (e.g.
        gene-space residual after the PCA read-out); it counts as unexplained variance.
      aggregate: "total" = sum_k explained / sum_k total; "mean_ratio" = mean_k explained_k / var_k
        (the morphology-feature definition).
      n_boot: bootstrap replicates over cells (0 disables the CI).
      ci: confidence level.
      seed: bootstrap seed.
      estimator: "cov" = Cov(held-out S-sample mean, target), robust to estimation noise of the
        fitted sampler; "var" = finite-S-corrected Cov(S-sample mean), exact only for an exact
        sampler (see the module docstring).
    Returns:
      VarianceDecomposition.
    """
    t = check_matrix(target, "target")
    m = moments
    n, d = t.shape
    if m.mean.shape != (n, d):
        raise AnalysisInputError(f"moments cover {m.mean.shape} but target is {t.shape}")
    if resid_sq is not None:
        resid_sq = check_matrix(np.asarray(resid_sq)[:, None], "resid_sq")[:, 0]
        if len(resid_sq) != n:
            raise AnalysisInputError(f"resid_sq has {len(resid_sq)} rows, target has {n}")
    if aggregate not in ("total", "mean_ratio"):
        raise AnalysisInputError(f"aggregate={aggregate!r}: use 'total' or 'mean_ratio'")
    if estimator not in ("cov", "var"):
        raise AnalysisInputError(f"estimator={estimator!r}: use 'cov' or 'var'")
    s = m.num_samples
    t_cov = np.cov(t, rowvar=False).reshape(d, d)
    if estimator == "cov":
        cross = np.cov(m.mean, t, rowvar=False)[:d, d:]
        explained_cov = 0.5 * (cross + cross.T)  # symmetric part: x^T C x is Cov(x.mu_hat, x.t)
    else:
        explained_cov = np.cov(m.mean, rowvar=False).reshape(d, d) - m.within_cov / s
    target_var = t.var(axis=0, ddof=1)
    if np.any(target_var <= 0):
        raise AnalysisInputError(f"target dims {np.flatnonzero(target_var <= 0)[:5].tolist()} have zero variance")
    per_dim = np.diag(explained_cov) / target_var

    mean_resid = 0.0 if resid_sq is None else resid_sq.sum() / (n - 1)  # ddof=1 like the variances
    g = np.eye(d) if metric is None else np.asarray(metric, np.float64)
    if g.shape != (d, d):
        raise AnalysisInputError(f"metric has shape {g.shape}, expected ({d}, {d})")
    if aggregate == "mean_ratio":
        point = per_dim.mean()
    else:
        point = np.sum(explained_cov * g) / (np.sum(t_cov * g) + mean_resid)

    if n_boot <= 0:
        return _from_replicates(point, per_dim, explained_cov, target_var, aggregate, np.zeros(0), np.zeros((0, d)), ci)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, N) counts
    var_t = _weighted_cov(w, t, t)
    if estimator == "cov":
        expl_b = _weighted_cov(w, m.mean, t)  # (B, D)
    else:
        expl_b = _weighted_cov(w, m.mean, m.mean) - (w @ m.within_diag / n) / s
    per_b = expl_b / var_t  # (B, D)
    resid_b = 0.0 if resid_sq is None else w @ resid_sq / (n - 1)
    if aggregate == "mean_ratio":
        overall_b = per_b.mean(axis=1)
    elif metric is None:
        overall_b = expl_b.sum(1) / (var_t.sum(1) + resid_b)
    else:
        # tr(Cov_w(x, y) G) = mean_w(x^T G y) - mu_w(x)^T G mu_w(y): per-cell bilinear forms keep
        # this O(B N + B D^2). For "var" the within-cell term is held at its all-cell value (it is
        # divided by S, so its resampling noise is second order).
        def quad_cov(x, y):
            q = np.einsum("nd,de,ne->n", x, g, y)
            mx, my = w @ x / n, w @ y / n
            return (w @ q / n - np.einsum("bd,de,be->b", mx, g, my)) * n / (n - 1)

        if estimator == "cov":
            num_b = quad_cov(m.mean, t)
        else:
            num_b = quad_cov(m.mean, m.mean) - np.sum(m.within_cov * g) / s
        overall_b = num_b / (quad_cov(t, t) + resid_b)
    return _from_replicates(point, per_dim, explained_cov, target_var, aggregate, overall_b, per_b, ci)


def extrapolate_to_full_data(full: VarianceDecomposition, part: VarianceDecomposition, fraction: float,
                             ci: float = 0.95) -> VarianceDecomposition:
    """One Richardson step along the learning curve: the estimate a fit on unlimited cells would give.

    A model fitted on m cells recovers E[t|c] only up to an estimation error, and with the "cov"
    estimator what survives of it is shrinkage (a mu, a < 1) toward the mean: the estimate is
    ``V(m) ~ V_inf (1 - c / m)``, low by a term that falls with the training size (the rate of a
    regular parametric fit; a slower, nonparametric rate leaves part of the bias, so the result
    stays on the low side). With ``full`` fitted on m cells per fold and ``part`` on ``fraction``
    x m (same folds, same bootstrap resamples), ``V_inf = V(m) + (V(m) - V(f m)) f / (1 - f)``;
    the bootstrap replicates are combined the same way, so the interval carries the extra variance.
    The part the representation cannot see is not recovered: the result is still a lower bound.
    """
    if not 0.0 < fraction < 1.0:
        raise AnalysisInputError(f"extrapolation fraction={fraction}: must be in (0, 1)")
    if full.overall_boot.shape != part.overall_boot.shape or full.aggregate != part.aggregate:
        raise AnalysisInputError("extrapolation needs two decompositions with the same bootstrap and aggregate")
    w = fraction / (1.0 - fraction)

    def step(a, b):
        return a + w * (a - b)

    return _from_replicates(step(full.overall.estimate, part.overall.estimate), step(full.per_dim, part.per_dim),
                            step(full.explained_cov, part.explained_cov), full.target_var, full.aggregate,
                            step(full.overall_boot, part.overall_boot), step(full.per_dim_boot, part.per_dim_boot), ci)


def per_readout_explained(explained_cov: np.ndarray, loadings: np.ndarray, readout_var: np.ndarray) -> np.ndarray:
    """Explained fraction per read-out variable (gene / feature) through linear loadings.

    With ``x_g ~ mu_g + L[:, g]^T t`` the explained variance of x_g is ``L_g^T C L_g``.

    Args:
      explained_cov: (D, D) Cov(E[t|c]).
      loadings: (D, G) read-out loadings.
      readout_var: (G,) total variance of each read-out variable.
    Returns:
      (G,) explained fraction per read-out variable.
    """
    num = np.einsum("dg,de,eg->g", loadings, explained_cov, loadings)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(readout_var > 0, num / np.maximum(readout_var, 1e-300), np.nan)


# ----------------------------------------------------------------------------- refits


@dataclasses.dataclass
class RefitEstimate(Estimate):
    """An estimate averaged over R cross-fit repeats, with an interval that includes refit variability.

    Attributes (beyond Estimate):
      repeats: R.
      within_var: mean over repeats of the bootstrap variance (cells resampled, fits held fixed).
      between_var: variance of the R repeat estimates (ddof=1; 0 when R = 1).
      total_var: within_var + (1 + 1/R) between_var.
      df: degrees of freedom of the t reference (inf when between_var = 0).
      repeat_estimates: the R per-repeat estimates.
      learning_curve: with extrapolation, the mean over repeats of the cross-fitted estimate at
        each training share, {fraction: estimate} (1.0 = the plain cross-fit); empty without.
      slow_rate: with a rate band, ``{"rate": a, "estimate": the extrapolation at rate a}`` (the
        CI reaches it, see ``refit_decompose``); empty without.
    """

    repeats: int = 1
    within_var: float = np.nan
    between_var: float = 0.0
    total_var: float = np.nan
    df: float = np.inf
    repeat_estimates: tuple[float, ...] = ()
    learning_curve: dict[float, float] = dataclasses.field(default_factory=dict)
    slow_rate: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {**super().to_dict(), "repeats": int(self.repeats), "within_var": float(self.within_var),
               "between_var": float(self.between_var), "total_var": float(self.total_var), "df": float(self.df),
               "repeat_estimates": [float(x) for x in self.repeat_estimates]}
        if self.learning_curve:
            out["learning_curve"] = {f"{k:g}": float(v) for k, v in self.learning_curve.items()}
        if self.slow_rate:
            out["slow_rate"] = {k: float(v) for k, v in self.slow_rate.items()}
        return out


def combine_repeats(estimates: np.ndarray, boot_vars: np.ndarray, ci: float = 0.95,
                    bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, np.ndarray]:
    """Rubin's rules over R repeats of a cross-fitted estimate (elementwise over trailing dims).

    Each repeat r re-fits every fold model (new fold split, new model seed) and gives an estimate
    q_r with a bootstrap variance u_r over cells (fits held fixed). The bootstrap cannot see how
    much q depends on the arbitrary choices of the fit (split, initialisation, SGD order, sampling
    noise) nor on which cells trained the models; the spread of q_r across refits is the handle on
    both. As for multiple imputation, with W = mean(u_r) and B = var(q_r):

      estimate = mean(q_r),  T = W + (1 + 1/R) B,
      CI = estimate +- t_{df} sqrt(T),  df = (R - 1) (1 + W / ((1 + 1/R) B))^2,

    the t reference widening the interval when B, estimated from few repeats, dominates. A fraction
    of variance lies in [0, 1]: the estimate and both ends are clipped to ``bounds``, which keeps
    the coverage (the truth is inside them) and only removes values no fraction can take.

    Args:
      estimates: (R, ...) per-repeat estimates.
      boot_vars: (R, ...) per-repeat bootstrap variances.
      ci: confidence level.
      bounds: (low, high) the quantity can take; None: unbounded.
    Returns:
      dict of arrays (shape ...): estimate, ci_low, ci_high, within_var, between_var, total_var, df.
    """
    q = np.asarray(estimates, np.float64)
    u = np.asarray(boot_vars, np.float64)
    if q.shape != u.shape or q.ndim < 1 or len(q) < 1:
        raise AnalysisInputError(f"combine_repeats: estimates {q.shape} and boot_vars {u.shape} must match, R >= 1")
    r = len(q)
    point = q.mean(axis=0)
    within = u.mean(axis=0)
    between = q.var(axis=0, ddof=1) if r > 1 else np.zeros_like(point)
    inflated = (1.0 + 1.0 / r) * between
    total = within + inflated
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(inflated > 0, (r - 1) * (1.0 + within / np.where(inflated > 0, inflated, 1.0)) ** 2, np.inf)
    half = stats.t.ppf(0.5 + ci / 2, df) * np.sqrt(total)
    low, high = point - half, point + half
    if bounds is not None:
        point, low, high = (np.clip(v, *bounds) for v in (point, low, high))
    return {"estimate": point, "ci_low": low, "ci_high": high, "within_var": within,
            "between_var": between, "total_var": total, "df": df}


@dataclasses.dataclass
class RefitDecomposition:
    """``decompose`` over R cross-fit repeats, combined by :func:`combine_repeats`.

    Attributes:
      overall: combined overall fraction.
      per_dim: (D,) mean over repeats; per_dim_ci: (2, D) combined CI.
      explained_cov: (D, D) mean over repeats.
      repeats: the R per-repeat decompositions; moments: their cross-fitted moments.
    """

    overall: RefitEstimate
    per_dim: np.ndarray
    per_dim_ci: np.ndarray
    explained_cov: np.ndarray
    repeats: list[VarianceDecomposition]
    moments: list[ConditionalMoments]


def _combine(decs: list[VarianceDecomposition], ci: float) -> tuple[dict, dict]:
    """Rubin's rules over repeats: (overall, per_dim) as :func:`combine_repeats` gives them."""
    return (combine_repeats([d.overall.estimate for d in decs], [d.overall_boot_var for d in decs], ci),
            combine_repeats(np.stack([d.per_dim for d in decs]), np.stack([d.per_dim_boot_var for d in decs]), ci))


def refit_decompose(target: np.ndarray, cond: np.ndarray, fit_fn_for: Callable[[int], FitFn], repeats: int,
                    num_samples: int, n_folds: int = 5, seed: int = 0, strata: np.ndarray | None = None,
                    ci: float = 0.95, extrapolate_fraction: float = 0.0, band_rate: float = 1.0,
                    **decompose_kw) -> RefitDecomposition:
    """Cross-fit and decompose ``repeats`` times, each with a new fold split and model, and combine.

    Args:
      target: (N, D) target values; cond: (N, Dc) condition (as in ``cross_fit_moments``).
      fit_fn_for: ``fit_fn_for(r) -> fit_fn`` for repeat r (r seeds the model it fits).
      repeats: R >= 1. Repeat r uses fold / sampling / bootstrap seed ``seed + r``.
      num_samples, n_folds, strata: as in ``cross_fit_moments``.
      ci: confidence level.
      extrapolate_fraction: f in (0, 1) also cross-fits every repeat with each fold's model fitted on
        a share f of its training cells and extrapolates the pair to unlimited training data
        (``extrapolate_to_full_data``; twice the fits); 0 = the plain cross-fit.
      band_rate: a < 1, with extrapolation: how fast the fit's learning curve is, V(m) ~ V_inf -
        c m^-rate, is not known (1 for a parametric fit, slower for a flexible one on few cells);
        the estimate assumes 1, and the interval reaches as far as the extrapolation at rate a on
        the side where that one lies: [low + min(g, 0), high + max(g, 0)], g = mean over repeats of
        (extrapolation at a - at 1), per gene / target too. 1 = rate 1 only.
      **decompose_kw: metric, resid_sq, aggregate, n_boot, estimator (see ``decompose``).
    Returns:
      RefitDecomposition (``moments``: those of the plain cross-fits).
    """
    if repeats < 1:
        raise AnalysisInputError(f"repeats={repeats}: need at least one cross-fit")
    if not 0.0 <= extrapolate_fraction < 1.0:
        raise AnalysisInputError(f"extrapolate_fraction={extrapolate_fraction}: must be in [0, 1)")
    if not 0.0 < band_rate <= 1.0:
        raise AnalysisInputError(f"band_rate={band_rate}: must be in (0, 1]")
    decs, moms, curve = [], [], {1.0: [], extrapolate_fraction: []}
    # at rate a the step is (q(1) - q(f)) f^a / (1 - f^a): this much more than the rate-1 step
    extra_step = (extrapolate_fraction**band_rate / (1 - extrapolate_fraction**band_rate)
                  - extrapolate_fraction / (1 - extrapolate_fraction)) if extrapolate_fraction > 0 else 0.0
    gaps_overall, gaps_dim = [], []
    for r in range(repeats):
        mom = cross_fit_moments(cond, fit_fn_for(r), num_samples, n_folds, seed + r, strata)
        dec = decompose(target, mom, ci=ci, seed=seed + r, **decompose_kw)
        if extrapolate_fraction > 0:
            part = decompose(target, cross_fit_moments(cond, fit_fn_for(r), num_samples, n_folds, seed + r, strata,
                                                       train_fraction=extrapolate_fraction),
                             ci=ci, seed=seed + r, **decompose_kw)
            curve[1.0].append(dec.overall.estimate)
            curve[extrapolate_fraction].append(part.overall.estimate)
            gaps_overall.append(extra_step * (dec.overall.estimate - part.overall.estimate))
            gaps_dim.append(extra_step * (dec.per_dim - part.per_dim))
            dec = extrapolate_to_full_data(dec, part, extrapolate_fraction, ci)
        decs.append(dec)
        moms.append(mom)
    overall, per_dim = _combine(decs, ci)
    slow_rate = {}
    if band_rate < 1.0 and gaps_overall:
        # The rate is a modelling choice, not a sampling error: the interval moves by the gap between
        # the two extrapolations on the side it points to (as a bound on the bias of rate 1), with
        # the rate-1 interval's own width (the slow one's 2.4x step would mostly widen it by noise).
        gaps = (np.mean(gaps_overall), np.mean(gaps_dim, axis=0))
        for combined, gap in zip((overall, per_dim), gaps):
            combined["ci_low"] = np.clip(combined["ci_low"] + np.minimum(gap, 0.0), 0.0, 1.0)
            combined["ci_high"] = np.clip(combined["ci_high"] + np.maximum(gap, 0.0), 0.0, 1.0)
        slow_rate = {"rate": float(band_rate),
                     "estimate": float(np.mean([d.overall.estimate for d in decs]) + gaps[0])}
    est = RefitEstimate(*(float(overall[k]) for k in ("estimate", "ci_low", "ci_high")), repeats=repeats,
                        within_var=float(overall["within_var"]), between_var=float(overall["between_var"]),
                        total_var=float(overall["total_var"]), df=float(overall["df"]),
                        repeat_estimates=tuple(float(d.overall.estimate) for d in decs),
                        learning_curve={k: float(np.mean(v)) for k, v in curve.items() if v}, slow_rate=slow_rate)
    return RefitDecomposition(est, per_dim["estimate"], np.stack([per_dim["ci_low"], per_dim["ci_high"]]),
                              np.mean([d.explained_cov for d in decs], axis=0), decs, moms)
