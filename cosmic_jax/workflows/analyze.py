"""The end-to-end analysis of a paired dataset: pretrain if missing -> embed -> measure -> analyze.

``analyze(data_dir, workdir, cfg)`` (what ``cosmic analyze`` runs):
  1. the expression AnnData (``DATA/cells.h5ad``; every per-cell array is matched to its rows by
     cell id, ``cosmic_jax.data.cells``);
  2. the morphology representation: ``obsm[cfg.morph_key]`` when given, else the MAE embedding of
     ``DATA/crops`` (with ``cfg.orient``, of their oriented copy ``W/oriented_crops``, made at the
     input size of a reused MAE) from ``--mae RUN`` (a reused pretraining run, which must have been
     pretrained in the same pose), or from ``W/mae``, pretrained there on the same crops with
     ``cfg.pretrain`` when it holds no checkpoint;
  3. the measured morphology features: ``obsm[cfg.features_key]`` when given, else measured from
     the crops (cached in ``W/features.npz``);
  4. ``analysis.pipeline.run_analyses`` -> ``W/analysis/`` (summary.json, CSV tables,
     ``cells.h5ad`` with per-gene results in ``var`` and embeddings in ``obsm``);
  5. with a synthetic dataset's ``truth.json``, the truth comparison (``cosmic_jax.evaluation``).
Each finished stage is cached in W, so a rerun skips it.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import ml_collections
import numpy as np
import pandas as pd

from cosmic_jax import evaluation
from cosmic_jax.analysis.morphology import MorphFeatures, measure_crops, standardize_features
from cosmic_jax.analysis.pipeline import clean_json, run_analyses
from cosmic_jax.analysis.variance import AnalysisInputError
from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.data.anndata_io import read_h5ad, write_h5ad
from cosmic_jax.data.cells import cell_ids, match_ids
from cosmic_jax.data.orient import read_run_pose, write_oriented
from cosmic_jax.data.records import CropSource, dataset_fingerprint
from cosmic_jax.embed.embedder import Embedder
from cosmic_jax.train.checkpoint import checkpoint_steps
from cosmic_jax.train.pretrain import load_run_config, train_and_evaluate

log = logging.getLogger(__name__)


def ensure_mae(crops_dir: str, workdir: str, cfg: ml_collections.ConfigDict, mae: str | None = None) -> str:
    """A pretraining workdir with a checkpoint: ``mae`` if given, W or W/mae, else a fresh MAE in W/mae."""
    if mae:
        if not checkpoint_steps(mae):
            raise FileNotFoundError(f"--mae {mae}: holds no pretraining checkpoint (make one with `cosmic pretrain`)")
        return _same_pose(os.path.abspath(mae), cfg, f"--mae {mae}")
    for cand in (workdir, os.path.join(workdir, "mae")):
        if checkpoint_steps(cand) and os.path.exists(os.path.join(cand, "config.json")):
            return _same_pose(cand, cfg, cand)
    h, w, c = CropSource(crops_dir).image_shape
    if h != w:
        raise AnalysisInputError(f"{crops_dir}: crops are {h}x{w}; the MAE needs square crops")
    pre = ml_collections.ConfigDict(cfg.pretrain.to_dict())
    pre.model.image_size, pre.model.channels, pre.seed = int(h), int(c), cfg.seed
    pre.recon_every = pre.steps if pre.recon_every else 0
    mae_dir = os.path.join(workdir, "mae")
    log.info("no MAE checkpoint in %s: pretraining %s for %d steps in %s (reuse one with --mae RUN)",
             workdir, pre.model.name, pre.steps, mae_dir)
    train_and_evaluate(pre, crops_dir, mae_dir)
    return mae_dir


def _same_pose(run: str, cfg: ml_collections.ConfigDict, what: str) -> str:
    """``run``, if it was pretrained on crops in the pose this analysis embeds (``cfg.orient``)."""
    pose = read_run_pose(run)
    if pose is not None and pose["oriented"] != bool(cfg.orient):
        said = "oriented crops" if pose["oriented"] else "crops as cut"
        raise AnalysisInputError(f"{what}: was pretrained on {said}, this analysis embeds "
                                 f"{'oriented crops' if cfg.orient else 'crops as cut'}: pass "
                                 f"--config.orient={str(pose['oriented']).lower()} or pretrain on crops in this pose")
    return run


def morphology_embedding(adata, ids: np.ndarray, crops_dir: str, mae_dir: str, cache: str) -> np.ndarray:
    """MAE embedding (N, D) in AnnData row order, cached in ``cache`` (npz keyed by cell id, MAE and
    crop dataset)."""
    source = f"{os.path.abspath(mae_dir)}@{checkpoint_steps(mae_dir)[-1]}|{dataset_fingerprint(crops_dir)}"
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if str(z["source"]) == source and np.array_equal(z["cell_ids"].astype(str), ids):
                return z["X_cosmic"]
    emb = Embedder.from_checkpoint(mae_dir).embed_anndata(adata, crops=crops_dir, key="X_cosmic")
    np.savez(cache, X_cosmic=emb, cell_ids=ids.astype("U"), source=np.str_(source))
    return emb


def oriented_crops(crops_dir: str, workdir: str, fill: float, mae: str | None = None) -> str:
    """``W/oriented_crops``: the crops rotated onto their nucleus's major axis and magnified to
    ``fill`` (0 = not magnified), in crops of the input size of a reused MAE ``mae`` (default: their
    own); kept while the source and the settings are unchanged."""
    size = int(load_run_config(mae).model.image_size) if mae else None
    return write_oriented(crops_dir, os.path.join(workdir, "oriented_crops"), fill=fill or None, size=size,
                          progress=lambda done, total: log.info("orienting the crops for the MAE: %d / %d", done, total))


def measured_features(ids: np.ndarray, crops_dir: str, cache: str, profile: bool = True) -> MorphFeatures:
    """Features (and the generic profile, if ``profile``) measured from the crops, in AnnData row
    order, cached in ``cache``."""
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["cell_ids"].astype(str), ids) and ("profile" in z) == profile:
                ctx = (z["profile"], list(z["profile_names"].astype(str))) if profile else (None, None)
                return standardize_features(z["raw"], list(z["names"].astype(str)), ids, *ctx)
    feats = measure_crops(crops_dir, progress=True, profile=profile)
    order = match_ids(ids, feats.cell_ids, f"crop dataset {crops_dir}")
    raw = feats.raw[order]
    ctx = {} if not profile else {"profile": feats.context_raw[order],
                                  "profile_names": np.asarray(feats.context_names).astype("U")}
    np.savez(cache, raw=raw, names=np.asarray(feats.names).astype("U"), cell_ids=ids.astype("U"), **ctx)
    return standardize_features(raw, feats.names, ids, ctx.get("profile"), feats.context_names)


def _obsm(adata, key: str, where: str) -> np.ndarray:
    if key not in adata.obsm:
        raise AnalysisInputError(f"{where}: no obsm[{key!r}] (obsm keys: {sorted(adata.obsm.keys())})")
    return np.asarray(adata.obsm[key], np.float64)


def analyze(data_dir: str | None, workdir: str, cfg: ml_collections.ConfigDict, h5ad: str | None = None,
            crops_dir: str | None = None, mae: str | None = None) -> dict:
    """Run the whole analysis of one dataset into ``workdir``; returns the summary dict.

    Args:
      data_dir: dataset dir with cells.h5ad, optional crops/ and truth.json (None with ``h5ad``).
      workdir: run directory W (created).
      cfg: ``configs/analyze.py`` config.
      h5ad / crops_dir: explicit paths (default DATA/cells.h5ad, DATA/crops when it exists).
      mae: a pretraining run to embed with instead of training one in W/mae.
    """
    if not 0.0 <= cfg.extrapolate_fraction < 1.0:  # before any pretraining or embedding is spent
        raise AnalysisInputError(f"--config.extrapolate_fraction={cfg.extrapolate_fraction}: must be in [0, 1) (0 = off)")
    if cfg.orient and not 0.0 <= cfg.orient_fill <= 2.0:
        raise AnalysisInputError(f"--config.orient_fill={cfg.orient_fill}: must be in [0, 2] (0 = keep the scale)")
    if not 0.0 < cfg.extrapolate_band_rate <= 1.0:
        raise AnalysisInputError(
            f"--config.extrapolate_band_rate={cfg.extrapolate_band_rate}: must be in (0, 1] (1 = off)")
    workdir = os.path.abspath(workdir)
    data_dir = os.path.abspath(data_dir) if data_dir else None
    h5ad = os.path.abspath(h5ad or os.path.join(data_dir, "cells.h5ad"))
    if crops_dir is None and data_dir and os.path.isdir(os.path.join(data_dir, "crops")):
        crops_dir = os.path.join(data_dir, "crops")
    crops_dir = os.path.abspath(crops_dir) if crops_dir else None
    if crops_dir and not os.path.isdir(crops_dir):
        raise FileNotFoundError(f"{crops_dir}: crop dataset not found")
    adata = read_h5ad(h5ad)
    ids = cell_ids(adata, where=h5ad)
    out_dir = os.path.join(workdir, "analysis")
    os.makedirs(out_dir, exist_ok=True)

    x_morph, mae_dir = None, None
    if cfg.morph_key:
        x_morph = _obsm(adata, cfg.morph_key, h5ad)
    elif crops_dir:
        reused = ensure_mae(crops_dir, workdir, cfg, mae) if mae else None  # its pose checked before any work
        mae_crops = oriented_crops(crops_dir, workdir, cfg.orient_fill, reused) if cfg.orient else crops_dir
        mae_dir = reused or ensure_mae(mae_crops, workdir, cfg)
        x_morph = morphology_embedding(adata, ids, mae_crops, mae_dir, os.path.join(workdir, "embeddings.npz"))
    features = None
    if cfg.features_key:
        raw = _obsm(adata, cfg.features_key, h5ad)
        names = list(getattr(adata.obsm[cfg.features_key], "columns", [f"{cfg.features_key}_{i}" for i in range(raw.shape[1])]))
        features = standardize_features(raw, [str(n) for n in names], ids)
    elif crops_dir:
        features = measured_features(ids, crops_dir, os.path.join(workdir, "features.npz"), cfg.morph_profile)

    summary = run_analyses(adata, cfg, out_dir, x_morph=x_morph, features=features, where=h5ad)
    summary["data"] = h5ad
    if mae_dir:
        summary["morphology_embedding"] = {"key": "X_cosmic", "mae": mae_dir, "dim": int(x_morph.shape[1]),
                                           "oriented_crops": bool(cfg.orient)}
    truth = evaluation.load_truth(data_dir)
    if truth:
        summary["truth"] = evaluation.compare(summary, out_dir, truth)
    summary = clean_json(summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    cfg_io.save(cfg, os.path.join(out_dir, "config.json"))
    write_result_h5ad(adata, out_dir, x_morph, features)
    return summary


def write_result_h5ad(adata, out_dir: str, x_morph: np.ndarray | None, features: MorphFeatures | None) -> str:
    """``W/analysis/cells.h5ad``: the cells with per-gene results in ``var``, per-feature results in
    ``uns['per_feature']``, the morphology embedding / features / joint latent in ``obsm``."""
    out = adata.copy()
    per_gene = os.path.join(out_dir, "per_gene.csv")
    if os.path.exists(per_gene):
        table = pd.read_csv(per_gene).set_index("gene")
        table.index = table.index.astype(str)
        for col in table.columns:
            out.var[f"cosmic_{col}"] = table[col].reindex(out.var_names.astype(str)).to_numpy()
    per_feature = os.path.join(out_dir, "per_feature.csv")
    if os.path.exists(per_feature):
        with open(per_feature, newline="") as f:
            out.uns["per_feature"] = {k: [r[k] for r in rows] for rows in [list(csv.DictReader(f))] for k in (rows[0] if rows else {})}
    if x_morph is not None:
        out.obsm["X_cosmic"] = np.asarray(x_morph, np.float32)
    if features is not None:
        out.obsm["morph_features"] = pd.DataFrame(features.raw, index=out.obs_names, columns=features.names)
        if features.context is not None:
            out.obsm["morph_profile"] = pd.DataFrame(features.context_raw, index=out.obs_names,
                                                     columns=features.context_names)
    latent = os.path.join(out_dir, "joint_latent.npz")
    if os.path.exists(latent):
        with np.load(latent, allow_pickle=False) as z:
            out.obsm["X_joint"] = z["z"].astype(np.float32)
    return write_h5ad(out, os.path.join(out_dir, "cells.h5ad"))
