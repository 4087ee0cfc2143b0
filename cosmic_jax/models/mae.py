"""ViT masked autoencoder (He et al. 2022) in flax.linen.

Training forward (``MAE.__call__``): per-sample random masking keeps ``num_visible(cfg)`` of the
N patches; the encoder runs on the visible patches (+ CLS) only; the light decoder runs on all
N tokens (visible embeddings + a learned mask token, fixed 2-D sin-cos position embeddings); the
loss is the MSE on masked patches only (per-patch normalised targets with ``norm_pix_loss``).

Input: (B, H, W, C) float32 crops exactly as stored (no ImageNet mean/std); optional per-channel
``pixel_mean`` / ``pixel_std`` in the config are applied first.

Speed choices (CPU XLA; see notes/mae_speed.md):
  * masking selects visible *pixels* before the patch embedding: the gather touches only input
    data (no gradient, so no scatter in the backward pass) and the patch embedding runs on N/4
    patches;
  * the decoder takes its tokens as [CLS, visible, masked] rather than in patch order, so there is
    no unshuffle (nor its scatter gradient), and its last block computes only the masked rows:
    the loss needs nothing else;
  * position embeddings are numpy constants (not params, no gradient).

Param paths (see also cosmic_jax/models/vit.py for the blocks):
  patch_embed/{kernel (p*p*C, D) ("patch","embed"), bias}
  cls_token (1, 1, D) (only with cfg.cls_token)
  encoder/block_{i}/...,  encoder_norm/{scale,bias}
  decoder_embed/{kernel (D, Dd) ("embed","dec_embed")... , bias}
  mask_token (1, 1, Dd)
  decoder/block_{i}/...,  decoder_norm/{scale,bias}
  decoder_pred/{kernel (Dd, p*p*C), bias}
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from cosmic_jax.configs.overrides import frozen
from cosmic_jax.models.patches import patchify, sincos_pos_embed_2d, unpatchify
from cosmic_jax.models.vit import Transformer, _part, dense, layer_norm

_token_init = nn.initializers.normal(stddev=0.02)
POOLS = ("mean", "cls", "mean_std", "mean_std_moments")  # pooled read-outs of the tokens (MAE.encode)


def spatial_moments(tokens: jnp.ndarray, grid: int) -> jnp.ndarray:
    """Rotation-invariant second spatial moments of each token channel: (B, T, D) -> (B, 2D).

    With w_t = token_t - mean_t token (per channel) and p_t the patch's grid position relative to
    the crop centre, M = sum_t w_t p_t p_t^T / T (2 x 2 per channel). Returned: trace(M) (how the
    channel's response spreads radially: size, radial profile) and the anisotropy
    sqrt((M_xx - M_yy)^2 + 4 M_xy^2) (how elongated that spread is), both unchanged by rotating
    the crop. The mean and std of the tokens cannot see elongation at all: they ignore where
    each token sits.
    """
    g = np.arange(grid, dtype=np.float32) - (grid - 1) / 2
    y, x = np.repeat(g, grid), np.tile(g, grid)  # patchify order is row-major
    w = tokens - tokens.mean(axis=1, keepdims=True)
    t = tokens.shape[1]
    mxx, myy, mxy = (jnp.einsum("btd,t->bd", w, jnp.asarray(c)) / t for c in (x * x, y * y, x * y))
    return jnp.concatenate([mxx + myy, jnp.sqrt((mxx - myy) ** 2 + 4 * mxy**2 + 1e-12)], axis=-1)


def dihedral_views(images: jnp.ndarray) -> list[jnp.ndarray]:
    """(B, H, W, C) square crops -> the 8 views (B, H, W, C): the 4 rotations, then the 4 rotations
    of the mirror image (the dihedral group of the square: pixel permutations only)."""
    flipped = images[:, :, ::-1]
    return [jnp.rot90(x, k, axes=(1, 2)) for x in (images, flipped) for k in range(4)]

MAEConfig = ml_collections.FrozenConfigDict  # the ``model`` group of configs/pretrain.py, frozen


def model_config(cfg: Any) -> MAEConfig:
    """Validate a model config (``configs/mae.py``) and freeze it (hashable, for jit and flax).

    Raises:
      ValueError naming the config and the field at fault.
    """
    cfg = frozen(cfg)
    name = cfg.name
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"{name}: image_size {cfg.image_size} not a multiple of patch_size {cfg.patch_size}")
    for h, n, what in ((cfg.hidden, cfg.heads, "hidden/heads"), (cfg.dec_hidden, cfg.dec_heads, "dec_hidden/dec_heads")):
        if h % n:
            raise ValueError(f"{name}: {what} = {h}/{n} is not an integer")
    for h, what in ((cfg.hidden, "hidden"), (cfg.dec_hidden, "dec_hidden")):
        if h % 4:
            raise ValueError(f"{name}: {what}={h} must be a multiple of 4 (sin-cos pos-emb)")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"{name}: mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if cfg.get("patch_stats_loss", 0.0) < 0:
        raise ValueError(f"{name}: patch_stats_loss must be >= 0, got {cfg.patch_stats_loss}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"{name}: dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    for key in ("pixel_mean", "pixel_std"):
        v = cfg[key]
        if v is not None and len(v) != cfg.channels:
            raise ValueError(f"{name}: {key} has {len(v)} values for {cfg.channels} channels")
    return cfg


def grid(cfg: MAEConfig) -> int:
    """Patches per side."""
    return cfg.image_size // cfg.patch_size


def num_patches(cfg: MAEConfig) -> int:
    return grid(cfg) ** 2


def patch_dim(cfg: MAEConfig) -> int:
    return cfg.patch_size**2 * cfg.channels


def num_visible(cfg: MAEConfig) -> int:
    """Visible (unmasked) patches per sample during pretraining: round(N * (1 - ratio)), >= 1."""
    n = num_patches(cfg)
    return max(1, min(n, int(round(n * (1.0 - cfg.mask_ratio)))))


def pixel_stats(cfg: MAEConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) as float32 (C,) arrays, or None if the config does not normalise input."""
    if cfg.pixel_mean is None and cfg.pixel_std is None:
        return None
    mean = np.asarray(cfg.pixel_mean if cfg.pixel_mean is not None else [0.0] * cfg.channels, np.float32)
    std = np.asarray(cfg.pixel_std if cfg.pixel_std is not None else [1.0] * cfg.channels, np.float32)
    return mean, std


def random_shuffle(rng: jax.Array, batch: int, num_patches: int) -> jnp.ndarray:
    """(B, N) int32: a uniformly random permutation of the patches per sample; the first K are
    kept visible, the rest masked."""
    noise = jax.random.uniform(rng, (batch, num_patches))
    # argsort, not lax.top_k: XLA's SPMD partitioner all-gathers TopK's input, so under data
    # parallelism top_k made every step gather the whole batch's noise; a sort along the last
    # axis stays batch-sharded.
    return jnp.argsort(noise, axis=-1).astype(jnp.int32)


def _mask_from_keep(ids_keep: jnp.ndarray, num_patches: int) -> jnp.ndarray:
    return 1.0 - jax.nn.one_hot(ids_keep, num_patches, dtype=jnp.float32).sum(axis=1)


def random_masking(rng: jax.Array, batch: int, num_patches: int, num_visible: int):
    """Per-sample uniform random choice of visible patches (the same draw as training's).

    Args:
      rng: PRNG key.
      batch: B.
      num_patches: N.
      num_visible: K, the number of visible patches per sample.

    Returns:
      ids_keep: (B, K) int32 indices of the visible patches (distinct within a row).
      masked: (B, N) float32, 1 = masked (predicted, in the loss), 0 = visible.
    """
    ids_keep = random_shuffle(rng, batch, num_patches)[:, :num_visible]
    return ids_keep, _mask_from_keep(ids_keep, num_patches)


def norm_pix_target(patches: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Per-patch standardised target as HF ViTMAE (unbiased variance). (B,N,P) -> (B,N,P)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) * jax.lax.rsqrt(var + eps)


def masked_mse(pred: jnp.ndarray, patches: jnp.ndarray, masked: jnp.ndarray,
               norm_pix_loss: bool = True, eps: float = 1e-6) -> jnp.ndarray:
    """MAE loss: mean over masked patches of the per-patch MSE.

    Args:
      pred: (B, N, P) predictions.
      patches: (B, N, P) input patches (the target, normalised per patch with ``norm_pix_loss``).
      masked: (B, N) 1 = masked (counted), 0 = visible (ignored).

    Returns:
      scalar float32.
    """
    per_patch = _patch_mse(pred, patches, norm_pix_loss, eps)  # (B, N)
    return jnp.sum(per_patch * masked) / jnp.maximum(jnp.sum(masked), 1.0)


def patch_stats_weight(cfg) -> float:
    """Weight of the patch-statistics loss (0 = off); configs from before the field read 0."""
    return float(cfg.get("patch_stats_loss", 0.0))


def patch_stats_loss(pred: jnp.ndarray, patches: jnp.ndarray) -> jnp.ndarray:
    """MSE of predicted (mean, std) of each masked patch against the true ones.

    With ``norm_pix_loss`` the pixel target of a patch is standardised, so nothing asks the model
    for the patch's brightness or contrast: biological signals (chromatin intensity, texture
    strength). This target restores them. Each statistic is z-scored over the batch (constants
    under the gradient), so the loss is scale free.

    Args:
      pred: (B, M, 2) predicted statistics; patches: (B, M, P) the masked patches.
    """
    t = jnp.stack([patches.mean(axis=-1), patches.std(axis=-1)], axis=-1)
    t = jax.lax.stop_gradient((t - t.mean(axis=(0, 1))) / (t.std(axis=(0, 1)) + 1e-6))
    return jnp.mean(jnp.square(pred - t))


def _patch_mse(pred, patches, norm_pix_loss: bool, eps: float) -> jnp.ndarray:
    target = norm_pix_target(patches, eps) if norm_pix_loss else patches
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


class MAE(nn.Module):
    """Masked autoencoder; ``config`` is a frozen model config (:func:`model_config`)."""

    config: MAEConfig

    def setup(self):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        self.patch_embed = dense(cfg.hidden, ("patch", "embed"), dt, "patch_embed")
        if cfg.cls_token:
            self.cls = self.param("cls_token", _part(_token_init, (None, None, "embed")),
                                  (1, 1, cfg.hidden))
        self.encoder = Transformer(cfg.depth, cfg.heads, cfg.mlp_dim, dt, cfg.layer_norm_eps,
                                   cfg.gelu_approximate, cfg.remat, name="encoder")
        self.encoder_norm = layer_norm(cfg.layer_norm_eps, "encoder_norm")
        self.decoder_embed = dense(cfg.dec_hidden, ("embed", "dec_embed"), dt, "decoder_embed")
        self.mask_token = self.param("mask_token", _part(_token_init, (None, None, "dec_embed")),
                                     (1, 1, cfg.dec_hidden))
        self.decoder = Transformer(cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp_dim, dt,
                                   cfg.layer_norm_eps, cfg.gelu_approximate, cfg.remat,
                                   name="decoder")
        self.decoder_norm = layer_norm(cfg.layer_norm_eps, "decoder_norm")
        self.decoder_pred = dense(patch_dim(cfg), ("dec_embed", "patch"), dt, "decoder_pred")
        if patch_stats_weight(cfg):
            self.decoder_stats = dense(2, ("dec_embed", None), dt, "decoder_stats")
        self.pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden, grid(cfg)))  # (N, D) constant
        self.dec_pos = jnp.asarray(sincos_pos_embed_2d(cfg.dec_hidden, grid(cfg)))

    # ----------------------------------------------------------------------------- helpers
    def _check_images(self, images: jnp.ndarray) -> None:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"MAE config {cfg.name!r} expects images (B, {want[0]}, {want[1]}, "
                             f"{want[2]}), got shape {tuple(images.shape)}")

    def _prep(self, images: jnp.ndarray) -> jnp.ndarray:
        """Validate, cast to float32 and apply the optional per-channel normalisation."""
        self._check_images(images)
        x = images.astype(jnp.float32)
        stats = pixel_stats(self.config)
        if stats is not None:
            x = (x - stats[0]) / stats[1]
        return x

    def _with_cls(self, x: jnp.ndarray) -> jnp.ndarray:
        if not self.config.cls_token:
            return x
        cls = jnp.broadcast_to(self.cls, (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        return jnp.concatenate([cls, x], axis=1)  # CLS pos-emb is zero (MAE convention)

    def _encode_tokens(self, patches: jnp.ndarray, pos: jnp.ndarray, upto: int | None = None,
                       collect: tuple[int, ...] | None = None):
        """(B, T, P) patches + (B|1, T, D) pos-emb -> (B, [1+]T, D) block output (float32), or the
        list of the ``collect`` blocks' outputs."""
        x = self.patch_embed(patches).astype(jnp.float32) + pos
        return self.encoder(self._with_cls(x), upto=upto, collect=collect)

    # ----------------------------------------------------------------------------- training
    def __call__(self, images: jnp.ndarray, rng: jax.Array, decode_visible: bool = False):
        """Masked-autoencoding forward pass and loss.

        Args:
          images: (B, H, W, C) float.
          rng: PRNG key for the per-sample random mask.
          decode_visible: also predict the visible patches (for pictures; the loss ignores them,
            so training leaves them out of the decoder's last block).

        Returns:
          loss: scalar float32, MSE over masked patches only.
          aux: {"pred": (B, N, P) float32 decoder output in patch order (normalised-patch space
            with norm_pix_loss; visible patches are 0 unless ``decode_visible``),
            "mask": (B, N) float32, 1 = masked}.
        """
        cfg = self.config
        x = self._prep(images)
        b = x.shape[0]
        n, k = num_patches(cfg), num_visible(cfg)
        patches = patchify(x, cfg.patch_size)  # (B, N, P)
        ids = random_shuffle(rng, b, n)
        ids_keep, ids_mask = ids[:, :k], ids[:, k:]
        vis = jnp.take_along_axis(patches, ids_keep[:, :, None], axis=1)  # input data: no grad
        h = self._encode_tokens(vis, self.pos[ids_keep])
        h = self.encoder_norm(h)
        y = self._decode(h, ids_keep, ids_mask, decode_visible)  # (B, [K+]N-K, Dd), ids order
        pred = self.decoder_pred(y).astype(jnp.float32)
        target = jnp.take_along_axis(patches, ids_mask[:, :, None], axis=1)
        loss = jnp.mean(_patch_mse(pred[:, -(n - k):], target, cfg.norm_pix_loss, cfg.norm_pix_eps))
        w_stats = patch_stats_weight(cfg)
        if w_stats:
            stats = self.decoder_stats(y[:, -(n - k):]).astype(jnp.float32)
            loss = loss + w_stats * patch_stats_loss(stats, target)
        # Back to patch order for the caller (dead code under a training step's jit).
        rows = jnp.arange(b)[:, None]
        full = jnp.zeros((b, n, pred.shape[-1]), pred.dtype).at[rows, ids[:, n - pred.shape[1]:]].set(pred)
        return loss, {"pred": full, "mask": _mask_from_keep(ids_keep, n)}

    def _decode(self, h: jnp.ndarray, ids_keep: jnp.ndarray, ids_mask: jnp.ndarray,
                decode_visible: bool) -> jnp.ndarray:
        """Encoder output (B, [1+]K, D) -> normalised decoder features for the prediction heads,
        rows in ``ids_keep ++ ids_mask`` order: (B, N, Dd) with ``decode_visible``, else the masked
        rows only (B, N-K, Dd).

        Decoder tokens are ordered [CLS, visible, masked] instead of by patch: attention does not
        care about order (each token carries its position embedding), so no unshuffle is needed,
        and the masked tokens form one slice that the last block can compute alone.
        """
        cfg = self.config
        h = self.decoder_embed(h).astype(jnp.float32)  # (B, [1+]K, Dd)
        c = 1 if cfg.cls_token else 0
        vis = h[:, c:] + self.dec_pos[ids_keep]
        msk = self.mask_token.astype(h.dtype) + self.dec_pos[ids_mask]
        y = self.decoder(jnp.concatenate([h[:, :c], vis, msk], axis=1),
                         last_rows_from=c if decode_visible else c + ids_keep.shape[1])
        return self.decoder_norm(y)

    # ----------------------------------------------------------------------------- inference
    def encode(self, images: jnp.ndarray, layer: int | Sequence[int] = -1, pool: str = "mean",
               mask: bool = False, rng: jax.Array | None = None, dihedral: bool = False) -> jnp.ndarray:
        """Encoder embeddings of whole images (no masking by default).

        Use as ``model.apply(variables, images, method=MAE.encode, layer=k, pool="mean")``.

        Args:
          images: (B, H, W, C).
          layer: encoder block whose output is returned (0-based; negative counts from the end), or
            a sequence of blocks whose pooled outputs are concatenated in that order (the blocks
            run once). The last block (-1 / depth-1) returns the final ``encoder_norm`` output, as
            used in pretraining; earlier blocks return the raw residual stream. Later blocks are not
            run.
          pool: "mean" (average of patch tokens, CLS excluded) -> (B, D); "cls" -> (B, D) CLS
            token (needs cfg.cls_token); "mean_std" -> (B, 2D) mean and standard deviation of the
            patch tokens (the spread over the nucleus carries texture and shape that the mean
            averages away); "mean_std_moments" -> (B, 4D): mean, std and the rotation-invariant
            spatial moments of the patch tokens (:func:`spatial_moments`: shape, elongation);
            "none" -> (B, [1+]T, D) all tokens (CLS first), stacked to
            (L, B, [1+]T, D) for a sequence of L layers.
          mask: if True, apply the pretraining random mask (needs ``rng``) and encode only the
            visible patches.
          rng: PRNG key, only for ``mask=True``.
          dihedral: average the pooled embedding over the 8 rotations / reflections of each crop
            (orientation invariant: a nucleus has no preferred orientation; 8x the compute).

        Returns:
          float32 embeddings, shape per ``pool`` (times the number of layers).
        """
        cfg = self.config
        layers = (layer,) if isinstance(layer, (int, np.integer)) else tuple(layer)
        if not layers:
            raise ValueError("layer: empty sequence of encoder blocks")
        for li in layers:
            if not -cfg.depth <= li < cfg.depth:
                raise ValueError(f"layer={li} out of range for an encoder of depth {cfg.depth}")
        layers = tuple(int(li) % cfg.depth for li in layers)
        if pool not in POOLS + ("none",):
            raise ValueError(f"pool must be one of {POOLS + ('none',)}, got {pool!r}")
        if pool == "cls" and not cfg.cls_token:
            raise ValueError(f"pool='cls' but config {cfg.name!r} has cls_token=False")
        if pool == "none" and dihedral:
            raise ValueError("pool='none' returns the tokens, without dihedral averaging")
        if pool == "mean_std_moments" and mask:
            raise ValueError("pool='mean_std_moments' needs every patch (mask=False)")
        if dihedral:
            if mask:
                raise ValueError("dihedral=True averages whole-image embeddings; it cannot be combined with mask=True")
            # One encoder pass per view, not one pass over the views stacked on the batch axis: that
            # keeps a batch-sharded input's layout (stacking would move rows between devices).
            return sum(self.encode(v, layers, pool) for v in dihedral_views(images)) / 8.0
        patches = patchify(self._prep(images), cfg.patch_size)
        pos = self.pos[None]
        if mask:
            if rng is None:
                raise ValueError("encode(mask=True) needs rng")
            ids_keep = random_shuffle(rng, patches.shape[0], num_patches(cfg))[:, :num_visible(cfg)]
            patches = jnp.take_along_axis(patches, ids_keep[:, :, None], axis=1)
            pos = self.pos[ids_keep]
        hs = self._encode_tokens(patches, pos, collect=layers)
        c = 1 if cfg.cls_token else 0
        hs = [self.encoder_norm(h) if li == cfg.depth - 1 else h for li, h in zip(layers, hs)]
        if pool == "none":
            return hs[0] if isinstance(layer, (int, np.integer)) else jnp.stack(hs)
        pooled = []
        for h in hs:
            tok = h[:, c:]
            if pool == "mean":
                pooled.append(tok.mean(axis=1))
            elif pool == "cls":
                pooled.append(h[:, 0])
            else:
                pooled += [tok.mean(axis=1), tok.std(axis=1)]
                if pool == "mean_std_moments":
                    pooled.append(spatial_moments(tok, grid(cfg)))
        return jnp.concatenate(pooled, axis=-1) if len(pooled) > 1 else pooled[0]

    def reconstruct(self, images: jnp.ndarray, rng: jax.Array) -> dict[str, jnp.ndarray]:
        """Masked reconstruction for visualisation.

        Args:
          images: (B, H, W, C).
          rng: PRNG key for the mask.

        Returns:
          {"pred": (B, H, W, C) prediction in input pixel space (with norm_pix_loss each patch is
             de-normalised with the true patch mean/std, as in the MAE paper's figures),
           "mask": (B, H, W, 1) 1 = masked,
           "pasted": (B, H, W, C) visible input pixels + predicted masked pixels,
           "loss": scalar}.
        """
        cfg = self.config
        loss, aux = self(images, rng, decode_visible=True)
        x = self._prep(images)
        patches = patchify(x, cfg.patch_size)
        pred = aux["pred"]
        if cfg.norm_pix_loss:
            mean = patches.mean(axis=-1, keepdims=True)
            std = jnp.sqrt(patches.var(axis=-1, keepdims=True, ddof=1) + cfg.norm_pix_eps)
            pred = pred * std + mean
        m = aux["mask"][:, :, None]
        pasted = patches * (1.0 - m) + pred * m
        mask_img = jnp.broadcast_to(m, m.shape[:2] + (cfg.patch_size**2,))
        un = lambda t, ch: unpatchify(t, cfg.patch_size, ch)  # noqa: E731
        return {"pred": un(pred, cfg.channels), "mask": un(mask_img, 1),
                "pasted": un(pasted, cfg.channels), "loss": loss}


# --------------------------------------------------------------------------------- utilities
def init_variables(cfg: MAEConfig, rng: jax.Array, batch: int = 1) -> dict[str, Any]:
    """Initialise params (boxed with logical axis metadata). Returns flax variables."""
    model = MAE(cfg)
    x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return model.init(rng, x, rng)


def abstract_params(cfg: MAEConfig) -> Any:
    """ShapeDtypeStruct tree of the (unboxed) params, without allocating them."""
    boxed = jax.eval_shape(lambda k: init_variables(cfg, k), jax.random.key(0))
    return nn.meta.unbox(boxed)["params"]


def param_logical_specs(cfg: MAEConfig) -> Any:
    """Tree of ``PartitionSpec`` of logical axis names, same structure as the unboxed params.

    Map to mesh axes with ``nn.logical_to_mesh_sharding(specs, mesh, rules)``. Logical names used:
    "embed", "heads", "mlp", "patch", "dec_embed" and None.
    """
    boxed = jax.eval_shape(lambda k: init_variables(cfg, k), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def count_params(tree: Any) -> int:
    """Number of scalars in a (possibly abstract) param tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
