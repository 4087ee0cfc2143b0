"""Generation quality: distances between generated and held-out real cells, plus baselines.

Metrics (all on the target embedding, e.g. expression PCA scores):
  * R^2 of means: per cell type, how well the generated mean vector reproduces the real one.
  * energy distance (Szekely): 2 E|X-Y| - E|X-X'| - E|Y-Y'|, 0 iff same distribution.
  * MMD^2 with RBF kernels at several widths (multiples of the median pairwise distance).
  * Sinkhorn divergence (ott-jax), entropic OT debiased so that S(a, a) = 0.
Baselines the flow model must beat: ridge regression + Gaussian residual noise (full residual
covariance) and kNN resampling (targets of the k nearest training conditions).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from ott.geometry import pointcloud
from ott.tools.sinkhorn_divergence import sinkhorn_divergence
from scipy.spatial.distance import cdist

from cosmic_jax.analysis.variance import AnalysisInputError, FitFn, Sampler, check_matrix, fold_indices


class RidgeGaussianSampler:
    """p(t | c) = N(ridge(c), Sigma_resid): the linear-Gaussian baseline (exact for Gaussian data)."""

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha

    def fit(self, cond: np.ndarray, target: np.ndarray) -> "RidgeGaussianSampler":
        """Args: cond (n, Dc), target (n, Dt). Returns self."""
        c = check_matrix(cond, "cond")
        t = check_matrix(target, "target")
        self.c_mean, self.t_mean = c.mean(0), t.mean(0)
        cc, tc = c - self.c_mean, t - self.t_mean
        gram = cc.T @ cc + self.alpha * len(c) * np.eye(c.shape[1])
        self.coef = np.linalg.solve(gram, cc.T @ tc)  # (Dc, Dt)
        resid = tc - cc @ self.coef
        cov = np.cov(resid, rowvar=False).reshape(t.shape[1], t.shape[1])
        self.chol = np.linalg.cholesky(cov + 1e-9 * np.trace(cov) / len(cov) * np.eye(len(cov)))
        return self

    def mean(self, cond: np.ndarray) -> np.ndarray:
        return (np.asarray(cond, np.float64) - self.c_mean) @ self.coef + self.t_mean

    def __call__(self, cond: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
        """Returns (S, n, Dt) samples."""
        mu = self.mean(cond)
        z = np.random.default_rng(seed).standard_normal((num_samples, *mu.shape))
        return mu[None] + z @ self.chol.T


class KNNSampler:
    """p(t | c) approximated by the targets of the k nearest training conditions (standardised)."""

    def __init__(self, k: int = 15):
        self.k = k

    def fit(self, cond: np.ndarray, target: np.ndarray) -> "KNNSampler":
        from sklearn.neighbors import NearestNeighbors

        c = check_matrix(cond, "cond")
        self.target = check_matrix(target, "target")
        self.c_mean, self.c_std = c.mean(0), c.std(0) + 1e-12
        self.k_eff = min(self.k, len(c))
        self.nn = NearestNeighbors(n_neighbors=self.k_eff).fit((c - self.c_mean) / self.c_std)
        return self

    def __call__(self, cond: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
        _, idx = self.nn.kneighbors((np.asarray(cond, np.float64) - self.c_mean) / self.c_std)
        pick = np.random.default_rng(seed).integers(0, self.k_eff, size=(num_samples, len(idx)))
        return self.target[np.take_along_axis(idx[None].repeat(num_samples, 0), pick[..., None], 2)[..., 0]]


def baseline_fit_fn(kind: str, cond: np.ndarray, target: np.ndarray, **kw) -> FitFn:
    """``fit_fn(train_idx) -> sampler`` for a baseline ("ridge" or "knn"), for cross-fitting."""
    cls = {"ridge": RidgeGaussianSampler, "knn": KNNSampler}.get(kind)
    if cls is None:
        raise AnalysisInputError(f"unknown baseline {kind!r}; use 'ridge' or 'knn'")
    return lambda train: cls(**kw).fit(cond[train], target[train])


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between samples x (n, D) and y (m, D) (V-statistic)."""
    x, y = check_matrix(x, "x"), check_matrix(y, "y")
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def median_distance(x: np.ndarray, y: np.ndarray) -> float:
    z = np.concatenate([x, y])
    d = cdist(z, z)
    return float(np.median(d[np.triu_indices(len(z), 1)]))


def mmd_rbf(x: np.ndarray, y: np.ndarray, widths: Sequence[float] | None = None) -> dict[float, float]:
    """Unbiased MMD^2 with RBF kernels exp(-d^2 / (2 w^2)).

    Args:
      x: (n, D); y: (m, D).
      widths: kernel widths; default median pairwise distance x {0.5, 1, 2}.
    Returns:
      {width: MMD^2} (can be slightly negative for equal distributions: unbiased estimator).
    """
    x, y = check_matrix(x, "x"), check_matrix(y, "y")
    if widths is None:
        med = median_distance(x, y)
        widths = [0.5 * med, med, 2 * med]
    dxx, dyy, dxy = cdist(x, x, "sqeuclidean"), cdist(y, y, "sqeuclidean"), cdist(x, y, "sqeuclidean")
    n, m = len(x), len(y)
    out = {}
    for w in widths:
        kxx, kyy, kxy = (np.exp(-d / (2 * w * w)) for d in (dxx, dyy, dxy))
        out[float(w)] = float(
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        )
    return out


