"""Conditional flow matching: the linear (rectified) path, its loss, the velocity network, OT coupling.

Path (Lipman et al. 2023 with sigma_min = 0; Liu et al. 2023 "rectified flow"):
    x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I),  x1 ~ data,  t ~ U[0, 1]
    target velocity u = d x_t / dt = x1 - x0   (exactly; tests pin this)
The network v(x_t, t, c) regresses u; integrating dx/dt = v from t=0 (noise) to t=1 gives a sample
of p(x1 | c).

The velocity network is split into three pure pieces (`embed_condition`, `embed_time`, `trunk`) so
an ODE solver computes the per-cell condition embedding once per solve and the (shared) time
embedding once per step: per ODE step only the trunk runs per cell.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def sinusoidal_embedding(t: Array, dim: int, max_freq: float = 10.0) -> Array:
    """Sinusoidal features of t in [0, 1].

    The highest frequency matters for sampling cost: with diffusion-style frequencies (up to
    ~1000 rad per unit t) a freshly initialised or trained field wiggles in t on a scale of 1/1000,
    so an adaptive solver needs hundreds of steps and a fixed-step one is inaccurate (measured in
    notes/joint.md). The flow's true velocity is smooth in t on [0, 1); 10 rad is plenty (30 measured slightly worse, 1000 far worse).

    Args:
      t: (B,) or scalar times.
      dim: even feature count.
      max_freq: highest angular frequency; frequencies are geometric in [1, max_freq].
    Returns:
      (B, dim) float32 (a scalar t gives (1, dim)).
    """
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    half = dim // 2
    freqs = jnp.exp(jnp.linspace(0.0, math.log(max_freq), half, dtype=jnp.float32))
    ang = t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class ResBlock(nn.Module):
    """Pre-norm residual MLP block: x + Dense(SiLU(Dense(LayerNorm(x))))."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(dtype=jnp.float32)(x)
        h = nn.silu(nn.Dense(self.width, dtype=self.dtype)(h))
        h = nn.Dense(self.width, dtype=self.dtype)(h)
        return x + h.astype(x.dtype)


class VelocityMLP(nn.Module):
    """v(x, t, c): additive time + condition embeddings into a residual MLP trunk.

    Attributes:
      out_dim: dimension of x (and of the velocity).
      width: hidden width of every layer.
      depth: number of residual blocks in the trunk.
      time_embed_dim: sinusoidal features of t.
      time_max_freq: highest angular frequency of those features (keep it low: see
        `sinusoidal_embedding`).
      cond_depth: Dense layers of the condition encoder. It runs once per ODE solve (not per
        step), so parameters spent here cost training FLOPs but not sampling FLOPs.
      use_null: learn a null condition embedding (classifier-free guidance / condition dropout).
      dtype: matmul compute dtype (params stay float32).
    """

    out_dim: int
    width: int = 256
    depth: int = 3
    time_embed_dim: int = 128
    time_max_freq: float = 10.0
    cond_depth: int = 2
    use_null: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        w, dt = self.width, self.dtype
        self.cond_layers = [nn.Dense(w, dtype=dt) for _ in range(max(self.cond_depth, 1))]
        self.time_in = nn.Dense(w, dtype=dt)
        self.time_out = nn.Dense(w, dtype=dt)
        self.x_in = nn.Dense(w, dtype=dt)
        self.blocks = [ResBlock(w, dtype=dt) for _ in range(self.depth)]
        self.out_norm = nn.LayerNorm(dtype=jnp.float32)
        # zero-init output: the flow starts as the identity map, early loss = E|x1 - x0|^2
        self.out = nn.Dense(self.out_dim, dtype=dt, kernel_init=nn.initializers.zeros)
        if self.use_null:
            self.null_embedding = self.param("null_embedding", nn.initializers.normal(0.02), (w,))

    def embed_condition(self, cond: Array, null_mask: Array | None = None) -> Array:
        """(B, Dc) condition -> (B, W) embedding; rows with null_mask True get the null embedding."""
        h = self.cond_layers[0](cond)
        for layer in self.cond_layers[1:]:
            h = layer(nn.silu(h))
        h = h.astype(jnp.float32)
        if null_mask is not None:
            if not self.use_null:
                raise ValueError("null_mask given but VelocityMLP.use_null is False")
            h = jnp.where(null_mask[:, None], self.null_embedding[None, :], h)
        return h

    def null_condition(self, batch: int) -> Array:
        """(batch, W) copies of the learned null embedding."""
        return jnp.broadcast_to(self.null_embedding[None, :], (batch, self.width))

    def embed_time(self, t: Array) -> Array:
        """(B,) or scalar t -> (B, W) (or (1, W)): broadcast against the batch in `trunk`."""
        h = sinusoidal_embedding(t, self.time_embed_dim, self.time_max_freq)
        return self.time_out(nn.silu(self.time_in(h))).astype(jnp.float32)

    def trunk(self, x: Array, t_emb: Array, c_emb: Array) -> Array:
        """Velocity from precomputed embeddings. x (B, D), t_emb (B|1, W), c_emb (B, W) -> (B, D)."""
        h = self.x_in(x).astype(jnp.float32) + t_emb + c_emb
        for block in self.blocks:
            h = block(h)
        return self.out(self.out_norm(h)).astype(jnp.float32)

    def __call__(self, x: Array, t: Array, cond: Array, null_mask: Array | None = None) -> Array:
        """x (B, D), t (B,), cond (B, Dc) -> v (B, D)."""
        return self.trunk(x, self.embed_time(t), self.embed_condition(cond, null_mask))


