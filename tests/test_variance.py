"""Variance decomposition on Gaussian toys with known answers (exact conditional samplers)."""

import numpy as np
import pytest
from scipy import stats

from cosmic_jax.analysis import variance as V
from cosmic_jax.analysis.generation import baseline_fit_fn
from cosmic_jax.testing.toys import GaussianToy, NoisyShrunkSampler


@pytest.mark.parametrize("frac", [0.2, 0.7])
def test_exact_sampler_recovers_truth_and_ci_covers(frac):
    # (Coverage over 60 replicates measured at 97-98%, see notes/analysis.md; one fixed draw here.)
    toy = GaussianToy(frac, seed=11)
    m, e = toy.draw(3000)
    assert abs(toy.truth - frac) < 1e-9
    mom = V.cross_fit_moments(m, lambda train: toy.sampler, num_samples=10, n_folds=2, seed=0)
    dec = V.decompose(e, mom, n_boot=300, seed=0)
    assert abs(dec.overall.estimate - frac) < 0.03
    assert dec.overall.ci_low < frac < dec.overall.ci_high
    assert dec.overall.ci_high - dec.overall.ci_low < 0.1
    # Per-dimension ranking follows the truth.
    from scipy.stats import spearmanr

    assert spearmanr(dec.per_dim, toy.truth_dim).statistic > 0.9
    np.testing.assert_allclose(dec.per_dim, toy.truth_dim, atol=0.06)


def test_finite_sample_bias_correction():
    toy = GaussianToy(0.3, seed=2)
    m, e = toy.draw(4000)
    est = {}
    for s in (2, 200):
        mom = V.sampler_moments(m, toy.sampler, num_samples=s, seed=s)
        est[s] = V.decompose(e, mom, n_boot=0, estimator="var").overall.estimate
        # The cov estimator needs no correction: the S-sample noise is independent of e.
        assert abs(V.decompose(e, mom, n_boot=0).overall.estimate - 0.3) < 0.03
        # Without the correction S=2 would add E[Var(e|m)]/2 = 0.35 of the total variance.
        naive = np.trace(np.cov(mom.mean, rowvar=False)) / np.trace(np.cov(e, rowvar=False))
        if s == 2:
            assert naive - 0.3 > 0.25
    assert abs(est[2] - est[200]) < 0.04
    assert abs(est[200] - 0.3) < 0.03


def test_cross_fitted_ridge_baseline_recovers_truth_and_never_scores_train_cells():
    toy = GaussianToy(0.5, seed=3)
    m, e = toy.draw(2000)
    seen = []
    ridge = baseline_fit_fn("ridge", m, e)

    def fit_fn(train):
        seen.append(set(train.tolist()))
        return ridge(train)

    mom = V.cross_fit_moments(m, fit_fn, num_samples=4, n_folds=4, seed=0)
    for k, train in enumerate(seen):
        assert not train & set(np.flatnonzero(mom.fold == k).tolist())
    assert abs(V.decompose(e, mom, n_boot=0).overall.estimate - 0.5) < 0.04


def test_metric_and_residual_give_gene_space_fraction():
    # Target = orthonormal-PCA scores of a gene matrix; gene-space truth via loadings + residual.
    toy = GaussianToy(0.6, seed=4)
    m, e = toy.draw(3000)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(20, 8)))  # (G, D) orthonormal gene loadings
    extra = rng.normal(size=(3000, 20)) * 0.5
    extra -= extra @ q @ q.T  # noise orthogonal to the embedding: unexplained gene variance
    x = e @ q.T + extra
    mom = V.sampler_moments(m, toy.sampler, num_samples=20, seed=0)
    L = q.T  # (D, G)
    resid = (extra**2).sum(1)
    dec = V.decompose(e, mom, metric=L @ L.T, resid_sq=resid, n_boot=100)
    truth = np.trace(toy.s_em @ toy.reg) / np.cov(x, rowvar=False).trace()
    assert abs(dec.overall.estimate - truth) < 0.03
    assert dec.overall.ci_low < truth < dec.overall.ci_high
    per_gene = V.per_readout_explained(dec.explained_cov, L, x.var(0, ddof=1))
    truth_gene = np.diag(q @ (toy.s_em @ toy.reg) @ q.T) / x.var(0, ddof=1)
    np.testing.assert_allclose(per_gene, truth_gene, atol=0.05)


def test_mean_ratio_aggregate():
    toy = GaussianToy(0.4, seed=5)
    m, e = toy.draw(3000)
    mom = V.sampler_moments(m, toy.sampler, num_samples=10, seed=0)
    dec = V.decompose(e, mom, aggregate="mean_ratio", n_boot=50)
    assert abs(dec.overall.estimate - toy.truth_dim.mean()) < 0.03


