"""Per-crop random augmentations for nucleus images (numpy, run inside grain workers).

Nuclei have no preferred orientation, so the dihedral group (rot90 x flip) is an exact
symmetry of the data: it only permutes pixels. Intensity jitter models staining/exposure
variation between wells and plates. There is deliberately no ImageNet-style mean/std
normalisation: microscopy intensities are already scaled per crop by the data builders, and
the statistics of natural images do not apply.

Randomness comes from an explicit ``np.random.Generator`` so the caller decides the seeding;
the loader derives it from (seed, record index, epoch), making augmentations reproducible
after an iterator restore and independent of worker/process/device counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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
        if not 0.0 <= self.intensity_jitter < 1.0:
            # A factor that can reach 0 or go negative would invert/erase the image.
            raise ValueError(f"AugmentConfig.intensity_jitter must be in [0, 1), got {self.intensity_jitter}")
        if self.intensity_shift < 0.0:
            raise ValueError(f"AugmentConfig.intensity_shift must be >= 0, got {self.intensity_shift}")


def augment_image(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Apply the configured random augmentations to one crop.

    Args:
      image: float array (H, W, C). H must equal W when ``cfg.rot90`` is on (odd rotations
        swap the axes, and batches need one shape).
      cfg: which augmentations to apply.
      rng: source of randomness; the same generator state gives the same output.

    Returns:
      float32 array (H, W, C), C-contiguous (a new array; the input is not modified).
    """
    if image.ndim != 3:
        raise ValueError(f"augment_image expects (H, W, C), got shape {image.shape}")
    if not cfg.enabled:
        return np.ascontiguousarray(image, dtype=np.float32)
    out = image
    # Always draw the same number of values in the same order, so toggling one augmentation
    # does not change the random stream seen by the others.
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    n = image.shape[-1] if cfg.per_channel else 1
    scale = rng.uniform(1.0 - cfg.intensity_jitter, 1.0 + cfg.intensity_jitter, size=n)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, size=n)
    if cfg.rot90 and k:
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"rot90 augmentation needs square crops, got shape {image.shape}")
        out = np.rot90(out, k, axes=(0, 1))
    if cfg.flip and flip:
        out = out[:, ::-1]
    out = np.array(out, dtype=np.float32, order="C")  # copy: never write into the source
    if cfg.intensity_jitter:
        out *= scale.astype(np.float32)
    if cfg.intensity_shift:
        out += shift.astype(np.float32)
    return out


def element_rng(seed: int, record: int, epoch: int) -> np.random.Generator:
    """The generator for one (seed, record, epoch): a pure function, so any worker, process
    or restored iterator reproduces the same augmentation for the same example and epoch."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(record), int(epoch), 0xA0C])


def augment_element(element: dict[str, Any], cfg: AugmentConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Augment ``element["image"]`` of a source element (other keys pass through).

    Matches grain's ``RandomMapTransform.random_map(element, rng)`` signature, so it can also
    be used in a grain ``random_map``.
    """
    return {**element, "image": augment_image(element["image"], cfg, rng)}
