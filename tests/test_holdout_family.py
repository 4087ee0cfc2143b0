"""The held-out generator family (data_builders/families/holdout.py): files, determinism, truth."""

import json
import os

import anndata
import numpy as np
import pytest
from scipy import sparse

from cosmic_jax.data import morph_features
from cosmic_jax.data.records import CropSource
from data_builders.families import holdout as H
from data_builders.families import holdout_truth as T

SMALL = dict(n_genes=200, expr_mc=(600, 3), morph_mc=(100, 2), response_mc=60, jackknife_groups=20)


def _generate(path, seed=7, shared_fraction=0.4, n_cells=60, **kw):
    return H.generate(str(path), n_cells, seed, shared_fraction, crop_size=48, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("holdout")
    summary = _generate(out)
    return out, summary


def _load(out):
    raw = os.path.join(out, "raw")
    return (anndata.read_h5ad(os.path.join(raw, "cells.h5ad")), np.load(os.path.join(raw, "images.npy")),
            np.load(os.path.join(raw, "masks.npy")))


def test_files_shapes_and_dtypes(dataset):
    out, _ = dataset
    adata, images, masks = _load(out)
    assert adata.shape == (60, 200)
    assert images.shape == masks.shape == (60, 48, 48)
    assert images.dtype == np.float32 and masks.dtype == np.uint8
    assert set(np.unique(masks)) == {0, 1}
    assert 0 < images.min() and images.max() <= 1
    # The nucleus is centred and unmasked images keep a non-zero background around it.
    assert masks[:, 23:25, 23:25].all()
    frac = masks.mean(axis=(1, 2))
    assert 0.04 < frac.min() and frac.max() < 0.6
    assert (images[masks == 0] > 0).all()
    assert list(adata.obs.columns) == ["cell_id", "cell_type", "response"]
    assert adata.obs["cell_id"].is_unique
    assert set(adata.obs["response"]) <= {"untreated", "resistant", "responder"}
    assert adata.obs["cell_type"].nunique() >= 3


def test_counts_are_zero_inflated_integers(dataset):
    out, _ = dataset
    adata, _, _ = _load(out)
    assert sparse.issparse(adata.X) and np.issubdtype(adata.X.dtype, np.integer)
    x = adata.X.toarray()
    assert x.min() >= 0 and (x.sum(axis=1) > 0).all()
    assert 0.1 < (x == 0).mean() < 0.7
    # Zero inflation: with the same means and noise, dropout only zeroes counts, and many of them.
    world = H.make_world(H.HoldoutConfig(n_genes=200, zero_inflation=1.0), 3)
    no_zi = H.make_world(H.HoldoutConfig(n_genes=200, zero_inflation=0.0), 3)
    state = H.sample_state(world, 500, H.rng_for(0, 1))
    mu = H.expression_mean(world, state, H.expression_noise(world, 500, H.rng_for(0, 2)), 0.5)
    draws = H.count_draws(world, mu.shape, H.rng_for(0, 3))
    zi = H.sample_counts(world, mu, draws, H.rng_for(0, 4))
    nb = H.sample_counts(no_zi, mu, draws, H.rng_for(0, 4))
    assert np.array_equal(zi, np.where(zi == 0, 0, nb))
    assert (zi == 0).mean() > (nb == 0).mean() + 0.05


def test_truth_keys_and_ranges(dataset):
    out, summary = dataset
    adata, _, _ = _load(out)
    with open(os.path.join(out, "truth.json")) as f:
        truth = json.load(f)
    assert truth["family"] == "holdout" and truth["seed"] == 7 and truth["shared_fraction"] == 0.4
    per_gene = truth["expr_var_explained_by_morph_per_gene"]
    assert list(per_gene) == list(adata.var_names)
    assert all(-0.1 < v < 1.05 for v in per_gene.values())
    assert np.std(list(per_gene.values())) > 0.1  # genes differ in how much S explains
    per_feat = truth["morph_var_explained_by_expr_per_feature"]
    assert list(per_feat) == list(morph_features.FEATURE_NAMES)
    assert truth["morph_var_explained_by_expr"] == pytest.approx(np.mean(list(per_feat.values())))
    assert max(per_feat.values()) > 0.3 and all(-0.2 < v < 1.1 for v in per_feat.values())
    # responders: brighter foci and chromatin, which the measured intensity features must show (which
    # one carries it depends on how the feature code segments the nucleus)
    assert {"mean_intensity", "nucleoli_intensity"} & set(truth["responder_features"])
    assert 5 <= len(truth["responder_genes"]) <= 40
    se = truth["mc_standard_errors"]
    assert 0 < se["expr_var_explained_by_morph"] < 0.05 and 0 < se["morph_var_explained_by_expr"] < 0.1
    assert truth["calibration"]["reachable_expr_range"][1] > 0.7
    assert isinstance(truth["definitions"], str) and summary["morph_shared"] == 0.4


def test_deterministic_for_a_seed(dataset, tmp_path):
    out, _ = dataset
    _generate(tmp_path)
    a, b = _load(out), _load(tmp_path)
    assert np.array_equal(a[0].X.toarray(), b[0].X.toarray())
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    with open(os.path.join(out, "truth.json")) as f1, open(os.path.join(tmp_path, "truth.json")) as f2:
        assert json.load(f1) == json.load(f2)
    _generate(tmp_path, seed=8, overwrite=True)
    assert not np.array_equal(a[1], _load(tmp_path)[1])


def test_calibration_hits_target_on_an_independent_monte_carlo():
    world = H.make_world(H.HoldoutConfig(n_genes=200, expr_mc=(3000, 3), jackknife_groups=50), 11)
    w, cal = T.calibrate_mixing(world, 0.3, seed=11)
    assert cal["overall"] == pytest.approx(0.3, abs=2e-3)
    # A fresh Monte Carlo (another seed's draws of S and noise, same world) at the calibrated w.
    rng = H.rng_for(11, H.CHECK)
    n_o, n_i = 3000, 3
    state = H.take(H.sample_state(world, n_o, rng), np.repeat(np.arange(n_o), n_i))
    mu = H.expression_mean(world, state, H.expression_noise(world, n_o * n_i, rng), w)
    x = H.log_normalise(H.sample_counts(world, mu, H.count_draws(world, mu.shape, rng), rng))
    fresh = T.anova_ratio(x.reshape(n_o, n_i, -1), 50)
    se = np.hypot(cal["overall_se"], fresh["overall_se"])
    assert abs(fresh["overall"] - 0.3) < 4 * se
    assert se < 0.01


def test_unreachable_fraction_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="reachable range"):
        _generate(tmp_path, shared_fraction=0.97)


