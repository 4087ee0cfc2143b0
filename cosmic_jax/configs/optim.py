"""Optimizer settings shared by every trainer (MAE pretraining and the joint model).

AdamW with linear warmup and cosine decay, weight decay on matmul kernels only, optional global-norm
clipping and gradient accumulation; built by ``cosmic_jax.train.optim.make_optimizer``.
"""

from __future__ import annotations

import ml_collections


def get_config(**values) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lr = 1.5e-4  # peak learning rate
    c.end_lr_fraction = 0.0  # cosine decay ends at lr * end_lr_fraction
    # Warmup as a fraction of the run, so a short run (--steps 20) warms up for 1 step, not 5000.
    c.warmup_fraction = 0.05
    c.total_steps = -1  # steps of the schedule; -1 = the run's steps, 0 = constant after warmup
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.05
    c.clip_norm = 0.0  # global-norm gradient clipping; 0 = off
    c.accum_steps = 1  # > 1 wraps the optimizer in optax.MultiSteps
    # > 0: inside one train step, forward/backward on chunks of this many images and average the
    # gradients before the single update (same objective; keeps activations in L3 on CPU, see
    # notes/mae_speed.md). -1 = auto (32 images per device on CPU, 0 on accelerators).
    c.microbatch = 0
    c.update(values)
    return c
