"""Calibration summary over datasets (`evaluation.coverage_summary`, used by experiments/ci_coverage.py)."""

import numpy as np

from cosmic_jax import evaluation


def test_coverage_summary_separates_the_t_reference_from_the_variance():
    key = evaluation.HEADLINE[0]

    def result(estimate, truth, half_width, total_var, within_var, df):
        est = {"estimate": estimate, "ci_low": estimate - half_width, "ci_high": estimate + half_width,
               "total_var": total_var, "within_var": within_var, "df": df}
        err = estimate - truth
        return {key: est}, {f"{key}_error": err, f"{key}_ci_covers": abs(err) <= half_width,
                            f"{key}_bootstrap_only_ci_covers": abs(err) <= 1.96 * np.sqrt(within_var)}

    # error 0.03 at SE 0.01: covered only by a wide (small-df) t interval
    wide = result(0.50, 0.53, 0.05, 1e-4, 2e-5, 2.0)
    # error 0.01 at SE 0.01: covered by every interval
    near = result(0.30, 0.31, 0.025, 1e-4, 8e-5, 30.0)
    s = evaluation.coverage_summary([wide, near])[key]
    assert s["coverage"] == 1.0 and s["normal_reference_coverage"] == 0.5 and s["bootstrap_only_coverage"] == 0.5
    assert np.isclose(s["mean_error"], -0.02) and np.isclose(s["rmse"], np.sqrt((0.03**2 + 0.01**2) / 2))
    assert np.isclose(s["mean_ci_width"], 0.075) and s["median_df"] == 16.0
