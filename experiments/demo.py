"""End-to-end demo on embedded default data (what `make demo` runs).

Stages, each through the same `cosmic` commands a user would type:
  1. real nuclei crops from the fluorescence images shipped in installed packages;
  2. a synthetic IRIS-like paired dataset with known ground truth;
  3. `cosmic analyze --quick`: pretrain a small MAE, embed, fit the joint model, run the analyses;
  4. a Markdown report with PNG plots, compared against the generator's truth.

  python experiments/demo.py --out demo_out [--cells 3000] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _stage(title: str):
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--shared-fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="MAE pretraining steps (default: analyze --quick's)")
    args = p.parse_args(argv)

    from cosmic_jax.cli import main as cosmic_main

    def cosmic(argv):
        rc = cosmic_main(argv)
        if rc:
            raise SystemExit(f"demo: `cosmic {' '.join(argv)}` failed (exit {rc})")

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()

    t = _stage("1/4 real nuclei crops from shipped fluorescence images")
    cosmic(["data", "nuclei", "--demo", "--out", os.path.join(out, "nuclei")])
    timings["nuclei_crops_s"] = time.perf_counter() - t

    t = _stage("2/4 synthetic IRIS-like paired dataset")
    synth = os.path.join(out, "synthetic")
    cosmic(["data", "synthetic", "--out", synth, "--cells", str(args.cells), "--seed", str(args.seed),
            "--shared-fraction", str(args.shared_fraction)])
    timings["synthetic_s"] = time.perf_counter() - t

    t = _stage("3/4 pretrain MAE, embed, fit joint model, analyses")
    work = os.path.join(out, "analysis_run")
    cmd = ["analyze", "--data", synth, "--workdir", work, "--quick"]
    if args.steps:
        cmd += ["--pretrain-steps", str(args.steps)]
    cosmic(cmd)
    timings["analyze_s"] = time.perf_counter() - t

    t = _stage("4/4 report")
    from cosmic_jax.analysis.report import write_report

    report = write_report(
        workdir=work, data_dir=synth, nuclei_dir=os.path.join(out, "nuclei"), out_path=os.path.join(out, "report.md")
    )
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    print(f"\nreport: {report}\ntotal {timings['total_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
