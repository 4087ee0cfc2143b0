"""Optimizer for MAE pretraining: AdamW + linear warmup + cosine decay, clipping, accumulation.

Weight decay is masked off everything that is not a matmul kernel: LayerNorm scales/biases, all
biases, the CLS and mask tokens (position embeddings are constants, not params). The rule is
"decay iff the leaf is named ``kernel``", so new modules get the right treatment by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters (defaults: MAE paper / the peer benchmark, lr for batch 128)."""

    lr: float = 1.5e-4  # peak learning rate
    min_lr: float = 0.0  # cosine floor
    warmup_steps: int = 0
    total_steps: int = 0  # 0 = constant lr after warmup (no cosine decay)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    clip_norm: float | None = None  # global-norm gradient clipping; None/0 = off
    accum_steps: int = 1  # >1 wraps the optimizer in optax.MultiSteps
    # >0: inside one train step, run forward/backward on chunks of this many images of the global
    # batch (lax.scan) and average their gradients before the single update. Same objective; the
    # smaller working set keeps the decoder's (B*65, 1024) activations in L3 on CPU (see
    # notes/mae_speed.md). -1 = auto, resolved by `resolve_microbatch` before the step is built.
    microbatch: int = 0

    def replace(self, **kw) -> "OptimConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Images per device per chunk on CPU: the decoder activations of 32 images fit a 32 MB L3.
CPU_MICROBATCH_PER_DEVICE = 32


def resolve_microbatch(cfg: OptimConfig, global_batch: int, num_devices: int, platform: str) -> OptimConfig:
    """Replace ``microbatch=-1`` (auto) by a concrete chunk size for this batch and mesh.

    Auto chunks only on CPU (``CPU_MICROBATCH_PER_DEVICE`` images per device, when each device's
    share of the batch is a larger multiple of it); accelerators have no such cache cliff, so 0.
    """
    if cfg.microbatch >= 0:
        return cfg
    per_device = global_batch // max(1, num_devices)
    m = CPU_MICROBATCH_PER_DEVICE
    auto = m * num_devices if platform == "cpu" and per_device > m and per_device % m == 0 else 0
    return dataclasses.replace(cfg, microbatch=auto)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer (update) step."""
    if cfg.total_steps and cfg.total_steps > 0:
        if cfg.total_steps <= cfg.warmup_steps:
            raise ValueError(f"total_steps ({cfg.total_steps}) must exceed warmup_steps "
                             f"({cfg.warmup_steps})")
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.total_steps, end_value=cfg.min_lr)
    if cfg.warmup_steps > 0:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay (matmul kernels), False otherwise."""

    def is_kernel(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Build the optax chain: [clip] -> AdamW(schedule, masked wd) [-> MultiSteps].

    Returns:
      An optax GradientTransformation; ``optax.inject_hyperparams`` is not used, the current lr is
      recomputed from the step by :func:`make_schedule` for logging.
    """
    if cfg.accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx
