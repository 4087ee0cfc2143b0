"""Generator families (data_builders/families): layout, determinism, calibration, what differs."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from cosmic_jax.data import morph_features
from data_builders import synthetic_truth
from data_builders.families import texture

N_CELLS = 240
# Small MC so the test takes seconds; the truths' MC error is then ~0.02.
SMALL = dict(n_genes=60, calib_outer=400, expr_mc_outer=500, morph_mc_outer=200, chunk_cells=100,
             records_per_shard=100)


@pytest.fixture(scope="module")
def texture_dataset(tmp_path_factory):
    import anndata as ad

    out = str(tmp_path_factory.mktemp("tex") / "ds")
    summary = texture.generate(out, N_CELLS, 5, 0.5, texture.TextureConfig(**SMALL))
    with open(os.path.join(out, "truth.json")) as f:
        truth = json.load(f)
    return {"dir": out, "summary": summary, "truth": truth, "adata": ad.read_h5ad(os.path.join(out, "cells.h5ad"))}


def _crops(out: str) -> tuple[np.ndarray, list[str], list[str]]:
    from cosmic_jax.data.records import CropSource

    src = CropSource(os.path.join(out, "crops"), with_meta=True)
    recs = [src[i] for i in range(len(src))]
    return np.stack([r["image"][..., 0] for r in recs]), [r["cell_id"] for r in recs], [r["meta"]["cell_type"] for r in recs]


def test_layout_matches_cosmic_data_synthetic(texture_dataset):
    adata, truth = texture_dataset["adata"], texture_dataset["truth"]
    assert adata.X.dtype.kind == "i" and adata.shape == (N_CELLS, SMALL["n_genes"])
    imgs, ids, types = _crops(texture_dataset["dir"])
    assert imgs.shape == (N_CELLS, 48, 48) and np.isfinite(imgs).all() and 0 <= imgs.min() and imgs.max() <= 1
    assert ids == list(adata.obs["cell_id"]) and types == list(adata.obs["cell_type"].astype(str))
    for key in ("expr_var_explained_by_morph", "morph_var_explained_by_expr"):
        assert 0 < truth[key] < 1 and truth[key + "_se"] < 0.05
    assert set(truth["expr_var_explained_by_morph_per_gene"]) == set(adata.var_names)
    assert set(truth["morph_var_explained_by_expr_per_feature"]) == set(morph_features.FEATURE_NAMES)
    assert "definitions" in truth and "no treatment" in truth["definitions"]


def test_same_seed_same_data(texture_dataset, tmp_path):
    import anndata as ad

    again = texture.generate(str(tmp_path / "b"), N_CELLS, 5, 0.5, texture.TextureConfig(**SMALL))
    np.testing.assert_array_equal(ad.read_h5ad(os.path.join(again["out_dir"], "cells.h5ad")).X,
                                  texture_dataset["adata"].X)
    np.testing.assert_array_equal(_crops(again["out_dir"])[0], _crops(texture_dataset["dir"])[0])


@pytest.mark.parametrize("target", [0.15, 0.6])
def test_calibration_reaches_the_target_fraction(target):
    cfg = texture.TextureConfig(**{**SMALL, "calib_outer": 1500})
    world = texture.calibrate_world(cfg, 7, target)
    fresh = synthetic_truth.expression_truth(world, np.random.default_rng(99), 1500, 4, gen=texture)
    assert abs(fresh["overall"] - target) < 0.03
    # Sparse programs: per-gene truths spread widely.
    assert np.percentile(fresh["per_gene"], 90) - np.percentile(fresh["per_gene"], 10) > 0.3


def test_images_differ_from_the_default_family_where_it_matters(texture_dataset):
    imgs, _, types = _crops(texture_dataset["dir"])
    types = np.asarray(types)
    # Unmasked: the background is camera noise, not exact zeros.
    border = np.concatenate([imgs[:, :3].reshape(N_CELLS, -1), imgs[:, -3:].reshape(N_CELLS, -1)], axis=1)
    assert np.mean(border > 0) > 0.4
    feats = morph_features.measure_batch(imgs)
    area = feats[:, morph_features.FEATURE_NAMES.index("area")]
    # Cell types share one size distribution (offsets are small against the spread) ...
    means = np.array([area[types == t].mean() for t in np.unique(types)])
    assert np.ptp(means) < 1.5 * area.std()
    # ... but their chromatin patterns separate them in the texture / profile features.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tex = feats[:, 3:]  # radial_profile, texture and nucleoli features
    acc = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), tex, types, cv=4).mean()
    assert acc > 0.85


def test_gene_model_is_sparse_zero_inflated_and_overdispersed(texture_dataset):
    adata = texture_dataset["adata"]
    x = np.asarray(adata.X)
    disp, zi = adata.var["true_dispersion"].to_numpy(), adata.var["true_zero_inflation"].to_numpy()
    assert disp.max() / disp.min() > 5 and zi.max() > 0.1
    lib = x.sum(axis=1)
    assert lib.std() / lib.mean() > 0.3  # varied library size
    world = texture.make_world(texture.TextureConfig(**SMALL), 5)
    members = (np.abs(world.expr_shared) > 0).mean()
    assert 0.05 < members < 0.3  # shared programs touch a minority of the genes


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="n_cell_types"):
        texture.TextureConfig(n_cell_types=9).validate()
    with pytest.raises(ValueError, match="shared_fraction"):
        texture.generate("/tmp/never", 10, 0, 1.5)
    with pytest.raises(ValueError, match="not reachable"):
        texture.calibrate_world(dataclasses.replace(texture.TextureConfig(**SMALL), expr_signal_sd=0.2), 0, 0.9)
