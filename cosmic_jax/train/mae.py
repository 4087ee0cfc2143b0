"""The MAE task for the training loop: its state, its step and its loss.

``train_step(state, batch, rng) -> (state, metrics)`` is a module-level pure function; the
pretraining run jits it with explicit shardings (``sharding.jit_step``). The model and optimizer
configs live in the state as static fields, so the step needs nothing else. ``rng`` is a fixed
base key: the step folds in ``state.step``, so the mask of step t is the same whether or not
training was resumed in between. Data augmentation runs here too, on the device
(``functools.partial(train_step, augment=config.loader.augment)``), keyed the same way, so the
host pipeline only reads and batches.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cosmic_jax.data.augment import augment_batch
from cosmic_jax.data.device_decode import batch_images
from cosmic_jax.models.mae import MAE, MAEConfig
from cosmic_jax.train.optim import make_schedule
from cosmic_jax.train.sharding import strided_chunks
from cosmic_jax.train.state import TrainState


def create_train_state(model_cfg: MAEConfig, optim_cfg: ml_collections.FrozenConfigDict, rng: jax.Array,
                       sample_shape: tuple[int, ...] | None = None) -> TrainState:
    """Initialise params (float32, logical-axis boxes removed) and optimizer state.

    Traceable: ``sharding.create_sharded_state`` calls it under ``jax.jit(..., out_shardings=...)``
    so the state is born sharded.

    Args:
      model_cfg: frozen model config (``models.mae.model_config``).
      optim_cfg: resolved optimizer config (``train.optim.resolve``).
      rng: PRNG key for the parameter init.
      sample_shape: (B, H, W, C) of an input batch (only H, W, C must match the config);
        defaults to (1, image_size, image_size, channels).

    Returns:
      TrainState at step 0.
    """
    want = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if sample_shape is not None and tuple(sample_shape[1:]) != want:
        raise ValueError(f"sample_shape {tuple(sample_shape)} does not match model config "
                         f"{model_cfg.name!r} (expects (B, {want[0]}, {want[1]}, {want[2]}))")
    return _init_state(model_cfg, optim_cfg, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(model_cfg: MAEConfig, optim_cfg, rng: jax.Array) -> TrainState:
    # jitted: eager flax init dispatches hundreds of tiny ops, each compiled on first use.
    x = jnp.zeros((1, model_cfg.image_size, model_cfg.image_size, model_cfg.channels), jnp.float32)
    k_init, k_mask = jax.random.split(rng)
    params = nn.meta.unbox(MAE(model_cfg).init(k_init, x, k_mask)["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                       optim_cfg=optim_cfg, model_cfg=model_cfg)
    return state.replace(opt_state=state.tx.init(params))


def _loss_fn(params, model_cfg: MAEConfig, images: jax.Array, rng: jax.Array):
    loss, _ = MAE(model_cfg).apply({"params": params}, images, rng)
    return loss


def _loss_and_grads(params, model_cfg: MAEConfig, images: jax.Array, rng: jax.Array, microbatch: int):
    """Loss and gradient of the batch mean; with ``microbatch`` as the mean over equal chunks.

    Chunk c holds the strided rows ``images[c::n]`` (n chunks; ``sharding.strided_chunks``: no
    chunk is resharded under data parallelism) and uses mask key ``fold_in(rng, c)``. Every sample
    has the same number of masked patches, so the mean of chunk losses is the batch loss and the
    mean of chunk gradients is its gradient.
    """
    grad_fn = jax.value_and_grad(_loss_fn)
    b = images.shape[0]
    if not microbatch or microbatch >= b:
        return grad_fn(params, model_cfg, images, rng)
    if microbatch < 0:
        raise ValueError(f"microbatch={microbatch} (auto) must be resolved first: cosmic_jax.train.optim.resolve")
    if b % microbatch:
        raise ValueError(f"batch size {b} is not a multiple of microbatch={microbatch}")
    n = b // microbatch

    def body(carry, xs):
        loss_sum, grad_sum = carry
        c, x = xs
        loss, grads = grad_fn(params, model_cfg, x, jax.random.fold_in(rng, c))
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                           (jnp.arange(n), strided_chunks(images, n)))
    return loss_sum / n, jax.tree_util.tree_map(lambda g: g / n, grad_sum)


_AUGMENT_STREAM = 0x0A06  # fold_in constant separating augmentation keys from mask keys


def augment_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The augmentation key of a step: a function of the run's base key and the step only."""
    return jax.random.fold_in(jax.random.fold_in(rng, _AUGMENT_STREAM), step)


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, augment=None):
    """One optimizer (micro-)step.

    Args:
      state: TrainState.
      batch: {"image": (B, H, W, C) float32}, or the crops as stored (``"pixels"`` with
        ``"scale"``/``"offset"``: ``LoaderConfig.device_decode``), converted here; other keys are ignored.
      rng: base PRNG key (the step number is folded in here).
      augment: augmentation settings (``configs.pretrain.augment_config`` or
        ``data.augment.AugmentConfig``): the batch is augmented on the device first, with
        ``augment_key(rng, state.step)``; None trains on the images as given. Bind it with
        ``functools.partial`` before jit.

    Returns:
      (new_state, metrics) with metrics {"loss", "grad_norm", "lr"} float32 scalars; lr is the
      learning rate used for this update (under accumulation: of the pending update).
    """
    images = batch_images(batch)
    step_rng = jax.random.fold_in(rng, state.step)
    if augment is not None:
        images = augment_batch(images, augment_key(rng, state.step), augment)
    loss, grads = _loss_and_grads(state.params, state.model_cfg, images, step_rng,
                                  state.optim_cfg.microbatch)
    update_idx = state.step // max(1, state.optim_cfg.accum_steps)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(make_schedule(state.optim_cfg)(update_idx), jnp.float32),
    }
    return state.apply_gradients(grads), metrics