def test_bad_inputs_raise_clear_errors():
    toy = GaussianToy(0.4, seed=6)
    m, e = toy.draw(100)
    m_bad = m.copy()
    m_bad[7, 0] = np.nan
    with pytest.raises(V.AnalysisInputError, match=r"cond: 1 row\(s\) contain NaN.*\[7\]"):
        V.cross_fit_moments(m_bad, lambda tr: toy.sampler, 4)
    with pytest.raises(V.AnalysisInputError, match="at least 2 folds"):
        V.cross_fit_moments(m, lambda tr: toy.sampler, 4, n_folds=1)
    with pytest.raises(V.AnalysisInputError, match="num_samples >= 2"):
        V.sampler_moments(m, toy.sampler, 1)
    with pytest.raises(V.AnalysisInputError, match="sampler of fold 0: returned shape"):
        V.cross_fit_moments(m, lambda tr: (lambda c, s, seed: np.zeros((s, 3, 2))), 4)
    mom = V.sampler_moments(m, toy.sampler, 4)
    with pytest.raises(V.AnalysisInputError, match="moments cover"):
        V.decompose(e[:50], mom)
    with pytest.raises(V.AnalysisInputError, match="estimator='nope'"):
        V.decompose(e, mom, estimator="nope")


@pytest.mark.parametrize("frac", [0.2, 0.7])
def test_cov_estimator_ignores_estimation_noise_var_estimator_does_not(frac):
    toy = GaussianToy(frac, seed=7)
    m, e = toy.draw(4000)
    noise_sd = np.sqrt(0.1 * np.trace(toy.s_ee) / e.shape[1])  # error variance = 10% of the total
    mom = V.sampler_moments(m, NoisyShrunkSampler(toy, 1.0, noise_sd, 0), num_samples=4, seed=1)
    cov = V.decompose(e, mom, n_boot=100, estimator="cov").overall
    var = V.decompose(e, mom, n_boot=0, estimator="var").overall.estimate
    assert abs(cov.estimate - frac) < 0.03 and cov.ci_low < frac < cov.ci_high
    assert var - frac > 0.07  # the noise's 0.10 of the total counts as "explained"
    # A shrunk mean a*mu: cov reads a*frac (first order), var reads a^2*frac.
    mom = V.sampler_moments(m, NoisyShrunkSampler(toy, 0.8, 0.0, 0), num_samples=4, seed=1)
    assert abs(V.decompose(e, mom, n_boot=0).overall.estimate - 0.8 * frac) < 0.03
    assert abs(V.decompose(e, mom, n_boot=0, estimator="var").overall.estimate - 0.64 * frac) < 0.03


def test_cov_estimator_metric_bootstrap_and_per_dim_match_direct_formulas():
    toy = GaussianToy(0.5, seed=8)
    m, e = toy.draw(1500)
    mom = V.sampler_moments(m, toy.sampler, num_samples=3, seed=0)
    g = np.diag(np.linspace(0.5, 2.0, e.shape[1]))
    resid = np.full(len(e), 0.3)
    dec = V.decompose(e, mom, metric=g, resid_sq=resid, n_boot=200, estimator="cov")
    c = np.cov(mom.mean, e, rowvar=False)[:8, 8:]
    want = np.trace(c @ g) / (np.trace(np.cov(e, rowvar=False) @ g) + resid.sum() / (len(e) - 1))
    assert dec.overall.estimate == pytest.approx(want, rel=1e-10)
    np.testing.assert_allclose(dec.per_dim, np.diag(c) / e.var(0, ddof=1), rtol=1e-10)
    assert dec.overall.ci_low < want < dec.overall.ci_high
    assert np.all(dec.per_dim_ci[0] < dec.per_dim) and np.all(dec.per_dim < dec.per_dim_ci[1])


def test_combine_repeats_is_rubins_rule():
    q, u = np.array([0.40, 0.44, 0.42]), np.array([1e-4, 2e-4, 1.5e-4])
    c = V.combine_repeats(q, u)
    w, b = 1.5e-4, np.var(q, ddof=1)
    total = w + (1 + 1 / 3) * b
    df = 2 * (1 + w / ((4 / 3) * b)) ** 2
    half = stats.t.ppf(0.975, df) * np.sqrt(total)
    assert c["estimate"] == pytest.approx(0.42)
    assert c["total_var"] == pytest.approx(total) and c["total_var"] > c["within_var"] == pytest.approx(w)
    assert c["df"] == pytest.approx(df)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((0.42 - half, 0.42 + half))
    one = V.combine_repeats(q[:1], u[:1])  # R = 1: the bootstrap alone, normal reference
    assert one["between_var"] == 0 and np.isinf(one["df"])
    assert one["ci_high"] - 0.40 == pytest.approx(1.959964 * 1e-2, rel=1e-5)
    with pytest.raises(V.AnalysisInputError, match="must match"):
        V.combine_repeats(q, u[:2])


