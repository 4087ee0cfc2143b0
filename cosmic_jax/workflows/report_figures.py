"""The figures of `cosmic report`: one function per PNG, each returning its path (or None without data).

All figures use matplotlib's constrained layout (nothing clipped) and put every reference line
and colour in a legend. Inputs are the CSV rows / files `cosmic analyze` wrote.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cosmic_jax.data.records import CropSource  # noqa: E402
from cosmic_jax.train.metrics import read_metrics  # noqa: E402

ALPHA = 0.05  # FDR level the analysis calls significant (q_t < 0.05)
DPI = 110
CROP_INCHES = 1.1  # >= 96 px per crop at DPI
N_LABELLED = 8  # hits named on a volcano plot
LABEL_PT = 8  # label font size


def to_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def column(rows: list[dict[str, str]], key: str) -> np.ndarray:
    """One CSV column as floats (missing or unparsable cells are NaN)."""
    return np.array([to_float(r.get(key)) for r in rows])


def _save(fig, fig_dir: str, name: str) -> str:
    out = os.path.join(fig_dir, name)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def place_labels(ax, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    """Name points without overlaps: each label takes the first free slot beside its point.

    Slots are tried right then left of the point at growing vertical offsets; a slot is free when
    its (estimated) box overlaps no label placed before. Earlier names win, so pass the most
    important first. A thin line joins a label to its point.
    """
    fig = ax.figure
    fig.draw_without_rendering()  # constrained layout settles the axes before we measure
    px = fig.dpi / 72.0
    h = LABEL_PT * 1.35 * px
    placed: list[tuple[float, float, float, float]] = []
    x0, x1 = ax.get_window_extent().x0, ax.get_window_extent().x1
    for xi, yi, name in zip(x, y, names):
        cx, cy = ax.transData.transform((xi, yi))
        w = len(name) * LABEL_PT * 0.6 * px
        best = None
        for dy in (2, -h - 2, h + 4, -2 * h - 4, 2 * h + 6, -3 * h - 6, 3 * h + 8, -4 * h - 8):
            for side in (1, -1):
                left = cx + 6 * px if side > 0 else cx - 6 * px - w
                box = (left, cy + dy, left + w, cy + dy + h)
                if box[0] < x0 or box[2] > x1:
                    continue
                if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                    best = box
                    break
            if best:
                break
        if best is None:  # crowded: accept an overlap rather than drop a name
            best = (cx + 6 * px, cy + 2, cx + 6 * px + w, cy + 2 + h)
        placed.append(best)
        ax.annotate(name, (xi, yi), xytext=((best[0] - cx) / px, (best[1] - cy) / px), textcoords="offset points",
                    fontsize=LABEL_PT, va="bottom", ha="left",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.35", shrinkA=0, shrinkB=2))


def volcano(rows: list[dict[str, str]], fig_dir: str, name: str, title: str) -> str | None:
    """Effect size vs -log10 q; significant points coloured by direction; the top hits named."""
    if not rows:
        return None
    eff_key = "log2fc" if "log2fc" in rows[0] else "cohen_d"
    eff = column(rows, eff_key)
    q = np.nan_to_num(column(rows, "q_t"), nan=1.0)
    # q == 0 (below float precision) would sit at 300 and squash every other point: draw it on top
    floor = q[q > 0].min() / 10 if (q > 0).any() else 1e-10
    capped = q < floor
    y = -np.log10(np.maximum(q, floor))
    sig = q < ALPHA
    fig, ax = plt.subplots(figsize=(7.6, 4.8), layout="constrained")
    groups = ((~sig, "0.65", f"not significant ({int((~sig).sum())})"),
              (sig & (eff > 0), "tab:red", f"higher in responders ({int((sig & (eff > 0)).sum())})"),
              (sig & (eff <= 0), "tab:blue", f"lower in responders ({int((sig & (eff <= 0)).sum())})"))
    for sel, colour, lab in groups:
        if sel.any():
            ax.scatter(eff[sel & ~capped], y[sel & ~capped], s=14, c=colour, alpha=0.8, label=lab, edgecolors="none")
            ax.scatter(eff[sel & capped], y[sel & capped], s=36, c=colour, marker="^", edgecolors="none")
    if capped.any():
        ax.scatter([], [], marker="^", c="0.3", s=36, label=f"q = 0, drawn at {y.max():.0f}")
    ax.axhline(-np.log10(ALPHA), color="k", ls="--", lw=0.8, label=f"q = {ALPHA}")
    ax.axvline(0, color="0.8", lw=0.6)
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("log2 fold change (responder / resistant)" if eff_key == "log2fc"
                  else "Cohen's d (responder − resistant)")
    ax.set_ylabel("−log10 q (Benjamini-Hochberg)")
    ax.set_title(f"{title}: top {min(N_LABELLED, int(sig.sum()))} hits named")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    top = [i for i in np.lexsort((-np.abs(eff), q)) if sig[i]][:N_LABELLED]
    place_labels(ax, eff[top], y[top], [rows[i]["name"] for i in top])
    return _save(fig, fig_dir, name)


def per_gene_figure(rows: list[dict[str, str]], fig_dir: str) -> str | None:
    """Estimate vs truth per gene with the identity line (histogram of estimates without truth)."""
    if not rows:
        return None
    est = column(rows, "explained_fraction")
    truth = column(rows, "truth") if "truth" in rows[0] else np.full_like(est, np.nan)
    fig, ax = plt.subplots(figsize=(5.2, 4.8), layout="constrained")
    ok = np.isfinite(truth) & np.isfinite(est)
    if ok.sum() > 1:
        ax.scatter(truth[ok], est[ok], s=12, alpha=0.7, label=f"genes ({int(ok.sum())})")
        lo = float(min(0.0, est[ok].min(), truth[ok].min()))
        hi = float(max(est[ok].max(), truth[ok].max(), 1e-3)) * 1.05
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.9, label="y = x (estimate equals truth)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("true explained fraction (generator)")
        ax.set_ylabel("estimated explained fraction")
        ax.set_title("Per gene: expression variance explained\nby morphology, estimate vs truth")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.hist(est[np.isfinite(est)], bins=30, color="tab:blue")
        ax.set_xlabel("estimated explained fraction")
        ax.set_ylabel("genes")
        ax.set_title("Per gene: expression variance explained by morphology")
    return _save(fig, fig_dir, "per_gene_explained.png")


def per_feature_figure(rows: list[dict[str, str]], fig_dir: str) -> str | None:
    """Horizontal bars with 95% CIs per morphology feature; truth as markers when known."""
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: to_float(r.get("explained_fraction")))
    est, lo, hi = (column(rows, k) for k in ("explained_fraction", "ci_low", "ci_high"))
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.4, max(3.2, 1.4 + 0.3 * len(rows))), layout="constrained")
    err = np.nan_to_num(np.vstack([np.clip(est - lo, 0, None), np.clip(hi - est, 0, None)]))
    ax.barh(pos, est, xerr=err, color="tab:blue", alpha=0.8, capsize=2, label="estimate with 95% CI")
    truth = column(rows, "truth") if "truth" in rows[0] else np.full_like(est, np.nan)
    if np.isfinite(truth).any():
        ax.scatter(truth, pos, marker="D", color="tab:orange", s=24, zorder=3, label="truth (generator)")
    ax.set_yticks(pos, [r["feature"] for r in rows], fontsize=8)
    ax.set_xlim(min(0.0, float(np.nanmin(est))), 1.0)
    ax.set_xlabel("fraction of the feature's variance explained by expression")
    ax.set_title("Per morphology feature")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2)
    return _save(fig, fig_dir, "per_feature_explained.png")


def umap_coordinates(z: np.ndarray, seed: int, cache: str) -> np.ndarray:
    """2-D UMAP of ``z``; kept in ``cache`` (npz keyed by a hash of z and the seed), so rebuilding
    a report skips the numba compile and layout, most of the report's time (notes/report.md)."""
    key = hashlib.sha256(np.ascontiguousarray(z, np.float64).tobytes() + str(seed).encode()).hexdigest()
    if os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as c:
            if str(c["key"]) == key:
                return c["xy"]
    import umap  # heavy (numba); only when there is a latent to show
    from sklearn.neighbors import NearestNeighbors

    # Exact neighbours from sklearn: umap's own small-data path calls a numba metric once per
    # pair from Python, which doubled the time (notes/report.md).
    k = min(15, len(z) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(z)
    with warnings.catch_warnings():  # "transform will be unavailable": we never transform new data
        warnings.filterwarnings("ignore", message="precomputed_knn")
        xy = umap.UMAP(n_neighbors=k, random_state=seed, n_jobs=1, precomputed_knn=(idx, dist, None)).fit_transform(z)
    np.savez(cache, xy=xy, key=np.str_(key))
    return xy


def umap_figure(latent_path: str, fig_dir: str, seed: int = 0) -> str | None:
    """UMAP of the cross-fitted joint latent, coloured by cell type."""
    if not os.path.exists(latent_path):
        return None
    with np.load(latent_path, allow_pickle=False) as data:
        z, labels = data["z"], data["cell_type"].astype(str)
    xy = umap_coordinates(z, seed, os.path.join(fig_dir, "joint_umap.npz"))
    fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    for lab in np.unique(labels):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, alpha=0.8, label=f"{lab} ({int(sel.sum())})", edgecolors="none")
    ax.legend(title="cell type", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"Joint latent of {len(z)} held-out cells (UMAP)")
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, fig_dir, "joint_umap.png")


