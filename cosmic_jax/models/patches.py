"""Patchify / unpatchify for any channel count, and fixed 2-D sin-cos position embeddings.

Patch pixel order follows Hugging Face ``ViTMAEForPreTraining.patchify`` (and the original MAE):
patches are taken row-major over the (H/p, W/p) grid, and each patch is flattened as
(row-in-patch, col-in-patch, channel). Keeping that order means ``norm_pix_loss`` targets and
reconstructions match the reference implementation bit for bit.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
    """Cut images into flattened non-overlapping patches.

    Args:
      images: (B, H, W, C) array; H and W must be multiples of ``patch_size``.
      patch_size: patch side p.

    Returns:
      (B, N, p*p*C) with N = (H/p)*(W/p), patches row-major, pixels ordered (py, px, c).
    """
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jnp.ndarray, patch_size: int, channels: int,
               grid: tuple[int, int] | None = None) -> jnp.ndarray:
    """Exact inverse of :func:`patchify`.

    Args:
      patches: (B, N, p*p*C).
      patch_size: patch side p.
      channels: C.
      grid: (H/p, W/p); defaults to a square grid.

    Returns:
      (B, H, W, C) images.
    """
    b, n, d = patches.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"patch dim {d} != patch_size^2 * channels = {p * p * channels}")
    if grid is None:
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(gh, gw)")
        grid = (g, g)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, channels)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) [sin | cos] embedding, as in MAE's get_1d_sincos_pos_embed."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE / HF ViTMAE convention).

    Half of the channels encode the column (w) index, half the row (h) index. The embedding is a
    numpy constant: it is not a parameter (no gradient, not counted as trainable).

    Args:
      dim: embedding width; must be a multiple of 4.
      grid: patch grid side, or (gh, gw).
      cls_token: prepend an all-zero row for the CLS token.

    Returns:
      float32 (N, dim), or (1 + N, dim) with ``cls_token``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    ww, hh = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)
