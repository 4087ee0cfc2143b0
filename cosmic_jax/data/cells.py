"""One key per cell: how every per-cell array (counts, crops, embeddings, features) is matched.

The key of an AnnData's rows is ``obs["cell_id"]`` when that column exists, else ``obs_names``.
Crops, embeddings and measured features are matched to AnnData rows by that key, never by position.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd


class CellKeyError(ValueError):
    """Cell ids are missing, duplicated or inconsistent; the message names examples."""


def cell_ids(adata: Any, id_key: str | None = None, where: str = "AnnData") -> np.ndarray:
    """The cell ids of an AnnData's rows, as a str array.

    Args:
      adata: an AnnData.
      id_key: obs column holding the ids (default ``cell_id`` when present, else obs_names).
      where: the file or object named in errors.

    Raises:
      CellKeyError: the id column is missing; ids repeat; or ``obs["cell_id"]`` and obs_names name
        the same cells in a different row order (the file contradicts itself about which row is which
        cell, so no per-cell array could be matched safely).
    """
    if id_key is not None and id_key not in adata.obs:
        raise CellKeyError(f"{where}: no obs column {id_key!r}; columns: {list(adata.obs.columns)}")
    key = id_key or ("cell_id" if "cell_id" in adata.obs else None)
    ids = np.asarray(adata.obs[key] if key else adata.obs_names).astype(str)
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dup):
        raise CellKeyError(f"{where}: {len(dup)} duplicate cell id(s) in {key or 'obs_names'}, e.g. {list(dup[:5])}")
    if key:
        names = np.asarray(adata.obs_names).astype(str)
        pos = pd.Index(ids).get_indexer(names)
        moved = np.flatnonzero((pos >= 0) & (pos != np.arange(len(names))))
        if moved.size:
            r = int(moved[0])
            raise CellKeyError(
                f"{where}: obs[{key!r}] and obs_names disagree about which row is which cell "
                f"({moved.size} rows; e.g. row {r} is {names[r]!r} in obs_names but {ids[r]!r} in obs[{key!r}], "
                f"and {names[r]!r} is row {int(pos[r])} of obs[{key!r}]); fix one of them")
    return ids


def match_ids(target: Sequence[str], source: Sequence[str], what: str = "crops",
              target_name: str = "AnnData") -> np.ndarray:
    """Index array ``order`` with ``source[order[k]] == target[k]``; strictly one-to-one.

    Args:
      target: ids in the wanted order (e.g. the AnnData's rows).
      source: ids in the stored order (e.g. a crop dataset's).
      what / target_name: names used in error messages.

    Returns:
      int64 (len(target),) indices into ``source``.
    """
    t, s = pd.Index(np.asarray(target).astype(str)), pd.Index(np.asarray(source).astype(str))
    problems = []
    for name, idx in ((target_name, t), (what, s)):
        dup = idx[idx.duplicated()].unique()
        if len(dup):
            problems.append(f"{len(dup)} duplicate cell_id(s) in {name}, e.g. {list(dup[:5])}")
    if not problems:
        order = s.get_indexer(t)
        missing = t[order < 0]
        extra = s.difference(t, sort=False)
        if len(missing):
            problems.append(f"{len(missing)} {target_name} cell_id(s) have no match in {what}, e.g. {list(missing[:5])}")
        if len(extra):
            problems.append(f"{len(extra)} cell_id(s) in {what} are not in the {target_name}, e.g. {list(extra[:5])}")
    if problems:
        raise CellKeyError(f"cannot match {what} to {target_name} cells by cell_id: " + "; ".join(problems))
    return order.astype(np.int64)
