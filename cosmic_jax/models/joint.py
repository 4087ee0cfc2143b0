"""Joint latent model networks of morphology m (N, Dm) and expression e (N, De) embeddings, and its loss.

Three parts trained together:
  * contrastive encoders m -> z_m, e -> z_e (unit-norm, CLIP / InfoNCE with a learned temperature):
    the joint latent used for retrieval, clustering and ``JointModel.joint_latent``;
  * p(e | m) and p(m | e): conditional flow-matching decoders (``VelocityMLP``), conditioned by
    default on the other modality's *standardised input embedding* (``condition_on="input"``), or on
    its stop-gradient latent (``condition_on="latent"``).

Why condition on the input by default: the conditional spread must be right, and a conditioner that
drops information the target depends on widens p(e | m) (the flow then models p(e | z_m), a mixture
over every m with the same z_m). The InfoNCE latent is such a lossy summary: it is unit-norm and is
trained only to be discriminative, not sufficient. The input embedding is sufficient by definition,
and stop-gradient latents would also couple two objectives through one representation.

Settings: the ``model`` group of ``configs/joint.py``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cosmic_jax.models.flow import VelocityMLP, flow_matching_loss

CONDITION_ON = ("input", "latent")


class Encoder(nn.Module):
    """MLP -> unit-norm latent. (B, D) -> (B, latent_dim)."""

    latent_dim: int
    width: int = 256
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        h = x
        for _ in range(self.depth):
            h = nn.silu(nn.LayerNorm()(nn.Dense(self.width)(h)))
        z = nn.Dense(self.latent_dim)(h)
        return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-6)


@dataclasses.dataclass(frozen=True)
class JointNets:
    enc_m: Encoder
    enc_e: Encoder
    flow_e: VelocityMLP  # p(e | m): generates e
    flow_m: VelocityMLP  # p(m | e): generates m


def check_config(cfg: Any) -> None:
    """Raise ValueError naming the field of a joint ``model`` config that no network can use."""
    if cfg.condition_on not in CONDITION_ON:
        raise ValueError(f"joint model.condition_on={cfg.condition_on!r}; expected one of {CONDITION_ON}")
    if cfg.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"joint model.compute_dtype={cfg.compute_dtype!r}; expected float32 or bfloat16")
    for name in ("latent_dim", "enc_width", "flow_width", "flow_depth"):
        if cfg[name] <= 0:
            raise ValueError(f"joint model.{name} must be > 0, got {cfg[name]}")
    if not 0.0 <= cfg.cfg_dropout < 1.0:
        raise ValueError(f"joint model.cfg_dropout must be in [0, 1), got {cfg.cfg_dropout}")


def build_nets(cfg: Any, dm: int, de: int) -> JointNets:
    """The four networks for morphology dim ``dm`` and expression dim ``de``."""
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    flow = partial(VelocityMLP, width=cfg.flow_width, depth=cfg.flow_depth, time_embed_dim=cfg.time_embed_dim,
                   time_max_freq=cfg.time_max_freq, cond_depth=cfg.cond_depth, use_null=cfg.cfg_dropout > 0,
                   dtype=dtype)
    enc = partial(Encoder, cfg.latent_dim, cfg.enc_width, cfg.enc_depth)
    return JointNets(enc_m=enc(), enc_e=enc(), flow_e=flow(out_dim=de), flow_m=flow(out_dim=dm))


def init_params(nets: JointNets, cfg: Any, dm: int, de: int, key: jax.Array) -> dict:
    k = jax.random.split(key, 4)
    cm = dm if cfg.condition_on == "input" else cfg.latent_dim
    ce = de if cfg.condition_on == "input" else cfg.latent_dim
    t = jnp.zeros((2,))
    return {
        "enc_m": nets.enc_m.init(k[0], jnp.zeros((2, dm))),
        "enc_e": nets.enc_e.init(k[1], jnp.zeros((2, de))),
        "flow_e": nets.flow_e.init(k[2], jnp.zeros((2, de)), t, jnp.zeros((2, cm))),
        "flow_m": nets.flow_m.init(k[3], jnp.zeros((2, dm)), t, jnp.zeros((2, ce))),
        "logit_scale": jnp.asarray(math.log(1.0 / cfg.init_temperature), jnp.float32),
    }


def clip_loss(z_a: jax.Array, z_b: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """Symmetric InfoNCE over the batch; row i of z_a and z_b are partners. (B, Dz) x2 -> scalar."""
    logits = jnp.exp(jnp.minimum(logit_scale, math.log(100.0))) * z_a @ z_b.T
    labels = jnp.arange(z_a.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def conditions(nets: JointNets, cfg: Any, params: dict, m: jax.Array, e: jax.Array):
    """Conditions of (p(e|m), p(m|e)) and the latents."""
    z_m = nets.enc_m.apply(params["enc_m"], m)
    z_e = nets.enc_e.apply(params["enc_e"], e)
    if cfg.condition_on == "input":
        return m, e, z_m, z_e
    return jax.lax.stop_gradient(z_m), jax.lax.stop_gradient(z_e), z_m, z_e


def joint_loss(params: dict, nets: JointNets, cfg: Any, m: jax.Array, e: jax.Array, key: jax.Array):
    """Flow matching in both directions + weighted InfoNCE; returns (total, metrics)."""
    c_e, c_m, z_m, z_e = conditions(nets, cfg, params, m, e)
    ke, km = jax.random.split(key)
    fm_kw = dict(ot=cfg.ot, ot_epsilon=cfg.ot_epsilon, ot_cond_weight=cfg.ot_cond_weight,
                 cond_drop_prob=cfg.cfg_dropout)
    fm_e = flow_matching_loss(params["flow_e"], nets.flow_e.apply, e, c_e, ke, **fm_kw)
    fm_m = flow_matching_loss(params["flow_m"], nets.flow_m.apply, m, c_m, km, **fm_kw)
    con = clip_loss(z_m, z_e, params["logit_scale"])
    total = fm_e + fm_m + cfg.contrastive_weight * con
    return total, {"loss": total, "fm_expr": fm_e, "fm_morph": fm_m, "contrastive": con}
