"""ViT masked-autoencoder model configs: ``get_config("vit_s8_64")`` -> ConfigDict.

Input convention: the model sees the crop exactly as stored in the crop dataset (no ImageNet
mean/std). With ``pixel_mean`` / ``pixel_std`` set (one value per channel, e.g. dataset statistics)
the model normalises its input first; ``norm_pix_loss`` makes the loss invariant to per-patch affine
intensity changes anyway. Validation lives with the model (``cosmic_jax.models.mae.check_config``).
"""

from __future__ import annotations

import ml_collections

_ENC_S = dict(hidden=384, depth=12, heads=6, mlp_dim=1536)
_DEC_S = dict(dec_hidden=256, dec_depth=4, dec_heads=8, dec_mlp_dim=1024)

VARIANTS: dict[str, dict] = {
    # tiny model for unit tests and the CPU analysis: 32x32x1, 16 patches
    "vit_test": dict(image_size=32, patch_size=8, channels=1, hidden=64, depth=2, heads=2,
                     mlp_dim=128, dec_hidden=32, dec_depth=1, dec_heads=2, dec_mlp_dim=64),
    # a 4-block MAE to pretrain once on a CPU and reuse across analyses (pretrain variant "mini")
    "vit_mini_64": dict(image_size=64, patch_size=8, channels=1, hidden=128, depth=4, heads=4,
                        mlp_dim=512, dec_hidden=64, dec_depth=1, dec_heads=2, dec_mlp_dim=64),
    # the peer benchmark configs (../shared/bench/mae_flops.py), 64x64x1 nuclei crops
    "vit_t8_64": dict(image_size=64, patch_size=8, channels=1, hidden=192, depth=12, heads=3,
                      mlp_dim=768, **_DEC_S),  # 8,577,088 params
    "vit_s8_64": dict(image_size=64, patch_size=8, channels=1, **_ENC_S, **_DEC_S),  # 24,594,496
    # larger crops / multi-channel use
    "vit_b16_128": dict(image_size=128, patch_size=16, channels=1, hidden=768, depth=12, heads=12,
                        mlp_dim=3072, dec_hidden=512, dec_depth=8, dec_heads=16, dec_mlp_dim=2048),
    "vit_l16_224": dict(image_size=224, patch_size=16, channels=3, hidden=1024, depth=24, heads=16,
                        mlp_dim=4096, dec_hidden=512, dec_depth=8, dec_heads=16, dec_mlp_dim=2048),
}


def get_config(name: str = "vit_test") -> ml_collections.ConfigDict:
    """The model config of variant ``name`` (one of ``VARIANTS``)."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.image_size = 64
    c.patch_size = 8
    c.channels = 1
    # encoder
    c.hidden = 384
    c.depth = 12
    c.heads = 6
    c.mlp_dim = 1536
    # decoder
    c.dec_hidden = 256
    c.dec_depth = 4
    c.dec_heads = 8
    c.dec_mlp_dim = 1024
    # objective
    c.mask_ratio = 0.75
    c.norm_pix_loss = True
    c.norm_pix_eps = 1e-6  # added to the patch variance: a flat patch must not give 0/0
    c.cls_token = True
    # weight of an extra loss on each masked patch's (mean, std), which norm_pix_loss removes from the
    # target: brightness and contrast are biological signals (notes/science.md); 0 = off
    c.patch_stats_loss = 0.0
    # numerics
    c.dtype = "float32"  # compute dtype: "float32" | "bfloat16"; params are always float32
    c.layer_norm_eps = 1e-12  # HF ViTMAE default
    c.gelu_approximate = False  # HF ViTMAE uses exact (erf) GELU
    c.remat = False  # rematerialise encoder blocks in the backward pass (saves memory)
    # per-channel input normalisation; None = use the stored crop values as they are
    c.pixel_mean = ml_collections.config_dict.placeholder(tuple)
    c.pixel_std = ml_collections.config_dict.placeholder(tuple)
    c.update(VARIANTS[name])
    return c