def test_anova_ratio_recovers_a_known_split():
    # y = s + e with Var(s) = 1, Var(e) = 3 (dim 0) and = 1 (dim 1): fractions 0.25 and 0.5.
    rng = np.random.default_rng(0)
    s = rng.standard_normal((4000, 1, 1))
    e = rng.standard_normal((4000, 4, 2)) * np.sqrt([3.0, 1.0])
    r = T.anova_ratio(s + e, groups=40)
    assert r["per_dim"] == pytest.approx([0.25, 0.5], abs=4 * r["per_dim_se"].max())
    assert r["mean"] == pytest.approx(0.375, abs=4 * r["mean_se"])
    assert r["overall"] == pytest.approx(2 / 6, abs=4 * r["overall_se"])
    assert 0.003 < r["overall_se"] < 0.03


def test_write_paired_gives_masked_crops_keyed_by_cell_id(dataset):
    out, _ = dataset
    adata, images, masks = _load(out)
    info = H.write_paired(str(out))
    src = CropSource(info["crops"]).verify()
    assert len(src) == 60 and src.image_shape == (48, 48, 1)
    assert src.cell_ids() == list(adata.obs["cell_id"])
    crop = src[5]["image"][..., 0]
    assert np.array_equal(crop, np.where(masks[5] > 0, images[5], 0))
    assert (crop[masks[5] > 0] > 0).all()
    assert anndata.read_h5ad(info["h5ad"]).shape == adata.shape