def test_combined_interval_stays_inside_zero_one():
    """Two re-fits far apart give a wide t interval; a fraction's interval ends at 0 and 1, unbounded
    quantities keep theirs."""
    q, u = np.array([[0.90, 0.05], [0.99, 0.12]]), np.full((2, 2), 1e-4)
    c = V.combine_repeats(q, u)
    raw = V.combine_repeats(q, u, bounds=None)
    assert raw["ci_high"][0] > 1.0 and raw["ci_low"][1] < 0.0
    assert c["ci_high"][0] == 1.0 and c["ci_low"][1] == 0.0
    np.testing.assert_allclose([c["ci_low"][0], c["ci_high"][1]], [raw["ci_low"][0], raw["ci_high"][1]])
    np.testing.assert_allclose(c["estimate"], raw["estimate"])


def _refit_noisy_fit_fn(toy, sd: float, seed: int):
    """fit_fn_for(r): every fold fit draws its own shrinkage a ~ N(1, sd) of the exact conditional
    mean, as a flexible model fitted from a random start does (the cov estimator reads a x truth)."""

    def fit_fn_for(r):
        rng = np.random.default_rng([seed, r])
        return lambda train: NoisyShrunkSampler(toy, 1.0 + sd * rng.standard_normal(), 0.0, 0)

    return fit_fn_for


def test_refit_decompose_combines_repeats_by_formula():
    toy = GaussianToy(0.5, seed=9)
    m, e = toy.draw(800)
    dec = V.refit_decompose(e, m, _refit_noisy_fit_fn(toy, 0.1, 0), repeats=4, num_samples=4, n_folds=2, n_boot=100)
    reps = np.array([d.overall.estimate for d in dec.repeats])
    o = dec.overall
    assert o.repeats == 4 and o.estimate == pytest.approx(reps.mean()) and list(o.repeat_estimates) == list(reps)
    assert o.between_var == pytest.approx(reps.var(ddof=1))
    assert o.within_var == pytest.approx(np.mean([d.overall_boot_var for d in dec.repeats]))
    assert o.total_var == pytest.approx(o.within_var + 1.25 * o.between_var) and o.total_var > o.within_var
    assert len({tuple(mom.fold) for mom in dec.moments}) == 4  # a new fold split per repeat
    np.testing.assert_allclose(dec.per_dim, np.mean([d.per_dim for d in dec.repeats], axis=0))
    assert np.all(dec.per_dim_ci[0] < dec.per_dim) and np.all(dec.per_dim < dec.per_dim_ci[1])
    assert set(o.to_dict()) >= {"estimate", "ci_low", "ci_high", "repeats", "within_var", "between_var"}


def test_refit_ci_covers_when_fit_variability_dominates_bootstrap_ci_does_not():
    """Each fold model's conditional mean is off by a random factor (sd 0.2): a bootstrap over cells
    of one cross-fit cannot see that; the re-fit CI (R = 5) must."""
    old, new, seeds = 0, 0, range(12)
    for s in seeds:
        toy = GaussianToy(0.5, seed=100 + s)
        m, e = toy.draw(1000)
        fit_fn_for = _refit_noisy_fit_fn(toy, 0.2, s)
        one = V.decompose(e, V.cross_fit_moments(m, fit_fn_for(0), 4, 2, seed=s), n_boot=100, seed=s).overall
        old += one.ci_low <= toy.truth <= one.ci_high
        ref = V.refit_decompose(e, m, fit_fn_for, repeats=5, num_samples=4, n_folds=2, seed=s, n_boot=100).overall
        new += ref.ci_low <= toy.truth <= ref.ci_high
    assert new >= 0.9 * len(seeds), (new, old)
    assert old <= 0.7 * len(seeds), (new, old)


