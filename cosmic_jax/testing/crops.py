"""Tiny labelled crop datasets for the training tests and the probe experiments."""

from __future__ import annotations

import numpy as np

from cosmic_jax.data.records import encode_record, write_shards


def blob_crops(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 1) float32 blurred ellipses of two classes: small (0) and large (1) nuclei.

    Position, aspect, angle, brightness and noise vary; only the radius range depends on the
    class, so a useful representation must encode size.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, size, size, 1), np.float32)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        r = rng.uniform(3.0, 5.0) if labels[i] == 0 else rng.uniform(7.0, 10.0)
        a = r * rng.uniform(0.75, 1.25)
        b = r * r / a
        th = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        img = rng.uniform(0.6, 1.0) / (1.0 + np.exp((d - 1.0) * 6.0))
        img += rng.normal(0, 0.03, img.shape)
        images[i, :, :, 0] = img
    return images, labels


def write_labelled_dataset(out_dir: str, images: np.ndarray, labels: np.ndarray, names: list[str],
                           prefix: str) -> str:
    """Crop dataset of ``images`` with meta {"cell_type": names[label]} and ids ``<prefix>_<i>``."""
    n = len(images)
    recs = (encode_record(images[i], f"{prefix}_{i:05d}", {"cell_type": str(names[labels[i]])}) for i in range(n))
    write_shards(recs, out_dir, records_per_shard=max(8, n // 3))
    return out_dir


def write_blob_dataset(out_dir: str, n: int, seed: int = 0, size: int = 32) -> str:
    """Crop dataset of ``n`` blob crops with meta {"cell_type": "small"|"large"}."""
    images, labels = blob_crops(n, size, seed)
    return write_labelled_dataset(out_dir, images, labels, ["small", "large"], f"c{seed}")
