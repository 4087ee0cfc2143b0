"""Coverage of the CI with and without the learning-curve rate band, from `ci_coverage.py` rows.

The band (``variance.refit_decompose(band_rate=a)``, ``--config.extrapolate_band_rate``) is a
deterministic function of what every row already holds: the rate-1 interval and the learning
curve (mean over re-fits of the estimate at training shares 1 and f). It moves the interval by
g = (w_a - w_1) (q(1) - q(f)), w_a = f^a / (1 - f^a), on the side g points to, clipped to [0, 1],
so rows written before the band existed give the coverage it would have had on the same fits.

  python experiments/rate_band_coverage.py notes/coverage/coverage.json notes/coverage/texture/coverage.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

SIDES = ("expr_var_explained_by_morph", "morph_var_explained_by_expr")


def banded(est: dict, rate: float) -> tuple[float, float]:
    """(ci_low, ci_high) of a row's estimate with the rate band at ``rate``."""
    curve = {float(k): v for k, v in est["learning_curve"].items()}
    f = min(curve)
    gap = (f**rate / (1 - f**rate) - f / (1 - f)) * (curve[1.0] - curve[f])
    low, high = est["ci_low"] + min(gap, 0.0), est["ci_high"] + max(gap, 0.0)
    return float(np.clip(low, 0, 1)), float(np.clip(high, 0, 1))


def summarise(path: str, rate: float) -> dict:
    rows = json.load(open(path))["rows"]
    out = {"file": path, "datasets": len(rows)}
    for side in SIDES:
        plain = [(r[side]["ci_low"], r[side]["ci_high"]) for r in rows]
        band = [banded(r[side], rate) for r in rows]
        truth = [r["truth"][side] for r in rows]
        out[side] = {name: {"coverage": float(np.mean([lo <= t <= hi for (lo, hi), t in zip(ci, truth)])),
                            "mean_width": float(np.mean([hi - lo for lo, hi in ci]))}
                     for name, ci in (("rate_1", plain), (f"band_{rate:g}", band))}
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("coverage_json", nargs="+", help="OUT/coverage.json files of experiments/ci_coverage.py")
    p.add_argument("--rate", type=float, default=0.5)
    args = p.parse_args(argv)
    results = [summarise(path, args.rate) for path in args.coverage_json]
    for res in results:
        print(f"{res['file']} ({res['datasets']} datasets)")
        for side in SIDES:
            print("  " + side + ": " + "; ".join(f"{k} coverage {v['coverage']:.2f}, mean width {v['mean_width']:.3f}"
                                                   for k, v in res[side].items()))
    return results


if __name__ == "__main__":
    main()
