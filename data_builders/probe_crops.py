"""Rendered-chromatin probe crops (ring vs dome nuclei) for the pretraining tests and experiments.

Uses the synthetic generator's renderer, so it lives with the data builders (``cosmic_jax`` never
imports ``data_builders``).
"""

from __future__ import annotations

import numpy as np

from cosmic_jax.testing.crops import write_labelled_dataset
from data_builders.render import MORPH_PARAMS, render_batch


def chromatin_params(rng: np.random.Generator, n: int, profile=None, mixed: bool = False) -> dict:
    """Per-nucleus ``data_builders.render`` parameters (n,) each, drawn in a fixed order.

    ``mixed``: every parameter over a wide range. Otherwise narrow ranges, with ``profile()`` (called
    in its place in the draw order, so the stream does not shift) or a near-flat profile.
    """
    if mixed:
        return {
            "radius": rng.uniform(5.0, 10.0, n),
            "elongation": rng.uniform(1.0, 2.6, n),
            "intensity": rng.uniform(0.3, 0.6, n),
            "texture_amplitude": rng.uniform(0.02, 0.5, n),
            "profile": rng.uniform(-1.0, 1.0, n),
            "texture_scale": rng.uniform(0.7, 2.0, n),
            "nucleoli_rate": rng.uniform(0.0, 5.0, n),
            "nucleoli_brightness": rng.uniform(0.2, 0.5, n),
        }
    return {
        "radius": rng.uniform(6.0, 9.0, n),
        "elongation": rng.uniform(1.0, 1.6, n),
        "intensity": rng.uniform(0.35, 0.55, n),
        "texture_amplitude": rng.uniform(0.05, 0.15, n),
        "profile": profile() if profile is not None else rng.uniform(-0.3, 0.3, n),
        "texture_scale": rng.uniform(0.8, 1.2, n),
        "nucleoli_rate": rng.uniform(0.5, 1.5, n),
        "nucleoli_brightness": rng.uniform(0.2, 0.4, n),
    }


def chromatin_crops(n: int, size: int = 32, seed: int = 0, mixed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 1) float32 rendered nuclei (``data_builders.render``), labels (n,) in {0, 1}.

    ``mixed=False``: two classes, ring (0) and dome (1) chromatin, i.e. bright periphery vs bright
    centre (peripheral heterochromatin vs a central chromatin mass). Only the radial profile
    depends on the class (it shifts the mean crop intensity by ~10%, well inside each class's
    brightness spread); size, elongation, angle, brightness, texture and nucleoli are drawn from
    the same ranges. A random-init ViT separates these only weakly (kNN ~0.67, notes/training.md),
    unlike the blob sizes, so a probe on them can show that pretraining helped.

    ``mixed=True``: unlabelled-style pretraining crops, every morphology parameter drawn over a
    wide range (label = sign of the profile, unused by training).

    Every nucleus is moved by up to 4 px (render_batch centres them; real crops are centred only
    approximately); the vacated border is zero-filled.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    if mixed:
        params = chromatin_params(rng, n, mixed=True)
        labels = (params["profile"] > 0).astype(np.int64)
    else:
        params = chromatin_params(rng, n, profile=lambda: np.where(labels == 0, -1.0, 1.0) * rng.uniform(0.6, 1.0, n))
    rendered, _ = render_batch({k: params[k] for k in MORPH_PARAMS}, rng, image_size=size)
    images = np.zeros((n, size, size, 1), np.float32)
    for i, (dy, dx) in enumerate(rng.integers(-4, 5, (n, 2))):
        src = rendered[i, max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
        images[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1], 0] = src
    return images, labels


def write_chromatin_dataset(out_dir: str, n: int, seed: int = 0, size: int = 32, mixed: bool = False) -> str:
    """Crop dataset of ``n`` chromatin crops with meta {"cell_type": "ring"|"dome"} (see chromatin_crops)."""
    images, labels = chromatin_crops(n, size, seed, mixed)
    return write_labelled_dataset(out_dir, images, labels, ["ring", "dome"], f"r{seed}")