def _fixed_penalty_ridge_fit_fn(m, e, lam: float):
    """Ridge with a fixed penalty: its conditional mean is shrunk by ~n s / (n s + lam) per direction,
    a bias that falls as 1 / training size (the learning curve the extrapolation assumes)."""

    def fit(train):
        mx, ex = m[train].mean(0), e[train].mean(0)
        a, b = m[train] - mx, e[train] - ex
        beta = np.linalg.solve(a.T @ a + lam * np.eye(m.shape[1]), a.T @ b)
        return lambda c, s, seed: (ex + (c - mx) @ beta)[None] + \
            0.01 * np.random.default_rng(seed).standard_normal((s, len(c), e.shape[1]))

    return fit


def test_learning_curve_extrapolation_removes_shrinkage_bias_and_keeps_coverage():
    plain, ext, covered = [], [], {"plain": 0, "ext": 0}
    seeds = range(8)
    for s in seeds:
        toy = GaussianToy(0.5, seed=50 + s, dm=12)
        m, e = toy.draw(1200)
        fit_fn_for = lambda r: _fixed_penalty_ridge_fit_fn(m, e, 300.0)  # noqa: E731
        p = V.refit_decompose(e, m, fit_fn_for, 2, 2, 3, s, n_boot=200).overall
        x = V.refit_decompose(e, m, fit_fn_for, 2, 2, 3, s, n_boot=200, extrapolate_fraction=0.5).overall
        assert x.learning_curve[1.0] == pytest.approx(p.estimate)  # same folds and fits as the plain run
        assert x.learning_curve[0.5] < x.learning_curve[1.0]  # fewer cells, more shrinkage
        assert x.estimate == pytest.approx(2 * x.learning_curve[1.0] - x.learning_curve[0.5])
        assert x.ci_high - x.ci_low > p.ci_high - p.ci_low  # the step's extra variance is in the CI
        plain.append(p.estimate)
        ext.append(x.estimate)
        covered["plain"] += p.ci_low <= toy.truth <= p.ci_high
        covered["ext"] += x.ci_low <= toy.truth <= x.ci_high
    assert 0.5 - np.mean(plain) > 0.01, plain  # the plain cross-fit reads low ...
    assert abs(np.mean(ext) - 0.5) < 0.006, ext  # ... the extrapolated one does not
    assert covered["ext"] >= 7 and covered["ext"] > covered["plain"], covered


def test_rate_band_widens_the_interval_toward_a_slower_learning_curve():
    """The estimate keeps the 1/m extrapolation; the CI also covers the m^-1/2 one, on the side the
    learning curve rises toward (the toy's plain cross-fit reads low, so upward)."""
    toy = GaussianToy(0.5, seed=57, dm=12)
    m, e = toy.draw(1200)
    fit_fn_for = lambda r: _fixed_penalty_ridge_fit_fn(m, e, 300.0)  # noqa: E731
    kw = dict(n_boot=200, extrapolate_fraction=0.5)
    x = V.refit_decompose(e, m, fit_fn_for, 2, 2, 3, 7, **kw)
    band = V.refit_decompose(e, m, fit_fn_for, 2, 2, 3, 7, band_rate=0.5, **kw)
    assert band.overall.estimate == x.overall.estimate and not x.overall.slow_rate
    q1, qh = x.overall.learning_curve[1.0], x.overall.learning_curve[0.5]
    w = 0.5**0.5 / (1 - 0.5**0.5)  # 2.414: the step at rate 1/2, against 1 at rate 1
    assert band.overall.slow_rate["rate"] == 0.5
    assert band.overall.slow_rate["estimate"] == pytest.approx(q1 + w * (q1 - qh))
    gap = band.overall.slow_rate["estimate"] - band.overall.estimate
    assert gap > 0 and band.overall.ci_low == x.overall.ci_low
    assert band.overall.ci_high == pytest.approx(x.overall.ci_high + gap)
    assert np.all(band.per_dim_ci[0] <= x.per_dim_ci[0]) and np.all(band.per_dim_ci[1] >= x.per_dim_ci[1])
    assert band.overall.to_dict()["slow_rate"]["rate"] == 0.5
    with pytest.raises(V.AnalysisInputError, match="band_rate"):
        V.refit_decompose(e, m, fit_fn_for, 1, 2, 3, band_rate=0.0, **kw)


def test_extrapolation_rejects_bad_fractions():
    toy = GaussianToy(0.5, seed=1)
    m, e = toy.draw(200)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(V.AnalysisInputError, match="extrapolate_fraction"):
            V.refit_decompose(e, m, lambda r: lambda tr: toy.sampler, 1, 2, 2, extrapolate_fraction=bad)
    with pytest.raises(V.AnalysisInputError, match="train_fraction"):
        V.cross_fit_moments(m, lambda tr: toy.sampler, 2, 2, train_fraction=0.0)
