"""Where `cosmic report` spends its time, and the joint-latent UMAP with and without precomputed neighbours.

    python experiments/bench_report.py --workdir demo_out/analysis_run [--repeats 3]

Each measurement runs in a fresh process (numba compiles umap's kernels once per process, and
that compile is part of what a user waits for) and reports CPU seconds (``time.process_time``;
wall-clock is noisy on a shared machine): the whole report, the same report rebuilt (its UMAP
coordinates cached beside the figures), and the UMAP alone both ways.
Results: notes/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPORT = """
import json, sys, time
from cosmic_jax.workflows import report
c = time.process_time()
report.write_report(sys.argv[1], out_path=sys.argv[2])
print(json.dumps({"cpu_s": time.process_time() - c}))
"""

UMAP = """
import json, sys, time, warnings
import numpy as np
c = time.process_time()
import umap
z = np.load(sys.argv[1])["z"]
warnings.filterwarnings("ignore")
if sys.argv[2] == "precomputed":
    from sklearn.neighbors import NearestNeighbors
    d, i = NearestNeighbors(n_neighbors=15).fit(z).kneighbors(z)
    umap.UMAP(n_neighbors=15, random_state=0, n_jobs=1, precomputed_knn=(i, d, None)).fit_transform(z)
else:
    umap.UMAP(n_neighbors=15, random_state=0).fit_transform(z)
print(json.dumps({"cpu_s": time.process_time() - c}))
"""


def _run(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["cpu_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a finished `cosmic analyze` workdir")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    latent = os.path.join(a.workdir, "analysis", "joint_latent.npz")
    res: dict[str, list[float]] = {"report": [], "report rebuilt": [], "umap default": [], "umap precomputed": []}
    for _ in range(a.repeats):  # interleaved, so load changes hit every variant alike
        with tempfile.TemporaryDirectory() as tmp:
            res["report"].append(_run(REPORT, a.workdir, os.path.join(tmp, "report.md")))
            res["report rebuilt"].append(_run(REPORT, a.workdir, os.path.join(tmp, "report.md")))  # cached UMAP
        res["umap default"].append(_run(UMAP, latent, "default"))
        res["umap precomputed"].append(_run(UMAP, latent, "precomputed"))
    for k, v in res.items():
        print(f"{k:<18} CPU s: median {statistics.median(v):.1f}  min {min(v):.1f}  max {max(v):.1f}  (n={len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
