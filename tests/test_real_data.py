"""The real case: scimap's CyCIF exemplar (shipped in the scimap wheel, installed --no-deps) becomes a
paired dataset with morphology in obsm, and `analyze` runs it with no crops (features only)."""

import importlib.util
import os

import anndata as ad
import numpy as np
import pytest

from cosmic_jax.analysis.variance import HEADLINE
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.workflows.analyze import analyze

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _real_scimap():
    spec = importlib.util.spec_from_file_location("real_scimap", os.path.join(ROOT, "experiments", "real_scimap.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scimap_exemplar_runs_markers_vs_shape_from_obsm(tmp_path):
    rs = _real_scimap()
    path = rs.scimap_dataset(str(tmp_path / "full"))
    full = ad.read_h5ad(path)
    assert full.shape == (11201, 9) and list(full.obsm["shape"].columns) == [
        "log_Area", "log_MajorAxisLength", "log_MinorAxisLength", "Eccentricity", "Solidity", "Extent"]
    src = ad.read_h5ad(rs.scimap_exemplar())
    np.testing.assert_allclose(full.X, np.log1p(np.asarray(src.raw.X)), rtol=1e-6)  # log1p of mean intensities
    assert np.isfinite(full.obsm["shape"].to_numpy()).all()

    small = full[np.sort(np.random.default_rng(0).choice(full.n_obs, 1500, replace=False))].copy()
    os.makedirs(tmp_path / "small")
    small.write_h5ad(tmp_path / "small" / "cells.h5ad")
    # label_key= skips the cell-type / generation analyses (the experiment reports them): seconds, not minutes
    cfg = load_config(analyze_configs, "quick", rs.SCIMAP_OVERRIDES + [
        "--config.label_key=", "--config.n_folds=2", "--config.num_samples=4", "--config.n_boot=50", "--config.refit_repeats=2",
        "--config.joint.steps=20", "--config.joint.num_devices=1", "--config.joint.progress=false"])
    summary = analyze(str(tmp_path / "small"), str(tmp_path / "w"), cfg)
    assert summary["headline_representation"] == "features"
    assert list(summary["decomposition_by_representation"]) == ["features"]
    assert summary["expression_embedding"]["input_kind"] == "lognorm"
    ridge = summary["decomposition_baselines"]["ridge"]
    # marker intensities and cell shape share a little signal in this tissue; ridge on all 11,201
    # cells reads 0.073 (markers <- shape) and 0.136 (shape <- markers), notes/uncertainty.md
    for key, full_size in zip(HEADLINE, (0.073, 0.136)):
        assert 0 < ridge[key]["ci_low"] < ridge[key]["estimate"] < ridge[key]["ci_high"], (key, ridge[key])
        assert abs(ridge[key]["estimate"] - full_size) < 0.04, (key, ridge[key])
    with pytest.raises(ValueError, match="not scimap's exemplar"):
        rs.scimap_dataset(str(tmp_path / "bad"), source=str(tmp_path / "small" / "cells.h5ad"))