def loss_figure(mae_dir: str, fig_dir: str) -> str | None:
    """MAE training loss (W/mae/metrics.jsonl) against step."""
    if not os.path.exists(os.path.join(mae_dir, "metrics.jsonl")):
        return None
    rows = [r for r in read_metrics(mae_dir) if "loss" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6), layout="constrained")
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss (mean over the logging window)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("MAE pretraining loss")
    ax.legend(fontsize=8)
    return _save(fig, fig_dir, "mae_loss.png")


def _show(ax, img: np.ndarray) -> None:
    img = np.asarray(img, np.float32)
    img = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
    lo = float(img.min())
    fg = img[img > lo]
    hi = float(np.percentile(fg, 99.5)) if fg.size else lo + 1.0  # the nucleus's range, not the background's
    ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1), cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def crop_grid(crops_dir: str | None, fig_dir: str, name: str, title: str,
              groups: dict[str, str] | None = None, n: int = 4) -> str | None:
    """An n x n grid of crops; with ``groups`` (cell id -> group), one row per group (the first n)."""
    if not crops_dir or not glob.glob(os.path.join(crops_dir, "manifest*.json")):
        return None
    src = CropSource(crops_dir)
    if not len(src):
        return None
    rows: list[tuple[str, list[int]]] = []
    if groups:
        by_group: dict[str, list[int]] = {g: [] for g in sorted(set(groups.values()))[:n]}
        for i in range(len(src)):  # stops as soon as every row is full
            g = groups.get(str(src.read(i)["cell_id"]))
            if g in by_group and len(by_group[g]) < n:
                by_group[g].append(i)
                if all(len(v) == n for v in by_group.values()):
                    break
        rows = [(g, idx) for g, idx in by_group.items() if idx]
    if not rows:
        idx = np.linspace(0, len(src) - 1, min(n * n, len(src))).astype(int).tolist()
        rows = [("", idx[r * n:(r + 1) * n]) for r in range(n) if idx[r * n:(r + 1) * n]]
    fig, axes = plt.subplots(len(rows), n, figsize=(n * CROP_INCHES + 0.5, len(rows) * CROP_INCHES + 0.5),
                             squeeze=False, layout="constrained")
    for r, (group, idx) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            if c < len(idx):
                _show(ax, src[int(idx[c])]["image"])
            else:
                ax.axis("off")
        if group:
            axes[r][0].set_ylabel(group, fontsize=9)
    shown = sum(len(idx) for _, idx in rows)
    fig.suptitle(f"{title}: {shown} of {len(src)}", fontsize=10)
    return _save(fig, fig_dir, name)
