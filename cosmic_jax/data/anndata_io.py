"""Reading and writing AnnData files with one-line errors and atomic replacement."""

from __future__ import annotations

import os

import anndata
import h5py
import numpy as np
import pandas as pd

from cosmic_jax.data.records import CropSource

# crop metadata carried into obs (the rest of a record's meta stays in the crop dataset)
META_COLUMNS = ("source", "frame", "label", "centroid_y", "centroid_x", "area", "eccentricity",
                "mean_intensity", "scale")


def read_h5ad(path: str) -> anndata.AnnData:
    """``anndata.read_h5ad`` whose errors name the file in one line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 / .h5ad file")
    try:
        return anndata.read_h5ad(path)
    except Exception as e:  # anndata / h5py raise many types for damaged files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read as AnnData ({type(e).__name__}: {first})") from None


def write_h5ad(adata: anndata.AnnData, path: str) -> str:
    """Write to a temporary file, then rename: the user's existing file is never left half-written."""
    tmp = path + ".tmp.h5ad"
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def new_anndata(crops_dir: str, ids: list[str]) -> anndata.AnnData:
    """An AnnData with one row per crop (obs_names = cell_id, in crop order), the crops' metadata in
    obs and their centroids in ``obsm['spatial']`` (x, y in source-image pixels) when recorded."""
    src = CropSource(crops_dir, with_meta=True)
    metas = [src[i]["meta"] for i in range(len(src))]
    obs = pd.DataFrame({"cell_id": ids}, index=pd.Index(ids, name=None))
    for col in META_COLUMNS:
        if metas and all(col in m for m in metas):
            obs[col] = [m[col] for m in metas]
    adata = anndata.AnnData(obs=obs)
    if "centroid_x" in obs and "centroid_y" in obs:
        adata.obsm["spatial"] = np.c_[obs["centroid_x"].to_numpy(float), obs["centroid_y"].to_numpy(float)]
    return adata
