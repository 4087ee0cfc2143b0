"""Responder vs resistant cells (among treated cells): which genes / features differ, and can
morphology alone predict response?

Per variable: Cohen's d (pooled sd), difference of means, log2 fold change (expression: on
expm1 of log-normalised means, scanpy's convention), Welch t test and Mann-Whitney U, both with
Benjamini-Hochberg FDR (scipy.stats.false_discovery_control).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cosmic_jax.analysis.expression import check_groups
from cosmic_jax.analysis.variance import AnalysisInputError, check_matrix


def bh_adjust(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN p-values stay NaN and are not counted."""
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, np.float64)
    if np.any((p < 0) | (p > 1)):
        raise AnalysisInputError("p-values must lie in [0, 1]")
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def differential(x: np.ndarray, is_case, names: Sequence[str], log_normalised: bool = False,
                 min_cells: int = 3, name: str = "values") -> list[dict]:
    """Case vs control differences per column.

    Args:
      x: (N, F) values (features, or log-normalised expression).
      is_case: (N,) bool, True = case (responder).
      names: (F,) column names.
      log_normalised: also report log2 fold change of expm1 means (expression).
      min_cells: each group needs at least this many cells.
    Returns:
      rows sorted by t-test q-value: {name, mean_case, mean_control, diff, cohen_d, [log2fc],
      t, p_t, q_t, u, p_mw, q_mw}.
    """
    from scipy.stats import mannwhitneyu, ttest_ind

    x = check_matrix(x, name)
    case = np.asarray(is_case, bool)
    if len(case) != len(x) or len(names) != x.shape[1]:
        raise AnalysisInputError(f"{name}: shape {x.shape} vs {len(case)} labels and {len(names)} names")
    check_groups(np.where(case, "case", "control"), min_cells, f"{name} case/control groups")
    a, b = x[case], x[~case]
    ma, mb = a.mean(0), b.mean(0)
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    pooled = np.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, (ma - mb) / pooled, 0.0)
        t, p_t = ttest_ind(a, b, axis=0, equal_var=False)
    const = (va == 0) & (vb == 0)
    t, p_t = np.where(const, 0.0, t), np.where(const, 1.0, p_t)
    u, p_mw = mannwhitneyu(a, b, axis=0, alternative="two-sided")
    p_mw = np.where(const, 1.0, p_mw)
    q_t, q_mw = bh_adjust(p_t), bh_adjust(p_mw)
    rows = []
    for j, nm in enumerate(names):
        r = {"name": str(nm), "mean_case": float(ma[j]), "mean_control": float(mb[j]), "diff": float(ma[j] - mb[j]),
             "cohen_d": float(d[j]), "t": float(t[j]), "p_t": float(p_t[j]), "q_t": float(q_t[j]),
             "u": float(u[j]), "p_mw": float(p_mw[j]), "q_mw": float(q_mw[j])}
        if log_normalised:
            r["log2fc"] = float(np.log2(np.expm1(ma[j]) + 1e-9) - np.log2(np.expm1(mb[j]) + 1e-9))
        rows.append(r)
    return sorted(rows, key=lambda r: (r["q_t"], -abs(r["cohen_d"])))


def response_auc(x: np.ndarray, is_case, n_folds: int = 5, seed: int = 0, name: str = "morphology") -> dict:
    """Cross-validated ROC AUC of predicting response from x with a logistic regression.

    Returns:
      {"auc": pooled out-of-fold AUC, "auc_folds": per-fold AUCs, "n_case", "n_control"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = check_matrix(x, name)
    y = np.asarray(is_case, bool)
    check_groups(np.where(y, "responder", "resistant"), n_folds, f"{name} response groups")
    prob = np.empty(len(y))
    folds = []
    for train, test in StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        prob[test] = clf.fit(x[train], y[train]).predict_proba(x[test])[:, 1]
        folds.append(float(roc_auc_score(y[test], prob[test])))
    return {"auc": float(roc_auc_score(y, prob)), "auc_folds": folds,
            "n_case": int(y.sum()), "n_control": int((~y).sum())}


def recovery(rows: list[dict], planted: Sequence[str], alpha: float = 0.05, q_key: str = "q_t") -> dict:
    """How well significant hits recover planted differences.

    Returns:
      {"recall", "precision", "n_significant", "n_planted", "missed": [...]}.
    """
    sig = {r["name"] for r in rows if r[q_key] < alpha}
    planted = set(map(str, planted))
    hit = sig & planted
    return {"recall": len(hit) / len(planted) if planted else float("nan"),
            "precision": len(hit) / len(sig) if sig else float("nan"),
            "n_significant": len(sig), "n_planted": len(planted), "missed": sorted(planted - sig)}
