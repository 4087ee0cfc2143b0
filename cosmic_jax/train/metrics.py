"""Metric writers (TensorBoard event files via tensorboardX + metrics.jsonl) and the recon grid.

Only process 0 writes; the other processes get a no-op writer so the loop code stays uniform.
``clu`` is not used because its writers need TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def _scalar(v: Any) -> float:
    return float(np.asarray(v).reshape(()))


class MetricWriter:
    """Scalars to ``W/tb`` (TensorBoard) and ``W/metrics.jsonl`` (one JSON object per step).

    Every written row is also kept in ``rows`` (the in-memory history of this process's run).

    Args:
      workdir: run directory; None keeps the rows in memory only (a fit without a workdir).
      enabled: False on non-zero processes (writes nothing).
    """

    def __init__(self, workdir: str | None, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.rows: list[dict[str, float]] = []
        self._tb = None
        self._jsonl = None
        if enabled and workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            row[k] = _scalar(v)
        self.rows.append(row)
        if self._tb is not None:
            for k, x in row.items():
                if k != "step":
                    self._tb.add_scalar(k, x, global_step=int(step))
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
        self.enabled = False


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Rows of ``W/metrics.jsonl``; when a resumed run re-logged a step, the last row wins.

    Returns:
      list of dicts sorted by step (each has ``step`` and the scalar names).
    """
    path = os.path.join(workdir, METRICS_FILE)
    rows: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
    with open(path) as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 1:  # a SIGKILL can cut the last line; earlier ones are corruption
                continue
            raise ValueError(f"{path}:{n}: not JSON: {line[:80]!r}")
        rows[(row["step"], tuple(sorted(row)))] = row
    return sorted(rows.values(), key=lambda r: r["step"])


def _to_display(img: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """(H, W, C) float -> (H, W) or (H, W, 3) in [0, 1], scaled by ``ref``'s (or its own) range."""
    img = np.asarray(img, np.float32)
    ref = img if ref is None else np.asarray(ref, np.float32)
    lo, hi = float(np.nanmin(ref)), float(np.nanmax(ref))
    if img.shape[-1] == 1:
        img = img[..., 0]
    elif img.shape[-1] == 2:  # e.g. DNA + a second stain: show as R/G
        img = np.concatenate([img, np.zeros_like(img[..., :1])], -1)
    elif img.shape[-1] > 3:
        img = img[..., :3]
    return np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)


def save_recon_grid(
    path: str,
    original: np.ndarray,
    masked: np.ndarray,
    recon: np.ndarray,
    title: str = "",
    max_images: int = 8,
) -> str:
    """PNG with one column per crop and rows original / visible patches (the masked input) / reconstruction.

    Args:
      path: output .png path (parent dirs are created).
      original, masked, recon: (N, H, W, C) arrays.
      title: figure title (e.g. "step 500").
      max_images: at most this many columns.

    Returns:
      the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, len(original))
    rows = (("original", original), ("visible patches", masked), ("reconstruction", recon))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            # one intensity scale per column (the original's), so rows are comparable
            ax.imshow(_to_display(imgs[c], original[c]), cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def img_per_sec(num_images: int, seconds: float) -> float:
    return num_images / seconds if seconds > 0 and math.isfinite(seconds) else float("nan")
