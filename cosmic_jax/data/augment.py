"""Random augmentations of nucleus crop batches, in jax, run on the device inside the train step.

Nuclei have no preferred orientation, so the dihedral group (rot90 x flip) is an exact
symmetry of the data: it only permutes pixels. Intensity jitter models staining/exposure
variation between wells and plates. There is deliberately no ImageNet-style mean/std
normalisation: microscopy intensities are already scaled per crop by the data builders, and
the statistics of natural images do not apply.

Randomness comes from an explicit key; the train step derives it from (seed, step), so a
resumed run augments exactly as an uninterrupted one. The host pipeline only reads, decodes
and batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply to training crops.

    Attributes:
      enabled: master switch; False returns crops unchanged.
      rot90: rotate by a uniformly random multiple of 90 degrees.
      flip: mirror left-right with probability 1/2 (with rot90 this covers all 8 symmetries).
      intensity_jitter: multiply by U(1 - j, 1 + j) (0 disables); e.g. 0.1 is +-10%.
      intensity_shift: add U(-s, s) (0 disables), in the crop's intensity units.
      per_channel: draw jitter/shift independently per channel (stains vary independently).
    """

    enabled: bool = True
    rot90: bool = True
    flip: bool = True
    intensity_jitter: float = 0.1
    intensity_shift: float = 0.0
    per_channel: bool = True

    def __post_init__(self):
        check_config(self)


def check_config(cfg) -> None:
    """Validate augmentation settings (an ``AugmentConfig`` or a ConfigDict with its fields)."""
    if not 0.0 <= cfg.intensity_jitter < 1.0:
        # A factor that can reach 0 or go negative would invert/erase the image.
        raise ValueError(f"augment.intensity_jitter must be in [0, 1), got {cfg.intensity_jitter}")
    if cfg.intensity_shift < 0.0:
        raise ValueError(f"augment.intensity_shift must be >= 0, got {cfg.intensity_shift}")


def _where_rows(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.where(mask[:, None, None, None], a, b)


def augment_batch(images: jax.Array, key: jax.Array, cfg) -> jax.Array:
    """Augment every crop of a batch independently (pure; jit- and sharding-friendly).

    Each crop gets ``rot90(x, k)`` with k uniform in 0..3 (if ``rot90``), then a left-right
    mirror with probability 1/2 (if ``flip``), then per-channel ``x * a + s`` with
    ``a ~ U(1 - j, 1 + j)``, ``s ~ U(-shift, shift)``. The rotation is done as transpose and
    axis reversals selected per row, so no gather is needed and the batch axis is untouched.

    Args:
      images: (B, H, W, C) float array; H must equal W when ``cfg.rot90`` is on.
      key: PRNG key; the same key and batch give the same output.
      cfg: which augmentations to apply: an ``AugmentConfig`` or a ConfigDict with its fields
        (``configs.pretrain.augment_config``).

    Returns:
      (B, H, W, C) array of ``images.dtype``.
    """
    check_config(cfg)
    if images.ndim != 4:
        raise ValueError(f"augment_batch expects (B, H, W, C), got shape {images.shape}")
    if not cfg.enabled:
        return images
    b, h, w, c = images.shape
    if cfg.rot90 and h != w:
        raise ValueError(f"rot90 augmentation needs square crops, got shape {images.shape[1:]}")
    k_rot, k_flip, k_scale, k_shift = jax.random.split(key, 4)
    k = jax.random.randint(k_rot, (b,), 0, 4) if cfg.rot90 else jnp.zeros((b,), jnp.int32)
    mirror = jax.random.bernoulli(k_flip, 0.5, (b,)) if cfg.flip else jnp.zeros((b,), bool)
    # np.rot90(x, k) over (H, W): k=1 is transpose then reverse H, k=2 reverses both axes,
    # k=3 is transpose then reverse W; the mirror then reverses W.
    x = images
    if cfg.rot90:
        x = _where_rows(k % 2 == 1, jnp.swapaxes(x, 1, 2), x)
        x = _where_rows((k == 1) | (k == 2), x[:, ::-1], x)
    x = _where_rows(((k == 2) | (k == 3)) ^ mirror, x[:, :, ::-1], x)
    n = c if cfg.per_channel else 1
    if cfg.intensity_jitter:
        j = cfg.intensity_jitter
        x = x * jax.random.uniform(k_scale, (b, 1, 1, n), x.dtype, 1.0 - j, 1.0 + j)
    if cfg.intensity_shift:
        s = cfg.intensity_shift
        x = x + jax.random.uniform(k_shift, (b, 1, 1, n), x.dtype, -s, s)
    return x