def linear_path(x0: Array, x1: Array, t: Array) -> tuple[Array, Array]:
    """The rectified-flow path and its exact target velocity.

    Args:
      x0: (B, D) noise; x1: (B, D) data; t: (B,) times.
    Returns:
      x_t (B, D) = (1 - t) x0 + t x1 and u (B, D) = x1 - x0.
    """
    tt = t[:, None]
    return (1.0 - tt) * x0 + tt * x1, x1 - x0


def ot_coupling_index(
    key: Array, x0: Array, x1: Array, cond: Array | None = None, *, epsilon: float = 0.05,
    cond_weight: float = 10.0, max_iterations: int = 200,
) -> Array:
    """Index of the noise row coupled to each target by a minibatch (conditional) entropic OT plan.

    Only x0 is re-assigned: target j keeps its own (x1[j], cond[j]) and gets noise row idx[j]
    drawn from column j of the plan. Reordering x1 or cond instead would detach targets from their
    conditions and fit the wrong conditional (the failure mode of using an unconditional OT
    sampler on per-cell conditions).

    With a condition, the source points are (x0_i, cond_i) (the batch's own conditions, i.e. the
    condition marginal) and the cost is |x0_i - x1_j|^2 / D + cond_weight |c_i - c_j|^2 / Dc, the
    "conditional OT" of Kerrigan et al. 2024 / Chemseddine et al. 2024: a large cond_weight keeps
    couplings within (near-)equal conditions so x0 stays ~N(0, I) given the condition (plain
    x-space OT would make the noise depend on the condition and bias p(x1 | c)).

    Args:
      key: PRNG key for sampling from the plan.
      x0: (B, D) noise; x1: (B, D) targets; cond: optional (B, Dc) conditions.
      epsilon: Sinkhorn regularisation relative to the mean cost.
      cond_weight: weight of the condition distance.
      max_iterations: Sinkhorn iterations cap.
    Returns:
      (B,) int indices into the rows of x0.
    """
    from ott.geometry import pointcloud
    from ott.solvers import linear

    d = x0.shape[-1]
    src, tgt = x0 / math.sqrt(d), x1 / math.sqrt(d)
    if cond is not None:
        c = cond * jnp.sqrt(cond_weight / cond.shape[-1])
        src, tgt = jnp.concatenate([src, c], -1), jnp.concatenate([tgt, c], -1)
    geom = pointcloud.PointCloud(jax.lax.stop_gradient(src), jax.lax.stop_gradient(tgt),
                                 epsilon=epsilon, scale_cost="mean")
    plan = linear.solve(geom, max_iterations=max_iterations).matrix  # (B_src, B_tgt)
    return jax.random.categorical(key, jnp.log(plan.T + 1e-30), axis=-1)


def ot_couple_noise(key: Array, x0: Array, x1: Array, cond: Array | None = None, **kw) -> Array:
    """(B, D) noise re-assigned to the targets by `ot_coupling_index` (rows of x0)."""
    return x0[ot_coupling_index(key, x0, x1, cond, **kw)]


def sample_path(key: Array, x1: Array, cond: Array | None = None, *, ot: bool = False,
                ot_epsilon: float = 0.05, ot_cond_weight: float = 10.0) -> dict[str, Array]:
    """Draw (x0, t, x_t, u) for a batch of targets.

    Returns:
      dict with x0 (B, D), t (B,), xt (B, D), u (B, D) = x1 - x0.
    """
    k0, kt, kot = jax.random.split(key, 3)
    x0 = jax.random.normal(k0, x1.shape, jnp.float32)
    if ot:
        x0 = ot_couple_noise(kot, x0, x1, cond, epsilon=ot_epsilon, cond_weight=ot_cond_weight)
    t = jax.random.uniform(kt, (x1.shape[0],), jnp.float32)
    xt, u = linear_path(x0, x1, t)
    return {"x0": x0, "t": t, "xt": xt, "u": u}


def flow_matching_loss(
    params: Any, apply_fn: Callable, x1: Array, cond: Array, key: Array, *, ot: bool = False,
    ot_epsilon: float = 0.05, ot_cond_weight: float = 10.0, cond_drop_prob: float = 0.0,
) -> Array:
    """Conditional flow-matching loss, mean over batch and dimensions of |v - (x1 - x0)|^2.

    Args:
      params: parameters of the velocity network.
      apply_fn: ``apply_fn(params, x_t, t, cond, null_mask) -> (B, D)`` velocity.
      x1: (B, D) targets; cond: (B, Dc) their conditions (pairing is never changed).
      key: PRNG key (noise, times, OT sampling, condition dropout).
      cond_drop_prob: probability of replacing a row's condition with the null embedding (CFG).
    Returns:
      scalar loss.
    """
    kp, kd = jax.random.split(key)
    path = sample_path(kp, x1, cond, ot=ot, ot_epsilon=ot_epsilon, ot_cond_weight=ot_cond_weight)
    null_mask = None
    if cond_drop_prob > 0:
        null_mask = jax.random.bernoulli(kd, cond_drop_prob, (x1.shape[0],))
    v = apply_fn(params, path["xt"], path["t"], cond, null_mask)
    return jnp.mean(jnp.square(v - path["u"]))
