"""Paired import: a lab's own counts (AnnData) and one image per cell -> a dataset ``cosmic analyze`` reads.

``cosmic data paired --adata CELLS.h5ad --images IMAGES --out DIR [--masks MASKS]`` writes

- ``DIR/cells.h5ad``: the counts in X (from X, ``--layer NAME`` or ``--use-raw``), ``obs['cell_id']``
  and obs_names = the cell ids; the input's obs, var, obsm, varm, obsp and uns are kept (layers and
  raw are not: X is the one expression matrix downstream code reads);
- ``DIR/crops``: a crop dataset (``cosmic_jax.data.records.write_shards``), one record per cell,
  keyed by cell_id, in AnnData row order.

Cell ids: ``obs[--cell-id-key]``, else ``obs['cell_id']`` when present, else obs_names; they must be
unique and non-empty.

IMAGES (and MASKS) is either

- a *stack*: a ``.npy`` file or a multi-page TIFF of shape (N, H, W) or (N, H, W, C) (channels last),
  one image per AnnData row, in row order; or
- a *folder* of per-cell files ``<cell_id>.<tif|tiff|png|npy>`` (images (H, W) or (H, W, C)); every
  cell needs exactly one file and every such file must name a cell.

Masks are (H, W) per cell, integer or bool; pixels where the mask is 0 are set to 0 (and left out
of the normalisation statistics). All images must share one shape. Non-square images are padded
to square with zeros, centred (``pad_top``/``pad_left`` and the original ``height``/``width`` are in
each record's metadata), because the MAE takes square crops.

Pixel values (``norm``, ``--config.crop.norm``):

- ``dataset`` (default): per channel ``clip(x / p99.9, 0, 1)`` with one p99.9 over the cells' pixels
  (their masks, or the whole images) of the whole dataset, float32: one linear scale for every
  cell, so differences in brightness between cells (a biological signal) survive; ready for
  pretraining.
- ``crop``: per cell and channel ``clip((x - p1) / (p99 - p1), 0, 1)`` over the cell's pixels, like
  ``cosmic data nuclei``'s default: robust to illumination differences, but erases brightness.
- ``none``: the source pixels unchanged, in the source dtype (integer stays integer, so compact
  storage can keep them losslessly); for users who normalise through the model config.

Every record's metadata carries ``source_dtype`` (the image's dtype before normalisation).
The output is built in a staging folder and swapped in only when complete (:mod:`outdir`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator

import anndata
import numpy as np

from cosmic_jax.data import records
from cosmic_jax.data.anndata_io import read_h5ad
from cosmic_jax.data.cells import cell_ids
from data_builders import images as images_lib
from data_builders import outdir

log = logging.getLogger(__name__)

NORMS = ("dataset", "crop", "none")
STACK_EXTENSIONS = (".npy", ".tif", ".tiff")
CELL_FILE_EXTENSIONS = (".tif", ".tiff", ".png", ".npy")
OUT_PATTERNS = ("cells.h5ad", "crops")
WHAT = "paired dataset (cells.h5ad + crops)"


class PairedError(ValueError):
    """The AnnData and the images do not pair up; the message names the file and cell at fault."""


@dataclasses.dataclass
class CellImages:
    """Random access to one image per cell, in AnnData row order."""

    path: str  # the stack file or the folder
    n: int
    get: Callable[[int], np.ndarray]  # row -> (H, W[, C]) array as stored
    where: Callable[[int], str]  # row -> file (and index) for messages


def read_counts(adata, path: str, layer: str | None = None, use_raw: bool = False):
    """(counts matrix, var DataFrame) from X, a layer or ``.raw``; refuses values that are not counts."""
    if layer is not None and use_raw:
        raise PairedError("pass --layer or --use-raw, not both")
    if layer is not None:
        if layer not in adata.layers:
            raise PairedError(f"{path}: has no layer {layer!r}; layers: {list(adata.layers.keys())}")
        x, var, what = adata.layers[layer], adata.var, f"layers[{layer!r}]"
    elif use_raw:
        if adata.raw is None:
            raise PairedError(f"{path}: --use-raw given but the AnnData has no .raw")
        x, var, what = adata.raw.X, adata.raw.var, "raw.X"
    else:
        x, var, what = adata.X, adata.var, "X"
    bad = _first_non_count(x)
    if bad is not None:
        row, col, value, reason = bad
        hints = [f"--layer NAME (layers: {list(adata.layers.keys())})"]
        if adata.raw is not None and not use_raw:
            hints.append(f"--use-raw (.raw holds {adata.raw.shape[1]} genes)")
        raise PairedError(
            f"{path}: {what} is not raw counts ({reason}, e.g. {value!r} for cell {adata.obs_names[row]!r}, "
            f"gene {var.index[col]!r}); pass counts via {' or '.join(hints)}"
        )
    return x, var


def _first_non_count(x) -> tuple[int, int, float, str] | None:
    """(row, col, value, reason) of the first negative or non-integer entry, or None."""
    import scipy.sparse as sp

    if sp.issparse(x):
        x = sp.csr_matrix(x)
        data = x.data
    else:
        data = np.asarray(x).ravel()
    for reason, bad in (("negative values", lambda d: d < 0), ("non-integer values", _non_integer)):
        hits = np.flatnonzero(bad(data))
        if len(hits):
            k = int(hits[0])
            if sp.issparse(x):
                row, col = int(np.searchsorted(x.indptr, k, side="right") - 1), int(x.indices[k])
            else:
                row, col = divmod(k, x.shape[1])
            return row, col, float(data[k]), reason
    return None


def _non_integer(d: np.ndarray) -> np.ndarray:
    if d.dtype.kind in "uib":
        return np.zeros(d.shape, bool)
    return ~np.isfinite(d) | (d != np.round(d))


def paired_cell_ids(adata, path: str, key: str | None = None) -> list[str]:
    """The cell ids (``cosmic_jax.data.cells.cell_ids``); empty ids are errors too."""
    ids = [str(v) for v in cell_ids(adata, key, where=path)]
    if "" in ids:
        raise PairedError(f"{path}: cell {ids.index('')} has an empty cell id")
    return ids


def open_cell_images(spec: str, ids: list[str], what: str = "image") -> CellImages:
    """A stack file or a folder of ``<cell_id>.<ext>`` files, checked against the cell ids."""
    if os.path.isdir(spec):
        return _open_folder(spec, ids, what)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"{what}s not found: {spec}")
    if not spec.lower().endswith(STACK_EXTENSIONS):
        raise PairedError(f"{spec}: a {what} stack must be {', '.join(STACK_EXTENSIONS)}, or give a folder")
    stack = _read_stack(spec, what)
    if stack.ndim not in (3, 4):
        raise PairedError(f"{spec}: {what} stack has shape {stack.shape}; expected (N, H, W) or (N, H, W, C)")
    if stack.shape[0] != len(ids):
        raise PairedError(f"{spec}: {what} stack holds {stack.shape[0]} images but the AnnData has {len(ids)} cells")
    return CellImages(spec, len(ids), lambda i: np.asarray(stack[i]), lambda i: f"{spec} [{i}] (cell {ids[i]!r})")


def _read_stack(path: str, what: str) -> np.ndarray:
    try:
        if path.lower().endswith(".npy"):
            return np.load(path, mmap_mode="r", allow_pickle=False)
        import tifffile

        try:
            return tifffile.memmap(path, mode="r")  # uncompressed contiguous TIFFs: no full read
        except ValueError:
            return tifffile.imread(path)
    except Exception as e:  # readers raise many types; all mean "unreadable"
        raise PairedError(f"{path}: unreadable {what} stack ({type(e).__name__}: {e})") from e


def _open_folder(folder: str, ids: list[str], what: str) -> CellImages:
    files: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in CELL_FILE_EXTENSIONS or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in files:
            raise PairedError(f"{folder}: cell {stem!r} has two {what} files ({os.path.basename(files[stem])}, {name})")
        files[stem] = os.path.join(folder, name)
    id_set = set(ids)
    missing = [i for i in ids if i not in files]
    extra = sorted(s for s in files if s not in id_set)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} cell(s) have no {what} file, e.g. {missing[:5]}")
        if extra:
            parts.append(f"{len(extra)} file(s) name no cell of the AnnData, e.g. {[os.path.basename(files[s]) for s in extra[:5]]}")
        raise PairedError(f"{folder}: " + "; ".join(parts) + f" (files must be named <cell_id>{'|'.join(CELL_FILE_EXTENSIONS)})")
    paths = [files[i] for i in ids]
    return CellImages(folder, len(ids), lambda i: images_lib.read_array(paths[i], what), lambda i: f"{paths[i]} (cell {ids[i]!r})")


def pad_square(img: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Zero-pad (H, W, C) to (S, S, C), S = max(H, W), centred; returns (padded, top, left)."""
    h, w = img.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    if h == w:
        return img, 0, 0
    out = np.zeros((s, s) + img.shape[2:], img.dtype)
    out[top : top + h, left : left + w] = img
    return out, top, left


