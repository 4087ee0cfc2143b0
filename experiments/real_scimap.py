"""A real case: scimap's CyCIF exemplar through `cosmic analyze`, markers <-> cell shape; plus pbmc68k.

scimap ships ``scimapExampleData.h5ad`` (installed --no-deps from requirements-nodeps.txt; this
script never imports scimap, it reads the file): 11,201 cells of one tissue exemplar, 9 protein
markers (mean intensity per cell in ``.raw``) and per-cell shape measurements of the segmented
cells in ``obs``. It becomes a paired dataset ``OUT/scimap/cells.h5ad``:

* expression = the 9 markers as ``log1p(mean intensity)`` (``input_kind="lognorm"``: intensities
  are not counts, so no library-size normalisation; the log tames their right skew);
* morphology = ``obsm["shape"]``: log Area, log MajorAxisLength, log MinorAxisLength (sizes are
  log-normal-like), Eccentricity, Solidity, Extent (Orientation is left out: an angle in the slide,
  not a shape);
* cell type = ``obs["phenotype"]`` (scimap's gated phenotypes).

It is then analysed as a user would, `cosmic analyze --data OUT/scimap --workdir W --quick
--config.features_key=shape --config.input_kind=lognorm --config.label_key=phenotype
--config.response_key= --config.expr_comps=8` (morphology from obsm, no crops): both directions with
the flow, ridge and kNN. pbmc68k_reduced (scanpy's copy, log-normalised in ``.raw``) runs the
expression-side analyses only. Results: ``OUT/real_cases.json`` and a Markdown table on stdout.

  python experiments/real_scimap.py --out /tmp/real [--config.refit_repeats=3 ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import time

import anndata as ad
import numpy as np
import pandas as pd

from cosmic_jax.analysis.variance import HEADLINE
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.workflows.analyze import analyze

EXEMPLAR = ("tests", "scimapExampleData", "scimapExampleData.h5ad")
LOG_SHAPE = ("Area", "MajorAxisLength", "MinorAxisLength")
SHAPE = ("Eccentricity", "Solidity", "Extent")
SCIMAP_OVERRIDES = ["--config.features_key=shape", "--config.input_kind=lognorm", "--config.label_key=phenotype",
                    "--config.response_key=", "--config.expr_comps=8"]
PBMC_OVERRIDES = ["--config.use_raw=true", "--config.label_key=bulk_labels", "--config.response_key="]


def scimap_exemplar() -> str:
    """Path of scimap's exemplar h5ad (found without importing scimap, which pulls heavy deps)."""
    spec = importlib.util.find_spec("scimap")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scimap is not installed: pip install --no-deps -r requirements-nodeps.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], *EXEMPLAR)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: scimap's exemplar is missing from the installed package")
    return path


def scimap_dataset(out_dir: str, source: str | None = None) -> str:
    """Write the paired dataset ``out_dir/cells.h5ad`` (markers as lognorm expression, shape in obsm)."""
    src = ad.read_h5ad(source or scimap_exemplar())
    missing = [c for c in LOG_SHAPE + SHAPE + ("phenotype",) if c not in src.obs.columns]
    if missing or src.raw is None:
        raise ValueError(f"{source or scimap_exemplar()}: not scimap's exemplar (obs lacks {missing} or no .raw)")
    intensity = np.asarray(src.raw.X, np.float64)
    shape = pd.DataFrame({**{f"log_{c}": np.log(src.obs[c].to_numpy(np.float64)) for c in LOG_SHAPE},
                          **{c: src.obs[c].to_numpy(np.float64) for c in SHAPE}}, index=src.obs_names)
    out = ad.AnnData(np.log1p(intensity).astype(np.float32), obs=pd.DataFrame(index=src.obs_names),
                     var=pd.DataFrame(index=src.raw.var_names))
    out.obs["cell_id"] = src.obs_names.astype(str)
    out.obs["phenotype"] = src.obs["phenotype"].astype(str).to_numpy()
    out.obsm["shape"] = shape
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cells.h5ad")
    out.write_h5ad(path)
    return path


def pbmc_dataset(out_dir: str) -> str:
    import scanpy as sc

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cells.h5ad")
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    return path


def _row(name: str, s: dict) -> dict:
    by_rep = s.get("decomposition_by_representation", {})
    return {"case": name, "n_cells": s["expression_embedding"]["n_cells"], **{k: s.get(k) for k in HEADLINE},
            "by_representation": by_rep, "celltype": s.get("celltype"), "timings_cpu_s": s.get("timings_cpu_s")}


def _fmt(d: dict | None) -> str:
    return "–" if not d else f"{d['estimate']:.3f} ({d['ci_low']:.3f}-{d['ci_high']:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--skip-pbmc", action="store_true")
    a, extra = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    rows = []
    t, c = time.perf_counter(), time.process_time()
    data = os.path.join(a.out, "scimap")
    scimap_dataset(data)
    cfg = load_config(analyze_configs, "quick", SCIMAP_OVERRIDES + extra)
    s = analyze(data, os.path.join(a.out, "w_scimap"), cfg)
    rows.append({**_row("scimap CyCIF exemplar: 9 markers <-> 6 shape features", s),
                 "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c})
    if not a.skip_pbmc:
        t, c = time.perf_counter(), time.process_time()
        cfg = load_config(analyze_configs, "quick", PBMC_OVERRIDES + extra)
        s = analyze(None, os.path.join(a.out, "w_pbmc"), cfg, h5ad=pbmc_dataset(os.path.join(a.out, "pbmc")))
        rows.append({**_row("pbmc68k_reduced (expression only)", s),
                     "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c})
    with open(os.path.join(a.out, "real_cases.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("| case | representation | method | expression <- morphology | morphology <- expression |")
    print("|---|---|---|---|---|")
    for r in rows:
        for rep, body in r["by_representation"].items():
            for method in ("flow", "ridge", "knn"):
                print(f"| {r['case']} | {rep} | {method} | {_fmt(body[method][HEADLINE[0]])} | "
                      f"{_fmt(body[method][HEADLINE[1]])} |")
        ct = r["celltype"] or {}
        for k, v in ct.items():
            if isinstance(v, dict) and "linear" in v:
                print(f"cell type from {k}: linear {v['linear']['accuracy']:.3f}, kNN {v['knn']['accuracy']:.3f}, "
                      f"chance {v['chance']['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
