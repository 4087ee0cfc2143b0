"""Transcriptomic embedding that keeps its way back to genes.

``embed_expression`` library-size normalises (target 1e4) and log1p-transforms counts (or takes
log-normalised input as is), optionally selects highly variable genes, runs PCA, and keeps:

* ``scores`` (N, k): the embedding the joint model and the variance decomposition work on;
* ``loadings`` (k, G): the least-squares read-out of every gene's log-normalised value from the
  scores (equal to the PCA components on the PCA genes), so explained variance maps to genes;
* ``gene_var`` (G,) and ``resid_sq`` (N,): total per-gene variance over ALL genes and each cell's
  squared residual outside the read-out, so variance outside the kept PCs counts as unexplained.

Any ``obsm`` embedding (e.g. scVI) can replace the PCA: the read-out is then fitted the same way.

Large data: pass a path or a backed AnnData (``anndata.read_h5ad(path, backed="r")``), or set
``chunk_size``. Everything then streams over row chunks (per-gene moments, sklearn
IncrementalPCA, read-out normal equations, residuals), so memory is O(chunk x genes + genes x k),
never the full matrix. In memory, scanpy does normalisation, HVG selection (seurat flavour) and PCA.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal

import numpy as np

from cosmic_jax.analysis.variance import AnalysisInputError
from cosmic_jax.data.cells import cell_ids

InputKind = Literal["auto", "counts", "lognorm"]


@dataclasses.dataclass
class ExpressionEmbedding:
    """Expression embedding plus what is needed to map results back to genes.

    Attributes:
      scores: (N, k) embedding (centred).
      loadings: (k, G) read-out: x_g ~ gene_mean_g + scores @ loadings[:, g].
      gene_mean: (G,) mean log-normalised expression.
      gene_var: (G,) variance (ddof=1) of log-normalised expression, over all genes.
      resid_sq: (N,) squared norm of each cell's gene-space residual outside the read-out.
      gene_names: (G,) gene names.
      cell_ids: (N,) cell ids (obs["cell_id"] when present, else obs_names).
      source: "pca" or the obsm key used.
      input_kind: "counts" or "lognorm".
      components: (k, G) PCA components (zero outside HVGs), None for an obsm embedding.
      hvg: (G,) bool mask of genes used by the PCA, None when all genes were used.
    """

    scores: np.ndarray
    loadings: np.ndarray
    gene_mean: np.ndarray
    gene_var: np.ndarray
    resid_sq: np.ndarray
    gene_names: np.ndarray
    cell_ids: np.ndarray
    source: str
    input_kind: str
    components: np.ndarray | None = None
    hvg: np.ndarray | None = None

    @property
    def total_var(self) -> float:
        """Sum over all genes of the per-gene variance (the denominator of the overall fraction)."""
        return float(self.gene_var.sum())

    @property
    def metric(self) -> np.ndarray:
        """(k, k) L L^T: tr(C metric) sums a score covariance C over genes."""
        return self.loadings @ self.loadings.T

    def captured_fraction(self) -> float:
        """Fraction of total gene variance the read-out from the scores captures."""
        return 1.0 - float(self.resid_sq.mean()) / self.total_var


def _source_matrix(adata, use_raw: bool, layer: str | None):
    if use_raw:
        if adata.raw is None:
            raise AnalysisInputError("use_raw=True but the AnnData has no .raw")
        return adata.raw.X, np.asarray(adata.raw.var_names).astype(str)
    if layer is not None:
        if layer not in adata.layers:
            raise AnalysisInputError(f"layer {layer!r} not found; layers: {list(adata.layers.keys())}")
        return adata.layers[layer], np.asarray(adata.var_names).astype(str)
    return adata.X, np.asarray(adata.var_names).astype(str)


def _dense(block) -> np.ndarray:
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def detect_input_kind(block: np.ndarray, where: str) -> str:
    """"counts" for non-negative integers, "lognorm" for other non-negative values; else an error."""
    if (block < 0).any():
        raise AnalysisInputError(
            f"{where}: has negative values (scaled / centred data?). Pass raw counts or "
            "log-normalised values (e.g. use_raw=True for scanpy's pbmc68k_reduced, or layer=...)"
        )
    return "counts" if np.allclose(block, np.round(block)) else "lognorm"


def iter_lognorm(adata, input_kind: InputKind = "auto", use_raw: bool = False, layer: str | None = None,
                 chunk_size: int = 10000, target_sum: float = 1e4, rows: np.ndarray | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """Stream log-normalised expression log1p(x / library * target_sum) in row chunks.

    Works on in-memory and backed AnnData alike (a backed matrix is read one chunk at a time).

    Args:
      adata: AnnData (may be backed).
      input_kind: "counts", "lognorm" (used as is) or "auto" (decided on the first chunk).
      rows: optional sorted row indices to restrict to.
    Yields:
      (row_indices (c,), values (c, G) float64, input_kind).
    """
    x, _ = _source_matrix(adata, use_raw, layer)
    ids = cell_ids(adata)
    n = x.shape[0]
    kind = input_kind
    for start in range(0, n, chunk_size):
        idx = np.arange(start, min(start + chunk_size, n))
        if rows is not None:
            idx = np.intersect1d(idx, rows)
            if not len(idx):
                continue
        block = _dense(x[idx[0] : idx[-1] + 1])[idx - idx[0]]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise AnalysisInputError(
                f"expression matrix: {bad.sum()} cell(s) have NaN/Inf values, e.g. {ids[idx[bad]][:5].tolist()}"
            )
        if kind == "auto":
            kind = detect_input_kind(block, "expression matrix")
        elif kind == "counts" and (block < 0).any():
            raise AnalysisInputError("expression matrix: input_kind='counts' but it has negative values")
        if kind == "counts":
            lib = block.sum(axis=1)
            if (lib <= 0).any():
                raise AnalysisInputError(
                    f"expression matrix: cells with zero total counts: {ids[idx[lib <= 0]][:5].tolist()}"
                )
            block = np.log1p(block / lib[:, None] * target_sum)
        elif kind != "lognorm":
            raise AnalysisInputError(f"input_kind={kind!r}: use 'auto', 'counts' or 'lognorm'")
        yield idx, block, kind


def _gene_moments(chunks) -> tuple[np.ndarray, np.ndarray, int, str]:
    s = ss = 0.0
    n, kind = 0, "lognorm"
    for idx, block, kind in chunks:
        s = s + block.sum(0)
        ss = ss + (block**2).sum(0)
        n += len(idx)
    mean = s / n
    return mean, (ss - n * mean**2) / (n - 1), n, kind


def embed_expression(adata, n_comps: int = 50, input_kind: InputKind = "auto", use_raw: bool = False,
                     layer: str | None = None, n_top_genes: int | None = None, obsm_key: str | None = None,
                     chunk_size: int | None = None, target_sum: float = 1e4, seed: int = 0
                     ) -> ExpressionEmbedding:
    """Expression embedding with gene read-out (see module docstring).

    Args:
      adata: AnnData, backed AnnData, or a path to an .h5ad (opened backed).
      n_comps: PCA components (capped at min(N, G) - 1).
      input_kind: "counts" (normalised + log1p here), "lognorm" (already log-normalised), "auto".
      use_raw / layer: where the expression values are (default X).
      n_top_genes: optional HVG count for the PCA (seurat flavour in memory, top log-variance when
        streaming); all genes still count in the total variance and get a read-out.
      obsm_key: use adata.obsm[obsm_key] as the embedding instead of PCA.
      chunk_size: stream in chunks of this many cells (default: stream only for backed data).
      target_sum: library-size normalisation target.
      seed: PCA seed.
    Returns:
      ExpressionEmbedding.
    """
    if isinstance(adata, str):
        import anndata

        adata = anndata.read_h5ad(adata, backed="r")
    n, g = adata.shape[0], (adata.raw.shape[1] if use_raw and adata.raw is not None else adata.shape[1])
    if n < 3:
        raise AnalysisInputError(f"expression: {n} cells are too few for an embedding")
    streaming = bool(getattr(adata, "isbacked", False)) or chunk_size is not None
    chunk = chunk_size or (10000 if streaming else n)
    stream = lambda: iter_lognorm(adata, input_kind, use_raw, layer, chunk, target_sum)  # noqa: E731
    gene_mean, gene_var, _, kind = _gene_moments(stream())
    _, gene_names = _source_matrix(adata, use_raw, layer)
    components = hvg = None
    if obsm_key is not None:
        if obsm_key not in adata.obsm:
            raise AnalysisInputError(f"obsm key {obsm_key!r} not found; have {list(adata.obsm.keys())}")
        scores = np.asarray(adata.obsm[obsm_key], dtype=np.float64)
        bad = ~np.isfinite(scores).all(axis=1)
        if bad.any():
            raise AnalysisInputError(f"obsm[{obsm_key!r}]: NaN/Inf rows for cells {cell_ids(adata)[bad][:5].tolist()}")
        scores = scores - scores.mean(0)
    else:
        k = min(n_comps, n - 1, g - 1)
        if n_top_genes is not None and n_top_genes < g:
            if streaming:
                hvg = np.zeros(g, bool)
                hvg[np.argsort(-gene_var)[:n_top_genes]] = True
            else:
                hvg = _scanpy_hvg(adata, use_raw, layer, kind, target_sum, n_top_genes)
            k = min(k, int(hvg.sum()) - 1)
        mask = np.ones(g, bool) if hvg is None else hvg
        if streaming:
            from sklearn.decomposition import IncrementalPCA

            ipca = IncrementalPCA(n_components=k)
            for _, block, _ in stream():
                if len(block) >= k:  # IncrementalPCA needs >= k rows per partial_fit
                    ipca.partial_fit(block[:, mask] - gene_mean[mask])
            comp = ipca.components_
        else:
            comp = _scanpy_pca(adata, use_raw, layer, kind, target_sum, k, mask, seed)
        components = np.zeros((comp.shape[0], g))
        components[:, mask] = comp
        scores = np.concatenate([(b - gene_mean) @ components.T for _, b, _ in stream()])
        scores -= scores.mean(0)
    loadings, resid_sq = _readout(stream, scores, gene_mean)
    return ExpressionEmbedding(scores, loadings, gene_mean, gene_var, resid_sq, gene_names,
                               cell_ids(adata), obsm_key or "pca", kind, components, hvg)


def _lognorm_anndata(adata, use_raw, layer, kind, target_sum):
    import anndata
    import scanpy as sc

    x, names = _source_matrix(adata, use_raw, layer)
    a = anndata.AnnData(x.copy().astype(np.float32))
    a.var_names = names
    if kind == "counts":
        sc.pp.normalize_total(a, target_sum=target_sum)
        sc.pp.log1p(a)
    return a


def _scanpy_hvg(adata, use_raw, layer, kind, target_sum, n_top_genes) -> np.ndarray:
    import scanpy as sc

    a = _lognorm_anndata(adata, use_raw, layer, kind, target_sum)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top_genes, flavor="seurat")
    return np.asarray(a.var["highly_variable"], bool)


def _scanpy_pca(adata, use_raw, layer, kind, target_sum, k, mask, seed) -> np.ndarray:
    import scanpy as sc

    a = _lognorm_anndata(adata, use_raw, layer, kind, target_sum)
    sc.pp.pca(a, n_comps=k, mask_var=mask, random_state=seed, dtype="float64", svd_solver="arpack")
    return np.asarray(a.varm["PCs"], np.float64).T[:, mask]


def _readout(stream, scores: np.ndarray, gene_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares read-out of centred genes from centred scores, and per-cell residuals (2 passes)."""
    ztz = scores.T @ scores
    ztx = 0.0
    for idx, block, _ in stream():
        ztx = ztx + scores[idx].T @ (block - gene_mean)
    loadings = np.linalg.solve(ztz + 1e-10 * np.trace(ztz) * np.eye(len(ztz)), ztx)
    resid_sq = np.empty(len(scores))
    for idx, block, _ in stream():
        resid_sq[idx] = (((block - gene_mean) - scores[idx] @ loadings) ** 2).sum(1)
    return loadings, resid_sq


def check_groups(labels, min_cells: int, name: str) -> np.ndarray:
    """Labels as a str array; errors when any group has fewer than ``min_cells`` cells."""
    labels = np.asarray(labels).astype(str)
    u, c = np.unique(labels, return_counts=True)
    if len(u) < 2:
        raise AnalysisInputError(f"{name}: need at least 2 groups, got {u.tolist()}")
    small = u[c < min_cells]
    if len(small):
        raise AnalysisInputError(
            f"{name}: groups with fewer than {min_cells} cells: "
            + ", ".join(f"{s}={c[u == s][0]}" for s in small[:10])
        )
    return labels