def cell_crop(img: np.ndarray, mask: np.ndarray | None, norm: str,
              scale: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One cell's image (H, W, C) -> (square crop, metadata) following the module's rules.

    ``scale``: the dataset's per-channel p99.9 (``norm="dataset"``, :func:`dataset_scale`).
    """
    inside = np.ones(img.shape[:2], bool) if mask is None else mask != 0
    meta: dict[str, Any] = {"source_dtype": img.dtype.str, "norm": norm, "height": img.shape[0], "width": img.shape[1]}
    if mask is not None:
        meta["area"] = int(inside.sum())
        img = np.where(inside[..., None], img, np.zeros((), img.dtype))
    if norm == "crop":
        values = img[inside].astype(np.float64)  # (n_inside, C)
        if len(values) == 0:
            lo = hi = np.zeros(img.shape[2])
        else:
            lo, hi = np.percentile(values, [1, 99], axis=0)
        hi = np.where(hi <= lo, lo + 1.0, hi)  # flat channel: avoid 0/0
        img = np.where(inside[..., None], np.clip((img - lo) / (hi - lo), 0.0, 1.0), 0.0).astype(np.float32)
        meta["norm_lo"], meta["norm_hi"] = lo.tolist(), hi.tolist()
    elif norm == "dataset":
        img = np.where(inside[..., None], np.clip(img / scale, 0.0, 1.0), 0.0).astype(np.float32)
        meta["norm_hi"] = scale.tolist()
    img, meta["pad_top"], meta["pad_left"] = pad_square(img)
    return img, meta


def dataset_scale(imgs: CellImages, msks: CellImages | None, max_cells: int = 500) -> np.ndarray:
    """Per-channel p99.9 of the cells' pixels (inside their masks) over up to ``max_cells`` cells
    spread evenly over the dataset; 1 where a channel is all zero."""
    n = imgs.n
    values = []
    for i in np.unique(np.linspace(0, n - 1, min(n, max_cells)).round().astype(int)):
        img = np.asarray(imgs.get(i), np.float64)
        img = img[..., None] if img.ndim == 2 else img
        inside = np.ones(img.shape[:2], bool) if msks is None else np.asarray(msks.get(i)) != 0
        if inside.shape == img.shape[:2]:  # a mismatched mask is reported by the import loop
            values.append(img[inside])
    hi = np.percentile(np.concatenate(values), 99.9, axis=0) if values else np.ones(1)
    return np.where(hi > 0, hi, 1.0)


def build_paired(
    adata_path: str,
    images: str,
    out_dir: str,
    masks: str | None = None,
    cell_id_key: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    norm: str = "dataset",
    records_per_shard: int = 4096,
    float_storage: str = "uint16",
) -> dict[str, Any]:
    """Write ``out_dir/cells.h5ad`` and ``out_dir/crops`` from an AnnData and per-cell images.

    Args:
      adata_path: ``.h5ad`` with one row per cell.
      images: image stack file or folder (module docstring).
      out_dir: output folder (absent, empty or an earlier paired dataset; replaced only on success).
      masks: optional mask stack or folder, same layout as ``images``.
      cell_id_key: obs column holding the cell ids.
      layer / use_raw: where the counts are (default X).

    Returns:
      Summary: paths, number of cells, image shape and dtype.
    """
    if norm not in NORMS:
        raise ValueError(f"crop.norm must be one of {NORMS} for paired data, got {norm!r}")
    adata = read_h5ad(adata_path)
    if adata.n_obs == 0:
        raise PairedError(f"{adata_path}: the AnnData has no cells")
    ids = paired_cell_ids(adata, adata_path, cell_id_key)
    counts, var = read_counts(adata, adata_path, layer, use_raw)
    imgs = open_cell_images(images, ids, "image")
    msks = open_cell_images(masks, ids, "mask") if masks is not None else None
    scale = dataset_scale(imgs, msks) if norm == "dataset" else None
    head: dict[str, Any] = {}

    def crops() -> Iterator[bytes]:
        for i, cid in enumerate(ids):
            img = imgs.get(i)
            images_lib.check_pixels(img, imgs.where(i))
            img = img[..., None] if img.ndim == 2 else img
            if img.ndim != 3:
                raise PairedError(f"{imgs.where(i)}: image has shape {img.shape}; expected (H, W) or (H, W, C)")
            if not head:
                head.update(shape=img.shape, dtype=img.dtype, where=imgs.where(i))
            elif img.shape != head["shape"] or img.dtype != head["dtype"]:
                raise PairedError(
                    f"{imgs.where(i)}: image is {img.shape} {img.dtype} but {head['where']} is "
                    f"{head['shape']} {head['dtype']}; all images must share one shape and dtype"
                )
            mask = None
            if msks is not None:
                mask = np.asarray(msks.get(i))
                if mask.dtype != bool:
                    images_lib.check_labels(mask, msks.where(i))
                if mask.shape != img.shape[:2]:
                    raise PairedError(
                        f"{msks.where(i)}: mask shape {mask.shape} does not match the image "
                        f"{imgs.where(i)} ({img.shape[:2]})"
                    )
            crop, meta = cell_crop(img, mask, norm, scale)
            yield records.encode_record(crop, cid, {"row": i, "source": imgs.where(i), **meta})

    with outdir.staged_dir(out_dir, OUT_PATTERNS, WHAT) as tmp:
        manifest = records.write_shards(
            crops(), os.path.join(tmp, "crops"), records_per_shard=records_per_shard, float_storage=float_storage,
            extra={"build": {"kind": "paired", "adata": os.path.abspath(adata_path),
                             "images": os.path.abspath(images), "masks": masks and os.path.abspath(masks),
                             "params": {"norm": norm, "records_per_shard": records_per_shard}}},
        )  # fmt: skip
        out = anndata.AnnData(
            X=counts, obs=adata.obs.copy(), var=var.copy(), obsm=dict(adata.obsm), uns=dict(adata.uns),
            varm=dict(adata.varm) if not use_raw else None, obsp=dict(adata.obsp),
        )  # fmt: skip
        out.obs_names = ids
        out.obs["cell_id"] = ids
        out.write_h5ad(os.path.join(tmp, "cells.h5ad"))
    summary = {
        "out": os.path.abspath(out_dir),
        "n_cells": len(ids),
        "n_genes": int(out.n_vars),
        "image_shape": manifest["image_shape"],
        "source_dtype": np.dtype(head["dtype"]).str,
        "norm": norm,
    }
    log.info("paired %s: %s", out_dir, summary)
    return summary
