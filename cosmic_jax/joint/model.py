"""Joint latent model of morphology m (N, Dm) and expression e (N, De) embeddings.

Three parts trained together in one jitted, data-parallel step (batch split over the mesh):
  * contrastive encoders m -> z_m, e -> z_e (unit-norm, CLIP / InfoNCE with a learned temperature):
    the joint latent used for retrieval, clustering and `joint_latent`;
  * p(e | m) and p(m | e): conditional flow-matching decoders (`VelocityMLP`), conditioned by
    default on the other modality's *standardised input embedding* (``condition_on="input"``), or on
    its stop-gradient latent (``condition_on="latent"``).

Why condition on the input by default: the conditional spread must be right, and a conditioner that
drops information the target depends on widens p(e | m) (the flow then models p(e | z_m), a mixture
over every m with the same z_m). The InfoNCE latent is such a lossy summary: it is unit-norm and is
trained only to be discriminative, not sufficient. The input embedding is sufficient by definition,
and stop-gradient latents would also couple two objectives through one representation.

Inputs are standardised per feature inside (mean/std stored with the model); samples come back in
the caller's units.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cosmic_jax.configs.joint import JointConfig
from cosmic_jax.joint.flow import VelocityMLP, flow_matching_loss
from cosmic_jax.joint.sampling import FIXED_METHODS, solve_flow

log = logging.getLogger(__name__)

MODEL_FILE = "joint_model.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


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
class _Nets:
    enc_m: Encoder
    enc_e: Encoder
    flow_e: VelocityMLP  # p(e | m): generates e
    flow_m: VelocityMLP  # p(m | e): generates m


def _build_nets(cfg: JointConfig, dm: int, de: int) -> _Nets:
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    flow = partial(VelocityMLP, width=cfg.flow_width, depth=cfg.flow_depth, time_embed_dim=cfg.time_embed_dim,
                   time_max_freq=cfg.time_max_freq, cond_depth=cfg.cond_depth,
                   use_null=cfg.cfg_dropout > 0, dtype=dtype)
    enc = partial(Encoder, cfg.latent_dim, cfg.enc_width, cfg.enc_depth)
    return _Nets(enc_m=enc(), enc_e=enc(), flow_e=flow(out_dim=de), flow_m=flow(out_dim=dm))


def _init_params(nets: _Nets, cfg: JointConfig, dm: int, de: int, key: jax.Array) -> dict:
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


def _conditions(nets: _Nets, cfg: JointConfig, params: dict, m: jax.Array, e: jax.Array):
    """Conditions of (p(e|m), p(m|e)) and the latents."""
    z_m = nets.enc_m.apply(params["enc_m"], m)
    z_e = nets.enc_e.apply(params["enc_e"], e)
    if cfg.condition_on == "input":
        return m, e, z_m, z_e
    return jax.lax.stop_gradient(z_m), jax.lax.stop_gradient(z_e), z_m, z_e


def _loss_fn(params: dict, nets: _Nets, cfg: JointConfig, m: jax.Array, e: jax.Array, key: jax.Array):
    c_e, c_m, z_m, z_e = _conditions(nets, cfg, params, m, e)
    ke, km = jax.random.split(key)
    fm_kw = dict(ot=cfg.ot, ot_epsilon=cfg.ot_epsilon, ot_cond_weight=cfg.ot_cond_weight,
                 cond_drop_prob=cfg.cfg_dropout)
    fm_e = flow_matching_loss(params["flow_e"], nets.flow_e.apply, e, c_e, ke, **fm_kw)
    fm_m = flow_matching_loss(params["flow_m"], nets.flow_m.apply, m, c_m, km, **fm_kw)
    con = clip_loss(z_m, z_e, params["logit_scale"])
    total = fm_e + fm_m + cfg.contrastive_weight * con
    return total, {"loss": total, "fm_expr": fm_e, "fm_morph": fm_m, "contrastive": con}


def make_optimizer(cfg: JointConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup_steps, max(cfg.steps - 1, 1)), cfg.steps, cfg.lr * cfg.end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(sched, weight_decay=cfg.weight_decay))


# ----------------------------------------------------------------------------------------------
# input checks and standardisation


def _as_matrix(x: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert to a float array ({err})") from err
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (cells, features) array, got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name}: {rows.size} row(s) contain NaN/inf (first rows: {rows[:10].tolist()}); "
                         "drop or impute those cells before fitting")
    return a


def _check_inputs(m: Any, e: Any, cfg: JointConfig, labels: Any = None):
    m = _as_matrix(m, "m (morphology embeddings)")
    e = _as_matrix(e, "e (expression embeddings)")
    if m.shape[0] != e.shape[0]:
        raise ValueError(f"m has {m.shape[0]} cells but e has {e.shape[0]}; rows must be paired cells")
    if m.shape[0] < cfg.min_cells:
        raise ValueError(f"too few cells to fit the joint model: {m.shape[0]} < min_cells={cfg.min_cells}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[:1] != (m.shape[0],):
            raise ValueError(f"labels has shape {labels.shape}, expected ({m.shape[0]},)")
    return m, e, labels


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)  # constant features: keep them constant, avoid 0/0
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# the fitted model


class JointModel:
    """A fitted joint model: encoders, both conditional flows, standardisation, loss history.

    Build it with `fit_joint` or `JointModel.load`.
    """

    def __init__(self, config: JointConfig, params: dict, stats: dict, loss_history: dict | None = None,
                 info: dict | None = None):
        self.config = config
        self.params = jax.device_put(jax.device_get(params), jax.devices()[0])
        self.stats = {k: {kk: np.asarray(vv, np.float32) for kk, vv in v.items()} for k, v in stats.items()}
        self.dim_morph = int(self.stats["m"]["mean"].shape[0])
        self.dim_expr = int(self.stats["e"]["mean"].shape[0])
        self.loss_history = loss_history or {}
        self.info = info or {}
        self.nets = _build_nets(config, self.dim_morph, self.dim_expr)
        self._jit_cache: dict = {}

    # -- standardisation ---------------------------------------------------------------------
    def _std(self, x, which: str, name: str) -> np.ndarray:
        a = _as_matrix(x, name)
        d = self.stats[which]["mean"].shape[0]
        if a.shape[1] != d:
            raise ValueError(f"{name}: expected {d} features (as at fit time), got {a.shape[1]}")
        return (a - self.stats[which]["mean"]) / self.stats[which]["std"]

    def _unstd(self, x: np.ndarray, which: str) -> np.ndarray:
        return x * self.stats[which]["std"] + self.stats[which]["mean"]

    # -- encoders ------------------------------------------------------------------------------
    def _encode(self, which: str, x_std: np.ndarray, batch: int = 65536) -> np.ndarray:
        net = self.nets.enc_m if which == "m" else self.nets.enc_e
        key = ("enc", which)
        if key not in self._jit_cache:
            self._jit_cache[key] = jax.jit(net.apply)
        fn, p = self._jit_cache[key], self.params["enc_" + which]
        return np.concatenate([np.asarray(fn(p, x_std[i:i + batch])) for i in range(0, len(x_std), batch)]
                              or [np.zeros((0, self.config.latent_dim), np.float32)])

    def encode_morph(self, m) -> np.ndarray:
        """(N, Dm) morphology embeddings -> (N, Dz) unit-norm joint-latent codes."""
        return self._encode("m", self._std(m, "m", "m"))

    def encode_expr(self, e) -> np.ndarray:
        """(N, De) expression embeddings -> (N, Dz) unit-norm joint-latent codes."""
        return self._encode("e", self._std(e, "e", "e"))

    def joint_latent(self, m, e) -> np.ndarray:
        """(N, Dm), (N, De) -> (N, Dz): the normalised mean of the two modality codes."""
        z = self.encode_morph(m) + self.encode_expr(e)
        return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-6)

    def retrieval_accuracy(self, m, e, k: int = 1) -> float:
        """Fraction of cells whose partner expression is among the top-k of its morphology's code."""
        zm, ze = self.encode_morph(m), self.encode_expr(e)
        sims = zm @ ze.T
        topk = np.argsort(-sims, axis=1)[:, :k]
        return float(np.mean((topk == np.arange(len(zm))[:, None]).any(axis=1)))

    # -- conditional sampling ------------------------------------------------------------------
    def _sampler(self, target: str, num_samples: int, method: str, steps: int, guidance: float):
        key = ("sample", target, num_samples, method, steps, guidance)
        power = self.config.solver_time_power
        if key in self._jit_cache:
            return self._jit_cache[key]
        flow = self.nets.flow_e if target == "e" else self.nets.flow_m
        d_out = self.dim_expr if target == "e" else self.dim_morph
        src_enc = self.nets.enc_m if target == "e" else self.nets.enc_e
        latent_cond = self.config.condition_on == "latent"

        def run(params, cond_src, cell_ids, base_key):
            # Per-cell noise from fold_in(key, cell id): a cell's samples do not depend on chunking.
            noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base_key, i), (num_samples, d_out)))(
                cell_ids)  # (C, S, D)
            cond = src_enc.apply(params["enc"], cond_src) if latent_cond else cond_src
            c = cond.shape[0]
            x0 = jnp.swapaxes(noise, 0, 1).reshape(num_samples * c, d_out)
            x1 = solve_flow(flow, params["flow"], cond, x0, method=method, steps=steps, time_power=power,
                            guidance=guidance, repeats=num_samples)
            return x1.reshape(num_samples, c, d_out)

        self._jit_cache[key] = jax.jit(run)
        return self._jit_cache[key]

    def _sample(self, target: str, cond_std: np.ndarray, num_samples: int, seed: int, method, steps, guidance,
                chunk_rows) -> np.ndarray:
        cfg = self.config
        method = method or cfg.solver
        steps = int(steps or cfg.solver_steps)
        guidance = float(cfg.guidance if guidance is None else guidance)
        if guidance != 1.0 and cfg.cfg_dropout <= 0:
            raise ValueError("guidance != 1 needs a model trained with cfg_dropout > 0 (no null condition learned)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        n = cond_std.shape[0]
        d_out = self.dim_expr if target == "e" else self.dim_morph
        out = np.empty((num_samples, n, d_out), np.float32)
        if n == 0:
            return out
        fn = self._sampler(target, num_samples, method, steps, guidance)
        params = {"flow": self.params["flow_" + target], "enc": self.params["enc_" + ("m" if target == "e" else "e")]}
        # Equal chunks (cells), rounded up to 64 so few shapes are compiled and padding is small.
        rows = max(num_samples, int(chunk_rows or cfg.sample_chunk))
        n_chunks = math.ceil(n * num_samples / rows)
        per = max(1, min(-(-math.ceil(n / n_chunks) // 64) * 64, rows // num_samples, n))
        base = jax.random.key(seed)
        pending = []  # dispatch every chunk first (async), then copy back: the host never idles the CPU
        for start in range(0, n, per):
            ids = np.arange(start, min(start + per, n))
            pad = per - ids.size
            ids_p = np.concatenate([ids, np.full(pad, ids[-1])]) if pad else ids
            pending.append((ids, fn(params, cond_std[ids_p], ids_p.astype(np.int32), base)))
        for ids, res in pending:
            out[:, ids] = np.asarray(res)[:, :ids.size]
        return self._unstd(out, target)

    def sample_expr_given_morph(self, m, num_samples: int = 1, seed: int = 0, *, solver: str | None = None,
                                steps: int | None = None, guidance: float | None = None,
                                chunk_rows: int | None = None) -> np.ndarray:
        """Draw e ~ p(e | m) for every cell.

        Args:
          m: (N, Dm) morphology embeddings (caller's units).
          num_samples: S draws per cell.
          seed: PRNG seed; cell i's draws depend only on (seed, i), not on N or chunking.
          solver, steps, guidance: override the config's ODE solver / steps / CFG weight.
          chunk_rows: rows (cells x S) per jitted solve.
        Returns:
          (S, N, De) float32 samples in the expression embedding's units.
        """
        return self._sample("e", self._std(m, "m", "m"), num_samples, seed, solver, steps, guidance, chunk_rows)

    def sample_morph_given_expr(self, e, num_samples: int = 1, seed: int = 0, *, solver: str | None = None,
                                steps: int | None = None, guidance: float | None = None,
                                chunk_rows: int | None = None) -> np.ndarray:
        """Draw m ~ p(m | e) for every cell. e (N, De) -> (S, N, Dm); see `sample_expr_given_morph`."""
        return self._sample("m", self._std(e, "e", "e"), num_samples, seed, solver, steps, guidance, chunk_rows)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write ``directory/joint_model.json`` (config, standardisation, history) + orbax params.

        Returns:
          the absolute directory.
        """
        import orbax.checkpoint as ocp

        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        ppath = os.path.join(directory, PARAMS_DIR)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(ppath, self.params, force=True)
        ckptr.wait_until_finished()
        meta = {
            "format_version": FORMAT_VERSION,
            "config": dataclasses.asdict(self.config),
            "dim_morph": self.dim_morph,
            "dim_expr": self.dim_expr,
            "stats": {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in self.stats.items()},
            "loss_history": self.loss_history,
            "info": self.info,
        }
        tmp = os.path.join(directory, MODEL_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(directory, MODEL_FILE))
        return directory

    @classmethod
    def load(cls, directory: str) -> "JointModel":
        """Read a model written by `save`; errors name the missing / corrupt file."""
        import orbax.checkpoint as ocp

        directory = os.path.abspath(directory)
        mpath = os.path.join(directory, MODEL_FILE)
        try:
            with open(mpath) as f:
                meta = json.load(f)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{mpath}: not found; is {directory!r} a saved JointModel?") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{mpath}: corrupt JSON ({err})") from err
        try:
            cfg = JointConfig.from_dict(meta["config"])
            dm, de = int(meta["dim_morph"]), int(meta["dim_expr"])
            stats = {k: {kk: np.asarray(vv, np.float32) for kk, vv in v.items()} for k, v in meta["stats"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{mpath}: missing or invalid entry ({err})") from err
        nets = _build_nets(cfg, dm, de)
        target = jax.eval_shape(lambda: _init_params(nets, cfg, dm, de, jax.random.key(0)))
        ppath = os.path.join(directory, PARAMS_DIR)
        if not os.path.isdir(ppath):
            raise FileNotFoundError(f"{ppath}: parameter checkpoint missing")
        try:
            params = ocp.StandardCheckpointer().restore(ppath, target)
        except Exception as err:  # orbax raises several types; name the file either way
            raise ValueError(f"{ppath}: cannot restore parameters ({type(err).__name__}: {err})") from err
        return cls(cfg, params, stats, meta.get("loss_history"), meta.get("info"))


# ----------------------------------------------------------------------------------------------
# training


@functools.lru_cache(maxsize=8)
def _train_fns(cfg: JointConfig, n: int, dm: int, de: int, batch: int, devices: tuple):
    """Jitted (init, train-chunk) for one problem shape, cached so repeated / resumed fits reuse the compile.

    Returns:
      init(key) -> state; chunk(state, m_std, e_std, root_key, num_steps) -> (state, per-step aux);
      the state's shardings; the replicated sharding.
    """
    from cosmic_jax.train import sharding as shd

    mesh = shd.make_mesh(devices=list(devices))
    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    nets = _build_nets(cfg, dm, de)
    tx = make_optimizer(cfg)

    def init_state(key):
        params = _init_params(nets, cfg, dm, de, key)
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    state_sh = shd.state_shardings(abstract, mesh)
    init_fn = jax.jit(init_state, out_shardings=state_sh)

    def train_chunk(state, m_all, e_all, root, num):
        def one(st, _):
            # keys from (seed, step): a resumed run draws exactly the batches of an uninterrupted one
            kidx, kloss = jax.random.split(jax.random.fold_in(jax.random.fold_in(root, 1), st["step"]))
            # Without replacement (no duplicate partners = no false InfoNCE negatives) while the
            # permutation is cheap; uniform with replacement for large N (duplicates ~B^2/2N, rare).
            if n <= 16 * batch:
                idx = jax.random.choice(kidx, n, (batch,), replace=False)
            else:
                idx = jax.random.randint(kidx, (batch,), 0, n)
            mb = jax.lax.with_sharding_constraint(m_all[idx], bsh)
            eb = jax.lax.with_sharding_constraint(e_all[idx], bsh)
            grads, aux = jax.grad(partial(_loss_fn, nets=nets, cfg=cfg), has_aux=True)(
                st["params"], m=mb, e=eb, key=kloss)
            upd, opt = tx.update(grads, st["opt"], st["params"])
            params = optax.apply_updates(st["params"], upd)
            return {"params": params, "opt": opt, "step": st["step"] + 1}, aux

        return jax.lax.scan(one, state, None, length=num)

    chunk_fn = jax.jit(train_chunk, static_argnums=(4,), in_shardings=(state_sh, rep, rep, rep),
                       out_shardings=(state_sh, rep), donate_argnums=(0,))
    return init_fn, chunk_fn, state_sh, rep


def fit_joint(m, e, config: JointConfig | None = None, workdir: str | None = None, seed: int | None = None,
              labels=None, verbose: bool = False) -> JointModel:
    """Fit encoders + both conditional flows on paired cells.

    Args:
      m: (N, Dm) morphology embeddings; e: (N, De) expression embeddings (row i = the same cell).
      config: `JointConfig` (default `JointConfig()`).
      workdir: if given, periodic orbax checkpoints go to ``workdir/checkpoints`` (a rerun with the
        same config resumes from the latest) and the final model is saved to ``workdir/model``.
      seed: PRNG seed (default ``config.seed``); same seed + data + device count = same model.
      labels: optional (N,) cell labels; only used for the label-level retrieval diagnostic in `info`.
      verbose: log the loss every ``log_every`` steps.
    Returns:
      the fitted `JointModel` (``loss_history``: per-step loss, fm_expr, fm_morph, contrastive).
    """
    from cosmic_jax.train import sharding as shd

    cfg = config or JointConfig()
    seed = cfg.seed if seed is None else int(seed)
    m, e, labels = _check_inputs(m, e, cfg, labels)
    n, dm = m.shape
    de = e.shape[1]
    stats = {"m": _stats(m), "e": _stats(e)}
    ms = (m - stats["m"]["mean"]) / stats["m"]["std"]
    es = (e - stats["e"]["mean"]) / stats["e"]["std"]

    devices = tuple(jax.devices()[: cfg.num_devices or None])
    ndev = len(devices)
    batch = max(ndev, min(cfg.batch_size, n) // ndev * ndev)  # no duplicate cells within a batch if N is small
    init_fn, chunk_fn, state_sh, rep = _train_fns(cfg, n, dm, de, batch, devices)
    root = jax.random.key(seed)
    state = init_fn(jax.random.fold_in(root, 0))
    data_m = jax.device_put(ms, rep)
    data_e = jax.device_put(es, rep)

    history: dict[str, list[float]] = {"loss": [], "fm_expr": [], "fm_morph": [], "contrastive": []}
    ckpt = None
    if workdir:
        from cosmic_jax.train.checkpoint import Checkpointer

        os.makedirs(workdir, exist_ok=True)
        ckpt = Checkpointer(workdir, save_every=cfg.checkpoint_every, keep=2, async_save=False)
        cfg_path = os.path.join(workdir, "joint_config.json")
        if ckpt.latest_step() is not None:
            saved_cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
            if saved_cfg != dataclasses.asdict(cfg):
                raise ValueError(f"{workdir}: holds checkpoints of a different JointConfig ({cfg_path}); "
                                 "use a fresh workdir")
            target = shd.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
            state, _ = ckpt.restore(target)
            hpath = os.path.join(workdir, "loss_history.json")
            if os.path.exists(hpath):
                history = json.load(open(hpath))
            done = int(state["step"])
            history = {k: v[:done] for k, v in history.items()}
        with open(cfg_path, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1, sort_keys=True)

    t_start = time.perf_counter()
    step = int(state["step"])
    while step < cfg.steps:
        num = min(cfg.steps_per_call, cfg.steps - step)
        if ckpt is not None:  # end chunks on checkpoint steps
            num = min(num, cfg.checkpoint_every - step % cfg.checkpoint_every)
        state, aux = chunk_fn(state, data_m, data_e, root, num)
        aux = jax.device_get(aux)
        for k in history:
            history[k].extend(np.asarray(aux[k], np.float64).tolist())
        if not np.isfinite(aux["loss"]).all():
            bad = step + int(np.flatnonzero(~np.isfinite(aux["loss"]))[0])
            raise FloatingPointError(f"fit_joint: non-finite loss at step {bad}; lower lr or check the inputs")
        step += num
        if verbose and (step % cfg.log_every < num or step == cfg.steps):
            log.info("fit_joint step %d/%d loss %.4f (fm_e %.4f fm_m %.4f con %.4f) %.1f s", step, cfg.steps,
                     *(history[k][-1] for k in ("loss", "fm_expr", "fm_morph", "contrastive")),
                     time.perf_counter() - t_start)
        if ckpt is not None and (ckpt.should_save(step) or step == cfg.steps):
            ckpt.save(step, state, force=step == cfg.steps)
            with open(os.path.join(workdir, "loss_history.json"), "w") as f:
                json.dump(history, f)
    if ckpt is not None:
        ckpt.close()
    train_s = time.perf_counter() - t_start

    info = {"n_cells": int(n), "batch_size": int(batch), "devices": ndev, "seed": seed, "train_seconds": train_s}
    model = JointModel(cfg, state["params"], stats, history, info)
    sub = np.random.default_rng(seed).permutation(n)[: min(n, 1024)]
    info["retrieval_top1_train_subset"] = model.retrieval_accuracy(m[sub], e[sub])
    if labels is not None:
        zm, ze = model.encode_morph(m[sub]), model.encode_expr(e[sub])
        nearest = np.argmax(zm @ ze.T, axis=1)
        info["label_match_top1_train_subset"] = float(np.mean(labels[sub][nearest] == labels[sub]))
    if workdir:
        model.save(os.path.join(workdir, "model"))
    return model
