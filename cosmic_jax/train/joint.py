"""The joint-model task for the training loop: its state, its (fused multi-) step and its loss.

The whole (standardised) data set lives on the devices; each step draws its batch inside the
jitted step from keys of (seed, step), so a resumed run draws exactly the batches of an
uninterrupted one and there is no data iterator to checkpoint. ``steps_per_call`` steps run in one
``lax.scan`` (amortises dispatch); the loop cuts calls at checkpoint steps.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.models.joint import build_nets, check_config, init_params, joint_loss
from cosmic_jax.train import optim
from cosmic_jax.train import sharding as shd
from cosmic_jax.train.checkpoint import CONFIG_FILE, Checkpointer, checkpoint_steps
from cosmic_jax.train.loop import Hook, train_loop
from cosmic_jax.train.metrics import MetricWriter, read_metrics
from cosmic_jax.train.state import TrainState

log = logging.getLogger(__name__)


ROWS_BUCKET = 256  # the data are zero-padded to a multiple of this many rows


@functools.lru_cache(maxsize=8)
def _compiled(cfg: ml_collections.FrozenConfigDict, n_pad: int, dm: int, de: int, batch: int, devices: tuple):
    """(init fn, mesh, multi-step fn, state shardings, replicated sharding) for one padded problem shape.

    The number of real rows is an argument, not a shape: the folds of a cross-fit (a cell or two
    apart) share one compile.
    """
    mesh = shd.make_mesh(devices=list(devices))
    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    nets = build_nets(cfg.model, dm, de)
    optim_cfg = optim.resolve(cfg.optim, cfg.steps)

    def init_state(key):
        params = init_params(nets, cfg.model, dm, de, key)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, optim_cfg=optim_cfg)
        return state.replace(opt_state=state.tx.init(params))

    state_sh = shd.state_shardings(jax.eval_shape(init_state, jax.random.key(0)), mesh)  # no names: replicated

    def multi_step(state, data, root, num):
        m_all, e_all, n = data

        def one(st, _):
            kidx, kloss = jax.random.split(jax.random.fold_in(jax.random.fold_in(root, 1), st.step))
            # Without replacement (no duplicate partners = no false InfoNCE negatives) while the
            # permutation is cheap; uniform with replacement for large N (duplicates ~B^2/2N, rare).
            if n_pad <= 16 * batch:
                keys = jax.random.uniform(kidx, (n_pad,))
                idx = jnp.argsort(jnp.where(jnp.arange(n_pad) < n, keys, 2.0))[:batch]  # padding never drawn
            else:
                idx = jax.random.randint(kidx, (batch,), 0, n)
            mb = jax.lax.with_sharding_constraint(m_all[idx], bsh)
            eb = jax.lax.with_sharding_constraint(e_all[idx], bsh)
            grads, aux = jax.grad(partial(joint_loss, nets=nets, cfg=cfg.model), has_aux=True)(
                st.params, m=mb, e=eb, key=kloss)
            return st.apply_gradients(grads), aux

        return jax.lax.scan(one, state, None, length=num)

    step_fn = jax.jit(multi_step, static_argnums=(3,), in_shardings=(state_sh, rep, rep),
                      out_shardings=(state_sh, rep), donate_argnums=(0,))
    return init_state, mesh, step_fn, state_sh, rep


def train_joint(ms: np.ndarray, es: np.ndarray, cfg: ml_collections.ConfigDict, seed: int,
                workdir: str | None = None, desc: str = "joint fit",
                hooks: tuple[Hook, ...] = (), pad_rows: int = 0) -> tuple[dict, dict[str, list[float]], dict]:
    """Train the joint networks on standardised paired embeddings with the shared loop.

    Args:
      ms: (N, Dm) standardised morphology embeddings; es: (N, De) expression embeddings.
      cfg: joint config (``configs/joint.py``).
      seed: PRNG seed; same seed + data + device count = same parameters.
      workdir: if given, checkpoints (resume: a rerun continues from the newest), the config,
        TensorBoard events and metrics.jsonl go there.
      desc: progress-bar label.
      hooks: periodic callbacks of the loop (e.g. evaluations, fault injection in tests).
      pad_rows: pad the data to at least this many rows (rounded up to ``ROWS_BUCKET``): fits on
        subsets of one data set (cross-fit folds, the half-size fits of the learning-curve
        extrapolation) then share one compile (~8 s wall each on 2 cores). Padding rows are never
        drawn; the batch draw depends on the padded size, so a padded fit equals an unpadded one
        in distribution, not necessarily bit for bit.

    Returns:
      (params on the host, history {"step": [...], "loss": [...], ...} of the logged windows,
       info {"batch_size", "devices"}).
    """
    check_config(cfg.model)
    if cfg.steps <= 0 or cfg.batch_size <= 0 or cfg.steps_per_call <= 0:
        raise ValueError(f"joint steps, batch_size and steps_per_call must be > 0, got "
                         f"{cfg.steps}, {cfg.batch_size}, {cfg.steps_per_call}")
    frozen = cfg_io.frozen(cfg)
    n, dm = ms.shape
    de = es.shape[1]
    devices = tuple(jax.devices()[: cfg.num_devices or None])
    ndev = len(devices)
    batch = max(ndev, min(cfg.batch_size, n) // ndev * ndev)  # no duplicate cells within a batch if N is small
    n_pad = -(-max(n, int(pad_rows)) // ROWS_BUCKET) * ROWS_BUCKET
    init_fn, mesh, step_fn, state_sh, rep = _compiled(frozen, n_pad, dm, de, batch, devices)
    root = jax.random.key(seed)
    pad = ((0, n_pad - n), (0, 0))
    data = (jax.device_put(np.pad(np.asarray(ms, np.float32), pad), rep),
            jax.device_put(np.pad(np.asarray(es, np.float32), pad), rep), jax.device_put(np.int32(n), rep))

    ckpt = None
    if workdir:
        workdir = os.path.abspath(workdir)
        if checkpoint_steps(workdir):
            saved = cfg_io.load(os.path.join(workdir, CONFIG_FILE), joint_configs.get_config(cfg.name))
            changed = [k for k in cfg_io.diff(saved, cfg) if k not in ("progress", "log_every")]
            if changed:
                raise ValueError(f"{workdir}: holds checkpoints of a different joint config ({', '.join(changed)}); "
                                 "use a fresh workdir")
        ckpt = Checkpointer(workdir, save_every=cfg.ckpt_every, keep=2, async_save=False)
    state, _ = shd.create_sharded_state(init_fn, mesh, jax.random.fold_in(root, 0))
    if ckpt is not None and ckpt.latest_step() is not None:
        state, _ = ckpt.restore(shd.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh))
    if workdir:
        cfg_io.save(cfg, os.path.join(workdir, CONFIG_FILE))
    writer = MetricWriter(workdir)
    try:
        state = train_loop(state, step_fn, itertools.repeat(data), num_steps=cfg.steps, rng=root,
                           steps_per_call=cfg.steps_per_call, checkpointer=ckpt, writer=writer,
                           log_every=cfg.log_every, progress=cfg.progress, desc=desc, hooks=hooks)
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()
    rows = read_metrics(workdir) if workdir else writer.rows
    history = {k: [r[k] for r in rows if k in r] for k in ("step", "loss", "fm_expr", "fm_morph", "contrastive")}
    return jax.device_get(state.params), history, {"batch_size": int(batch), "devices": ndev}
