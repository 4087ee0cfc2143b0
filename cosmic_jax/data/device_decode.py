"""Crops as stored -> float32 values, on the device inside the jitted train step.

With ``LoaderConfig.device_decode`` the loader hands over each batch as stored (uint8/uint16
pixels plus per-crop scale and offset for quantised float crops; 2-4x fewer bytes than float32),
so the reading processes skip the float conversion, about a third of their CPU per crop, and
half as many bytes cross to the accelerator. :func:`batch_images` is the conversion
``records.to_values`` does on the host; XLA fuses its multiply-add, so a value may differ from the
host's by one float32 rounding (the same on any device count).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def batch_images(batch: Mapping[str, jax.Array]) -> jax.Array:
    """``batch["image"]`` as given, or float32 images from ``"pixels"`` (+ ``"scale"``, ``"offset"``)."""
    if "image" in batch:
        return batch["image"]
    if "pixels" not in batch:
        raise KeyError(f"batch has neither 'image' nor 'pixels' (keys: {sorted(batch)})")
    x = batch["pixels"].astype(jnp.float32)
    if "scale" in batch:
        x = x * batch["scale"][:, None, None, :]
    if "offset" in batch:
        x = x + batch["offset"][:, None, None, :]
    return x
