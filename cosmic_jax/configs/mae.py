"""Named ViT-MAE model configs.

``get_model_config("vit_s8_64", mask_ratio=0.6)`` returns a frozen :class:`MAEConfig`; overrides
may also come as ``"key=value"`` strings from the command line (:func:`parse_overrides`).

Input convention: the model sees the crop exactly as stored in the crop dataset (float32, no
ImageNet mean/std). If ``pixel_mean`` / ``pixel_std`` are set (one value per channel, e.g. dataset
statistics), the model normalises its input with them first; ``norm_pix_loss`` makes the loss
invariant to per-patch affine intensity changes anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """ViT masked-autoencoder hyper-parameters (encoder ``hidden``/``depth``..., decoder ``dec_*``)."""

    name: str = "custom"
    image_size: int = 64
    patch_size: int = 8
    channels: int = 1
    # encoder
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    # decoder
    dec_hidden: int = 256
    dec_depth: int = 4
    dec_heads: int = 8
    dec_mlp_dim: int = 1024
    # objective
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    norm_pix_eps: float = 1e-6  # added to the patch variance: a flat patch must not give 0/0
    cls_token: bool = True
    # numerics
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"; params are always float32
    layer_norm_eps: float = 1e-12  # HF ViTMAE default
    gelu_approximate: bool = False  # HF ViTMAE uses exact (erf) GELU
    remat: bool = False  # rematerialise encoder blocks in the backward pass (saves memory)
    # input normalisation (per channel), None = use the stored crop values as they are
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} not a multiple of "
                             f"patch_size {self.patch_size}")
        for h, n, what in ((self.hidden, self.heads, "hidden/heads"),
                           (self.dec_hidden, self.dec_heads, "dec_hidden/dec_heads")):
            if h % n:
                raise ValueError(f"{self.name}: {what} = {h}/{n} is not an integer")
        for h, what in ((self.hidden, "hidden"), (self.dec_hidden, "dec_hidden")):
            if h % 4:
                raise ValueError(f"{self.name}: {what}={h} must be a multiple of 4 (sin-cos pos-emb)")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"{self.name}: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"{self.name}: dtype must be float32 or bfloat16, got {self.dtype!r}")
        for key in ("pixel_mean", "pixel_std"):
            v = getattr(self, key)
            if v is not None and len(v) != self.channels:
                raise ValueError(f"{self.name}: {key} has {len(v)} values for {self.channels} channels")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def num_visible(self) -> int:
        """Visible (unmasked) patches per sample during pretraining: round(N * (1 - ratio)), >= 1."""
        return max(1, min(self.num_patches, int(round(self.num_patches * (1.0 - self.mask_ratio)))))

    def replace(self, **kw) -> "MAEConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ENC_S = dict(hidden=384, depth=12, heads=6, mlp_dim=1536)
_DEC_S = dict(dec_hidden=256, dec_depth=4, dec_heads=8, dec_mlp_dim=1024)

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # tiny model for unit tests: 32x32x1, 16 patches
    "vit_test": dict(image_size=32, patch_size=8, channels=1, hidden=64, depth=2, heads=2,
                     mlp_dim=128, dec_hidden=32, dec_depth=1, dec_heads=2, dec_mlp_dim=64),
    # the peer benchmark configs (/work/shared/bench/mae_flops.py), 64x64x1 nuclei crops
    "vit_t8_64": dict(image_size=64, patch_size=8, channels=1, hidden=192, depth=12, heads=3,
                      mlp_dim=768, **_DEC_S),  # 8,577,088 params
    "vit_s8_64": dict(image_size=64, patch_size=8, channels=1, **_ENC_S, **_DEC_S),  # 24,594,496
    # larger crops / multi-channel use
    "vit_b16_128": dict(image_size=128, patch_size=16, channels=1, hidden=768, depth=12, heads=12,
                        mlp_dim=3072, dec_hidden=512, dec_depth=8, dec_heads=16, dec_mlp_dim=2048),
    "vit_l16_224": dict(image_size=224, patch_size=16, channels=3, hidden=1024, depth=24, heads=16,
                        mlp_dim=4096, dec_hidden=512, dec_depth=8, dec_heads=16, dec_mlp_dim=2048),
}

_FIELDS = {f.name: f for f in dataclasses.fields(MAEConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Turn a command-line string into the field's type (bool/int/float/tuple/None)."""
    if not isinstance(value, str):
        return value
    default = _FIELDS[key].default
    if value.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"override {key}={value!r}: expected true/false")
        return value.lower() in ("true", "1")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if key in ("pixel_mean", "pixel_std"):
        return tuple(float(v) for v in value.split(","))
    return value


def get_model_config(name: str, **overrides: Any) -> MAEConfig:
    """Named config with field overrides.

    Args:
      name: one of ``MODEL_CONFIGS``.
      **overrides: MAEConfig fields; string values are coerced to the field type.

    Returns:
      A frozen MAEConfig.
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(MODEL_CONFIGS)}")
    unknown = set(overrides) - set(_FIELDS)
    if unknown:
        raise KeyError(f"unknown MAEConfig field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    kw = dict(MODEL_CONFIGS[name], name=name)
    kw.update({k: _coerce(k, v) for k, v in overrides.items()})
    return MAEConfig(**kw)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """["mask_ratio=0.6", "dtype=bfloat16"] -> {"mask_ratio": "0.6", "dtype": "bfloat16"}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_from_dict(d: dict[str, Any]) -> MAEConfig:
    """Rebuild a config saved with ``to_dict`` (e.g. next to a checkpoint); lists -> tuples."""
    unknown = set(d) - set(_FIELDS)
    if unknown:
        raise KeyError(f"unknown MAEConfig field(s) {sorted(unknown)} in saved config")
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    return MAEConfig(**d)


def pixel_stats(cfg: MAEConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) as float32 (C,) arrays, or None if the config does not normalise input."""
    if cfg.pixel_mean is None and cfg.pixel_std is None:
        return None
    mean = np.asarray(cfg.pixel_mean if cfg.pixel_mean is not None else [0.0] * cfg.channels, np.float32)
    std = np.asarray(cfg.pixel_std if cfg.pixel_std is not None else [1.0] * cfg.channels, np.float32)
    return mean, std
