"""The optimizer factory of every trainer: AdamW + linear warmup + cosine decay, clipping, accumulation.

Settings: ``configs/optim.py``. Weight decay is masked off everything that is not a matmul kernel
(LayerNorm scales/biases, all biases, CLS/mask tokens, the joint model's temperature): the rule is
"decay iff the leaf is named ``kernel``", so new modules get the right treatment by default.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax

from cosmic_jax.configs import overrides as cfg_io

# Images per device per chunk on CPU: the decoder activations of 32 images fit a 32 MB L3.
CPU_MICROBATCH_PER_DEVICE = 32


def resolve(optim_cfg: Any, steps: int, global_batch: int = 0, num_devices: int = 1,
            platform: str = "cpu") -> ml_collections.FrozenConfigDict:
    """The optimizer config with its "auto" values made concrete, frozen (a static jit argument).

    ``total_steps=-1`` -> ``steps``; ``warmup_steps`` = round(warmup_fraction * total_steps), at
    most total_steps - 1; ``microbatch=-1`` -> 32 images per device on CPU when each device's share
    of the batch is a larger multiple of 32, else 0 (accelerators have no such cache cliff).

    Raises:
      ValueError naming the field for values no run can use.
    """
    c = ml_collections.ConfigDict(optim_cfg.to_dict() if hasattr(optim_cfg, "to_dict") else dict(optim_cfg))
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if not c.lr > 0:
        raise ValueError(f"optim.lr must be > 0, got {c.lr}")
    if not 0.0 <= c.warmup_fraction < 1.0:
        raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {c.warmup_fraction}")
    if c.accum_steps < 1:
        raise ValueError(f"optim.accum_steps must be >= 1, got {c.accum_steps}")
    if c.weight_decay < 0 or c.clip_norm < 0:
        raise ValueError(f"optim.weight_decay and optim.clip_norm must be >= 0, got {c.weight_decay}, {c.clip_norm}")
    if c.total_steps < 0:
        c.total_steps = steps
    total = c.total_steps // c.accum_steps if c.total_steps else 0
    with c.ignore_type():
        c.warmup_steps = max(0, min(int(round(c.warmup_fraction * total)), total - 1)) if total else 0
    if c.microbatch < 0:
        per_device = global_batch // max(1, num_devices)
        m = CPU_MICROBATCH_PER_DEVICE
        fits = platform == "cpu" and per_device > m and per_device % m == 0
        c.microbatch = m * num_devices if fits else 0
    return cfg_io.frozen(c)


def make_schedule(cfg: Any) -> optax.Schedule:
    """Learning rate as a function of the optimizer (update) step; ``cfg`` from :func:`resolve`."""
    end = cfg.lr * cfg.end_lr_fraction
    total = cfg.total_steps // cfg.accum_steps if cfg.total_steps else 0
    if total:
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, total, end)
    if cfg.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay (matmul kernels), False otherwise."""

    def is_kernel(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", str(last))) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: ml_collections.FrozenConfigDict) -> optax.GradientTransformation:
    """[clip] -> AdamW(schedule, masked weight decay) [-> MultiSteps], one object per config.

    Cached so that repeated traces of a step see identical functions.
    """
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx
