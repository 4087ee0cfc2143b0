"""Expression embedding, metrics, cell-type probes, response tests and input errors.

The end-to-end ground-truth test (pixels -> `analyze` -> truth) is tests/test_ground_truth.py."""

import os

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cosmic_jax.analysis import celltype, generation, response
from cosmic_jax.analysis.morphology import standardize_features
from cosmic_jax.analysis.pipeline import run_analyses
from cosmic_jax.analysis.expression import embed_expression
from cosmic_jax.analysis.variance import HEADLINE, AnalysisInputError
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.data.cells import CellKeyError, cell_ids, match_ids


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def _lowrank_counts(n=600, g=80, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    eta = 0.5 + z @ rng.normal(size=(4, g)) * 0.6
    lib = rng.lognormal(np.log(2000), 0.2, n)
    p = np.exp(eta) / np.exp(eta).sum(1, keepdims=True)
    return rng.poisson(lib[:, None] * p).astype(np.float32)


def test_expression_embedding_counts_inmemory_vs_backed(tmp_path):
    counts = _lowrank_counts()
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs["cell_id"] = [f"c{i}" for i in range(len(counts))]
    mem = embed_expression(adata, n_comps=8)
    assert mem.input_kind == "counts"
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(mem.gene_var, x.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(mem.gene_mean, x.mean(0), rtol=1e-6)
    # Read-out + residual reproduce the gene matrix exactly: total = explained-by-scores + residual.
    recon = mem.gene_mean + mem.scores @ mem.loadings
    np.testing.assert_allclose(((x - recon) ** 2).sum(1), mem.resid_sq, rtol=1e-6)
    np.testing.assert_allclose(np.trace(np.cov(mem.scores, rowvar=False) @ mem.metric) + mem.resid_sq.sum() / (len(x) - 1),
                               mem.total_var, rtol=1e-4)
    # PCA loadings are the components (orthonormal) when all genes are used.
    np.testing.assert_allclose(mem.loadings, mem.components, atol=1e-5)
    path = os.path.join(tmp_path, "c.h5ad")
    adata.write_h5ad(path)
    backed = embed_expression(path, n_comps=8, chunk_size=100)  # streamed: IncrementalPCA
    np.testing.assert_allclose(backed.gene_var, mem.gene_var, rtol=1e-6)
    p_mem = mem.components.T @ mem.components
    p_bk = backed.components.T @ backed.components
    # The 4 signal dimensions dominate; both subspaces capture the same gene variance.
    assert abs(backed.captured_fraction() - mem.captured_fraction()) < 0.02
    assert np.linalg.norm(p_mem @ p_bk) ** 2 / 8 > 0.6
    assert list(backed.cell_ids[:2]) == ["c0", "c1"]


def test_expression_hvg_and_obsm_readout(pbmc):
    emb = embed_expression(pbmc, n_comps=15, use_raw=True, n_top_genes=200)
    assert emb.input_kind == "lognorm" and emb.hvg.sum() == 200
    assert emb.loadings.shape == (15, 765)
    # Non-HVG genes get a read-out, HVG components are zero outside the HVGs.
    assert np.all(emb.components[:, ~emb.hvg] == 0)
    assert np.abs(emb.loadings[:, ~emb.hvg]).sum() > 0
    obsm = embed_expression(pbmc, use_raw=True, obsm_key="X_pca")
    assert obsm.source == "X_pca" and 0 < obsm.captured_fraction() < 1


def test_expression_bad_inputs(pbmc):
    with pytest.raises(AnalysisInputError, match="negative values.*use_raw=True"):
        embed_expression(pbmc)
    with pytest.raises(AnalysisInputError, match="obsm key 'X_nope' not found"):
        embed_expression(pbmc, use_raw=True, obsm_key="X_nope")
    a = ad.AnnData(np.ones((10, 5), np.float32))
    a.X[3, 2] = np.nan
    a.obs_names = [f"cell{i}" for i in range(10)]
    with pytest.raises(AnalysisInputError, match=r"NaN/Inf values, e.g. \['cell3'\]"):
        embed_expression(a)
    b = ad.AnnData(np.ones((10, 5), np.float32))
    b.X[4] = 0
    with pytest.raises(AnalysisInputError, match="zero total counts: \\['4'\\]"):
        embed_expression(b, input_kind="counts")
    with pytest.raises(CellKeyError, match=r"1 AnnData cell_id\(s\) have no match in b, e.g. \['x'\]"):
        match_ids(["a1", "x"], ["a1", "y"], "b")
    with pytest.raises(CellKeyError, match="duplicate cell_id"):
        match_ids(["a", "a"], ["a", "b"], "b")
    np.testing.assert_array_equal(match_ids(["b", "a"], ["a", "b"]), [1, 0])


def test_cell_key_must_be_consistent():
    """obs['cell_id'] naming the cells of other rows than obs_names do is refused, not guessed."""
    a = ad.AnnData(np.ones((4, 2), np.float32))
    a.obs_names = ["c0", "c1", "c2", "c3"]
    a.obs["cell_id"] = ["c0", "c1", "c2", "c3"]
    assert list(cell_ids(a)) == ["c0", "c1", "c2", "c3"]
    a.obs["cell_id"] = ["c1", "c0", "c2", "c3"]  # permuted relative to the rows
    with pytest.raises(CellKeyError, match="disagree about which row is which cell"):
        cell_ids(a, where="cells.h5ad")
    a.obs["cell_id"] = ["x0", "x1", "x2", "x3"]  # a separate id scheme: the column is the key
    assert list(cell_ids(a)) == ["x0", "x1", "x2", "x3"]


def test_celltype_probes_above_chance_on_pbmc(pbmc):
    emb = embed_expression(pbmc, n_comps=20, use_raw=True)
    res = celltype.probe(emb.scores, pbmc.obs["bulk_labels"], n_folds=3)
    chance = res["chance"]["accuracy"]
    assert res["linear"]["accuracy"] > chance + 0.3
    assert res["knn"]["accuracy"] > chance + 0.3
    assert 0 < res["linear"]["macro_f1"] <= 1
    with pytest.raises(AnalysisInputError, match="groups with fewer than 50 cells"):
        celltype.probe(emb.scores, pbmc.obs["bulk_labels"], n_folds=50)


def test_generated_expression_probe_and_retrieval():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    centers = rng.normal(size=(3, 5)) * 3
    s = centers[np.searchsorted(["a", "b", "c"], labels)] + rng.normal(size=(300, 5))
    m = s + 0.1 * rng.normal(size=s.shape)
    e = s @ rng.normal(size=(5, 6)) + 0.1 * rng.normal(size=(300, 6))
    fit = generation.baseline_fit_fn("ridge", m, e)
    res = celltype.generated_expression_probe(m, e, labels, fit)
    assert res["accuracy"] > 0.9 and res["real_accuracy"] > 0.9
    ridge = generation.RidgeGaussianSampler().fit(m, e)
    r = celltype.retrieval(ridge.mean(m), e)
    assert r["top1"] > 0.5 and r["top10"] >= r["top1"] and r["chance_top1"] == 1 / 300
    noise = celltype.retrieval(rng.normal(size=e.shape), e, num_candidates=50)
    assert noise["top10"] < 0.45 and noise["num_candidates"] == 50


def test_distribution_metrics_zero_for_same_positive_for_shifted():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    z = y + np.array([1.0, 0, 0, 0])
    same = generation.distribution_metrics(x, y)
    shifted = generation.distribution_metrics(x, z)
    assert abs(same["energy"]) < 0.05 and shifted["energy"] > 0.3
    for k in ("mmd_w0", "mmd_w1", "mmd_w2"):
        assert abs(same[k]) < 0.01 and shifted[k] > 5 * max(abs(same[k]), 1e-3)
    assert abs(same["sinkhorn"]) < 0.25 * shifted["sinkhorn"] and shifted["sinkhorn"] > 0.5  # default epsilon: 0.5 x mean sq distance
    assert same["r2_means"] < 1 and generation.r2_of_means(x + 0.0, x) == 1.0


def test_generation_quality_flow_like_beats_mean_only():
    rng = np.random.default_rng(1)
    labels = np.repeat(["a", "b"], 150)
    m = rng.normal(size=(300, 3)) + (labels == "a")[:, None] * 2
    e = np.tanh(m) @ rng.normal(size=(3, 4)) + 0.3 * rng.normal(size=(300, 4))

    def mean_only(train):
        mu = e[train].mean(0)
        return lambda c, s, seed: np.broadcast_to(mu, (s, len(c), 4)).copy()

    rows = generation.generation_quality(
        m, e, labels,
        {"knn": generation.baseline_fit_fn("knn", m, e), "mean": mean_only}, sinkhorn=False)
    by = {(r["method"], r["cell_type"]): r for r in rows}
    assert by[("knn", "ALL")]["energy"] < by[("mean", "ALL")]["energy"]
    assert by[("knn", "ALL")]["mmd_w1"] < by[("mean", "ALL")]["mmd_w1"]


def test_bh_matches_reference():
    p = [0.01, 0.04, 0.03, 0.005, 0.2, np.nan]
    # R: p.adjust(c(.01,.04,.03,.005,.2), "BH") = 0.025 0.05 0.05 0.025 0.2
    np.testing.assert_allclose(response.bh_adjust(p)[:5], [0.025, 0.05, 0.05, 0.025, 0.2])
    assert np.isnan(response.bh_adjust(p)[5])
    with pytest.raises(AnalysisInputError):
        response.bh_adjust([1.5])


def test_response_finds_planted_differences():
    rng = np.random.default_rng(2)
    n, f = 400, 30
    resp = rng.random(n) < 0.5
    x = rng.normal(size=(n, f))
    planted = [3, 7, 11]
    x[:, planted] += resp[:, None] * 0.8
    names = [f"g{i}" for i in range(f)]
    rows = response.differential(x, resp, names)
    rec = response.recovery(rows, [names[i] for i in planted])
    assert rec["recall"] == 1.0 and rec["precision"] >= 0.75
    assert {r["name"] for r in rows[:3]} == {"g3", "g7", "g11"}
    top = rows[0]
    assert 0.5 < top["cohen_d"] < 1.2 and top["q_mw"] < 1e-3
    auc = response.response_auc(x[:, planted], resp)
    assert auc["auc"] > 0.8
    null = response.response_auc(x[:, [0, 1]], resp)
    assert abs(null["auc"] - 0.5) < 0.1
    with pytest.raises(AnalysisInputError, match="fewer than 3 cells"):
        response.differential(x, np.arange(n) < 2, names)


def test_measured_profile_is_morphology_input_never_target():
    from cosmic_jax.analysis.morphology import standardize_features
    from cosmic_jax.analysis.pipeline import representations
    from cosmic_jax.configs import analyze as analyze_configs

    rng = np.random.default_rng(0)
    n = 50
    core = rng.normal(size=(n, 3))
    profile = np.c_[rng.normal(size=(n, 2)), np.full(n, 7.0)]  # the constant column carries nothing
    feats = standardize_features(core, ["a", "b", "c"], np.arange(n).astype(str), profile, ["p", "q", "const"])
    assert feats.context_names == ["p", "q"] and feats.context.shape == (n, 2)
    np.testing.assert_allclose(feats.context.std(0, ddof=1), 1.0)
    cfg = analyze_configs.get_config("quick")
    reps = {r.name: r for r in representations(rng.normal(size=(n, 10)), feats, cfg)}
    both, alone = reps["both"], reps["features"]
    k = cfg.morph_comps
    assert both.m.shape == (n, k + 3 + 2) and alone.m.shape == (n, 3 + 2)
    for rep in (both, alone):  # the targets are the core features, read from their columns of m
        assert rep.target_names == ["a", "b", "c"]
        np.testing.assert_array_equal(rep.m[:, rep.target_cols], feats.values)
        np.testing.assert_array_equal(rep.targets, feats.values)
    np.testing.assert_array_equal(both.m[:, k + 3:], feats.context)


@pytest.mark.slow  # ~40 s CPU: three joint-model architectures compile
def test_by_representation_counts_only_what_each_representation_carries(tmp_path):
    """Linear-Gaussian toy: measured features carry a 3-d state shared with expression, the
    "MAE" embedding is noise. Ridge is exact here, so its expression-side estimate must match the
    closed-form truth for "features" and "both" and read ~0 for "mae"; every entry carries the
    re-fit parts of its CI."""
    rng = np.random.default_rng(0)
    n, genes = 800, 20
    s = rng.normal(size=(n, 3))
    w_x, w_f = rng.normal(size=(3, genes)), rng.normal(size=(3, 4))
    x = 10.0 + s @ w_x + rng.normal(size=(n, genes)) * 1.5  # log-normalised-like, positive
    f = s @ w_f + rng.normal(size=(n, 4)) * 0.7
    c = np.cov(np.c_[x, f], rowvar=False)
    cxf, cff = c[:genes, genes:], c[genes:, genes:]
    truth = np.trace(cxf @ np.linalg.solve(cff, cxf.T)) / np.trace(c[:genes, :genes])
    adata = ad.AnnData(x.astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(n)]
    feats = standardize_features(f, ["f0", "f1", "f2", "f3"], np.asarray(adata.obs_names))
    cfg = load_config(analyze_configs, "quick", [
        "--config.input_kind=lognorm", "--config.label_key=", "--config.response_key=", "--config.expr_comps=8",
        "--config.n_folds=2", "--config.num_samples=4", "--config.n_boot=50", "--config.refit_repeats=2",
        "--config.refit_repeats_side=1", "--config.morph_comps=4", "--config.joint.steps=20",
        "--config.joint.num_devices=1", "--config.joint.progress=false",
        "--config.extrapolate_fraction=0"])  # "mae" and "features": one compile; extrapolation: test above
    summary = run_analyses(adata, cfg, str(tmp_path), x_morph=rng.normal(size=(n, 16)), features=feats)
    by_rep = summary["decomposition_by_representation"]
    assert list(by_rep) == ["both", "mae", "features"] and summary["headline_representation"] == "both"
    ridge = {rep: by_rep[rep]["ridge"][HEADLINE[0]] for rep in by_rep}
    assert abs(ridge["features"]["estimate"] - truth) < 0.05, (ridge, truth)
    assert abs(ridge["both"]["estimate"] - truth) < 0.05, (ridge, truth)
    # a fraction's interval ends at 0 (combine_repeats): noise reads ~0 and its CI reaches 0
    assert 0 <= ridge["mae"]["estimate"] < 0.03 and ridge["mae"]["ci_low"] == 0 < ridge["mae"]["ci_high"], ridge
    for rep, repeats in (("both", 2), ("mae", 1), ("features", 1)):
        for method in ("flow", "ridge", "knn"):
            for key in HEADLINE:
                d = by_rep[rep][method][key]
                assert d["repeats"] == repeats and len(d["repeat_estimates"]) == repeats
                assert d["total_var"] >= d["within_var"] > 0 and d["ci_low"] <= d["estimate"] <= d["ci_high"]
                assert 0 <= d["ci_low"] < d["ci_high"] <= 1  # clipped where the t interval leaves [0, 1]
    assert summary[HEADLINE[0]] == by_rep["both"]["flow"][HEADLINE[0]]
    assert summary["decomposition_baselines"]["ridge"] == by_rep["both"]["ridge"]
    assert "lower bound" in summary["decomposition_note"]
    assert by_rep["mae"]["morph_target"] != by_rep["features"]["morph_target"]