@jax.jit
def _padded_sinkhorn(x, y, a, b, epsilon):
    return sinkhorn_divergence(pointcloud.PointCloud, x, y, a=a, b=b, epsilon=epsilon)[0]


def _pad_rows(x: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, D) zero-padded copy and weights 1/n on the real rows, 0 on the padding."""
    out = np.zeros((rows, x.shape[1]), np.float32)
    out[: len(x)] = x
    w = np.zeros(rows, np.float32)
    w[: len(x)] = 1.0 / len(x)
    return out, w


def sinkhorn_div(x: np.ndarray, y: np.ndarray, epsilon: float | None = None) -> float:
    """Debiased Sinkhorn divergence (ott-jax) with squared-Euclidean cost.

    Both point clouds are zero-padded to one power-of-two size with zero weights (the padding
    carries no mass, so the value is unchanged) and epsilon is traced: one compile serves every
    cell type, where each shape and epsilon used to cost a compile of seconds.

    Args:
      x: (n, D); y: (m, D).
      epsilon: entropic regulariser; default 0.5 x mean squared pairwise distance of y (a small
        epsilon approaches unregularised OT, whose finite-sample bias swamps real differences in
        many dimensions; measured in notes/analysis.md).
    """
    x, y = check_matrix(x, "x"), check_matrix(y, "y")
    if epsilon is None:
        epsilon = 0.5 * float(cdist(y, y, "sqeuclidean").mean())
    rows = max(64, 1 << (max(len(x), len(y)) - 1).bit_length())
    (xp, a), (yp, b) = _pad_rows(x, rows), _pad_rows(y, rows)
    return float(_padded_sinkhorn(xp, yp, a, b, np.float32(epsilon)))


def r2_of_means(generated: np.ndarray, real: np.ndarray) -> float:
    """R^2 of the generated mean vector against the real one, across dimensions."""
    mg, mr = np.asarray(generated).mean(0), np.asarray(real).mean(0)
    ss = np.sum((mr - mr.mean()) ** 2)
    return float(1 - np.sum((mg - mr) ** 2) / ss) if ss > 0 else float("nan")


def distribution_metrics(generated: np.ndarray, real: np.ndarray, sinkhorn: bool = True) -> dict[str, float]:
    """All metrics between one generated and one real population (both (n, D))."""
    out = {"r2_means": r2_of_means(generated, real), "energy": energy_distance(generated, real)}
    for i, (w, v) in enumerate(sorted(mmd_rbf(generated, real).items())):
        out[f"mmd_w{i}"] = v
    if sinkhorn:
        out["sinkhorn"] = sinkhorn_div(generated, real)
    return out


def generation_quality(cond: np.ndarray, target: np.ndarray, labels: np.ndarray,
                       fit_fns: dict[str, FitFn], n_folds: int = 3, seed: int = 0,
                       max_cells_per_type: int = 300, min_cells: int = 10,
                       sinkhorn: bool = True) -> list[dict]:
    """Cross-fitted generation quality per cell type for several conditional models.

    Every method generates one sample per held-out cell from its condition (models fitted on the
    other folds); per cell type the generated population is compared with the real held-out one.

    Args:
      cond: (N, Dc) conditions; target: (N, Dt) real targets; labels: (N,) cell types.
      fit_fns: {method: fit_fn(train_idx) -> sampler}, e.g. the flow model plus baselines.
      n_folds: cross-fitting folds.
      max_cells_per_type: subsample per type for the O(n^2) metrics.
      min_cells: cell types with fewer held-out cells are skipped (reported in "skipped").
    Returns:
      rows {method, cell_type, n, r2_means, energy, mmd_w0.., sinkhorn}; cell_type "ALL" is the
      cell-count-weighted mean over types.
    """
    cond, target = check_matrix(cond, "cond"), check_matrix(target, "target")
    labels = np.asarray(labels).astype(str)
    if not (len(cond) == len(target) == len(labels)):
        raise AnalysisInputError(f"cond/target/labels lengths differ: {len(cond)}, {len(target)}, {len(labels)}")
    fold = fold_indices(len(cond), n_folds, seed, labels)
    rng = np.random.default_rng(seed)
    rows = []
    for method, fit_fn in fit_fns.items():
        gen = np.zeros_like(target)
        for k in range(n_folds):
            test = np.flatnonzero(fold == k)
            sampler = fit_fn(np.flatnonzero(fold != k))
            gen[test] = np.asarray(sampler(cond[test], 1, seed + k))[0]
        type_rows = []
        for ct in np.unique(labels):
            idx = np.flatnonzero(labels == ct)
            if len(idx) < min_cells:
                continue
            if len(idx) > max_cells_per_type:
                idx = rng.choice(idx, max_cells_per_type, replace=False)
            type_rows.append({"method": method, "cell_type": ct, "n": int(len(idx)),
                              **distribution_metrics(gen[idx], target[idx], sinkhorn)})
        if not type_rows:
            raise AnalysisInputError(f"no cell type has >= {min_cells} cells for generation metrics")
        rows += type_rows
        n = np.array([r["n"] for r in type_rows], float)
        keys = [k for k in type_rows[0] if k not in ("method", "cell_type", "n")]
        rows.append({"method": method, "cell_type": "ALL", "n": int(n.sum()),
                     **{k: float(np.sum(n * [r[k] for r in type_rows]) / n.sum()) for k in keys}})
    return rows
