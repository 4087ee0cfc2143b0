"""Ground truth from pixels, through the user's path.

The test runs what a user types: `cosmic data synthetic` writes paired crops + counts with a known
truth, and `cosmic analyze --quick` takes the morphology from the pixels only: the MAE embedding of
the crops (pretrained on the first dataset's crops, then reused with --mae as a foundation model is)
plus features measured from the crops (the 8 core features, the targets, and the generic profile of
`morph_features.PROFILE_NAMES` as extra input). Nothing of the generator's internals (render
parameters, latents) reaches the analysis; the truth is read only by `cosmic_jax.evaluation`
afterwards. Both commands run in a subprocess with one CPU device, as a user's run has (the suite
forces 8 host devices, under which a one-device joint fit ran ~1.8x slower on this 2-core box). Targets (issue
11, item 2): overall within 0.03 of the truth in both directions, per-gene Spearman >= 0.95, >= 80 %
of genes within 0.05, at expression truths spanning 0.1-0.7.

Those targets are NOT met yet (notes/science.md, rounds 3-4): at F = 0.65 the expression side reads
~0.036 low (0.049 before the learning-curve extrapolation) with ~80 % of genes within 0.05, and the
morphology side ~0.02-0.03 low; even the generator's exact render parameters read 0.017 low without
the extrapolation. So the test asserts a regression guard
(what the landed code reaches, with a margin: a change that loses morphology fails) and reports the
issue's targets as an expected failure, naming each one missed; it passes outright once they hold.
"""

import json
import os
import subprocess
import sys

import pytest

from cosmic_jax.analysis.variance import HEADLINE

CELLS = 3000
CASES = ((0.15, 1), (0.65, 2))  # (expression truth, data seed)
TARGET = {"error": 0.03, "spearman": 0.95, "within": 0.80}  # issue 11, item 2
# Measured (round 3, before the extrapolation): errors -0.012 / -0.033 (F = 0.15) and -0.049 / -0.016
# (F = 0.65), genes within 0.05 0.88 / 0.61; with it (round 4, one re-fit): about -0.006 / -0.033 and
# -0.036 / -0.017, genes within 0.05 ~0.86 / 0.80.
GUARD = {"error": 0.065, "spearman": 0.95, "within": 0.50}


def _cosmic(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's CPU run
    r = subprocess.run([sys.executable, "-m", "cosmic_jax.cli", *args], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"cosmic {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_decomposition_from_pixels_recovers_truth(tmp_path):
    # For time: the side representations (MAE alone, features alone) do not enter the headline, and
    # one re-fit (two cross-fits with the extrapolation) instead of quick's two moves a point
    # estimate by ~0.003 (re-fit spread at F = 0.65), far inside the 0.03 target.
    quick = ["--quick", "--config.refit_repeats_side=0", "--config.refit_repeats=1"]
    mae, lines, missed = [], [], {"guard": [], "target": []}
    for frac, seed in CASES:
        data, work = str(tmp_path / f"syn{frac}"), str(tmp_path / f"w{frac}")
        _cosmic("data", "synthetic", "--out", data, "--cells", str(CELLS), "--seed", str(seed),
                "--shared-fraction", str(frac), "--config", "quick")
        _cosmic("analyze", "--data", data, "--workdir", work, *quick, *mae)
        mae = mae or ["--mae", os.path.join(work, "mae")]
        with open(os.path.join(work, "analysis", "summary.json")) as f:
            summary = json.load(f)
        truth = summary["truth"]
        for key in HEADLINE:
            est, want = summary[key], truth[key]
            lines.append(f"F={frac} {key}: {est['estimate']:.3f} ({est['ci_low']:.3f}-{est['ci_high']:.3f}) "
                         f"truth {want:.3f}")
            for kind, bar in (("guard", GUARD), ("target", TARGET)):
                if abs(est["estimate"] - want) > bar["error"]:
                    missed[kind].append(lines[-1])
        lines.append(f"F={frac} per-gene Spearman {truth['per_gene_spearman']:.3f}, "
                     f"genes within 0.05 {truth['genes_within_0.05']:.2f}")
        for kind, bar in (("guard", GUARD), ("target", TARGET)):
            if truth["per_gene_spearman"] < bar["spearman"] or truth["genes_within_0.05"] < bar["within"]:
                missed[kind].append(lines[-1])
    print("\n".join(lines))
    assert not missed["guard"], "below the regression guard:\n" + "\n".join(missed["guard"])
    if missed["target"]:
        pytest.xfail("issue 11 targets not met yet: " + "; ".join(missed["target"]))
