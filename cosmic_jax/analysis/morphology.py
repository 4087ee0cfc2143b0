"""Interpretable morphology features per crop, standardised and keyed by cell_id.

The morphology side of the variance decomposition is scored on these features (the synthetic
truth is defined on them). Why not read them off the MAE embedding with a linear read-out? A
read-out only sees the linearly decodable part of each feature, so any shared variance it misses
counts as unexplained and biases the fraction low. Instead the morphology representation given
to the joint model is ``[embedding PCs, standardised features]`` and the features are a direct
target of p(morphology | expression): E[f | e] comes straight from the flow's samples (see
pipeline.py and notes/analysis.md).

Measured from crops, each cell also gets a generic profile (``morph_features.PROFILE_NAMES``:
regionprops shape, intensity distribution, radial rings, multi-scale texture, granularity, GLCM):
the ``context`` of the joint model's morphology input, never a target. The core features are few
and aimed, so they miss part of what a nucleus shows (texture strength apart from grain, pattern
types); the profile carries more of it into E[expression | morphology] (notes/science.md, round 3).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cosmic_jax.analysis.variance import AnalysisInputError
from cosmic_jax.data import morph_features as mf
from cosmic_jax.data.records import CropSource


@dataclasses.dataclass
class MorphFeatures:
    """Standardised interpretable features.

    Attributes:
      values: (N, F) z-scored features.
      raw: (N, F) raw features.
      names: (F,) feature names.
      cell_ids: (N,) ids in crop-dataset order.
      mean, std: (F,) standardisation statistics.
      context: (N, C) z-scored extra morphology inputs (not targets), or None.
      context_raw: (N, C) their raw values; context_names: (C,) their names.
    """

    values: np.ndarray
    raw: np.ndarray
    names: list[str]
    cell_ids: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    context: np.ndarray | None = None
    context_raw: np.ndarray | None = None
    context_names: list[str] = dataclasses.field(default_factory=list)


def standardize_features(raw: np.ndarray, names: list[str], cell_ids: np.ndarray,
                         context_raw: np.ndarray | None = None, context_names: list[str] | None = None
                         ) -> MorphFeatures:
    """z-score raw features (error on NaN/Inf or a constant feature: it would carry no variance).

    ``context_raw`` (extra morphology inputs) is z-scored too; its constant columns (e.g. a shape
    descriptor that every crop shares) are dropped, since as inputs they carry nothing."""
    raw = np.asarray(raw, np.float64)
    bad = ~np.isfinite(raw).all(axis=1)
    if bad.any():
        raise AnalysisInputError(f"morphology features: NaN/Inf for cells {np.asarray(cell_ids)[bad][:5].tolist()}")
    mean, std = raw.mean(0), raw.std(0, ddof=1)
    if (std <= 0).any():
        const = [names[i] for i in np.flatnonzero(std <= 0)]
        raise AnalysisInputError(f"morphology features {const} are constant over all cells")
    out = MorphFeatures((raw - mean) / std, raw, list(names), np.asarray(cell_ids).astype(str), mean, std)
    if context_raw is not None:
        craw = np.asarray(context_raw, np.float64)
        bad = ~np.isfinite(craw).all(axis=1)
        if bad.any():
            raise AnalysisInputError(f"morphology profile: NaN/Inf for cells {np.asarray(cell_ids)[bad][:5].tolist()}")
        csd = craw.std(0, ddof=1)
        keep = csd > 0
        out.context = (craw[:, keep] - craw[:, keep].mean(0)) / csd[keep]
        out.context_raw = craw[:, keep]
        out.context_names = [n for n, k in zip(context_names, keep) if k]
    return out


def measure_crops(crops_dir: str, batch_size: int = 256, progress: bool = False,
                  profile: bool = True) -> MorphFeatures:
    """Measure ``cosmic_jax.data.morph_features`` on every crop of a crop dataset.

    Args:
      crops_dir: crop dataset directory (``cosmic_jax.data.records`` format).
      batch_size: crops measured per vectorised batch (memory is O(batch)).
      profile: also measure the generic profile (``PROFILE_NAMES``) as the context.
    Returns:
      MorphFeatures in dataset order.
    """
    src = CropSource(crops_dir)
    raws, profs, ids = [], [], []
    it = range(0, len(src), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="morphology features")
    all_ids = [str(c) for c in src.cell_ids()]
    for start in it:
        stop = min(start + batch_size, len(src))
        names = all_ids[start:stop]
        # One segmentation serves both feature sets (~15 % of their CPU time).
        images, mask = mf.checked_masks(src.read_images(range(start, stop)), names)
        raws.append(mf.measure_batch(images, names=names, mask=mask))
        if profile:
            profs.append(mf.profile_batch(images, names=names, mask=mask))
        ids += names
    if not ids:
        raise AnalysisInputError(f"{crops_dir}: crop dataset is empty")
    return standardize_features(np.concatenate(raws), list(mf.FEATURE_NAMES), np.array(ids),
                                np.concatenate(profs) if profile else None, list(mf.PROFILE_NAMES))


def pca_reduce(x: np.ndarray, n_comps: int, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, k) PCA scores, whitened to unit variance (a compact flow condition/target)."""
    from sklearn.decomposition import PCA

    k = min(n_comps, x.shape[1], x.shape[0] - 1)
    return PCA(k, whiten=True, random_state=seed).fit_transform(np.asarray(x, np.float64))
