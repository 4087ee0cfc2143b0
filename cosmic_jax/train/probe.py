"""Linear and kNN probes of an embedding: the quality signal logged during pretraining."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cosmic_jax.data.records import CropSource


def probe_scores(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """5-fold cross-validated kNN (k=5) and logistic-regression accuracy of ``labels`` from ``emb``.

    Args:
      emb: (N, D) embeddings; labels: (N,) class labels.

    Returns:
      {"probe/knn_acc", "probe/linear_acc", "probe/chance"}.
    """
    _, counts = np.unique(labels, return_counts=True)
    folds = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    return {
        "probe/knn_acc": float(cross_val_score(knn, emb, labels, cv=folds).mean()),
        "probe/linear_acc": float(cross_val_score(lin, emb, labels, cv=folds).mean()),
        "probe/chance": float(counts.max() / counts.sum()),
    }


def load_probe_set(data_dir: str, label_key: str, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C), labels (N,)) from a crop dataset whose meta holds ``label_key``."""
    src = CropSource(data_dir, with_meta=True)
    n = min(max_n, len(src))
    images, labels = [], []
    for i in range(n):
        el = src[i]
        if label_key not in el["meta"]:
            raise KeyError(f"{data_dir} record {i} ({el['cell_id']}): meta has no probe label {label_key!r}")
        images.append(el["image"])
        labels.append(str(el["meta"][label_key]))
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{data_dir}: probe label {label_key!r} has a single class; nothing to probe")
    return np.stack(images), labels
