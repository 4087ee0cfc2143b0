"""MAE pretraining: config, mesh, data, state, checkpoints and hooks wired into the one training loop.

``train_and_evaluate(config, data_dir, workdir)`` starts fresh or resumes from the newest readable
checkpoint in ``workdir`` (train state resharded onto the current mesh, data stream continued). The
resolved config is saved as ``W/config.json`` once it has been validated, and a resumed run checks
the new config against it: settings that change what is learned (model, optimizer, data order) must
match; run-length, logging, checkpointing and device settings may change.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.configs import pretrain as pretrain_configs
from cosmic_jax.data.loader import make_train_iterator, train_batch_spec
from cosmic_jax.data.orient import (check_run_pose, dataset_pose, orient_batch, read_run_pose, scale_into,
                                    write_run_pose)
from cosmic_jax.data.records import CropSource, to_values
from cosmic_jax.models.mae import MAE, model_config, param_logical_specs
from cosmic_jax.train import optim
from cosmic_jax.train import sharding as shd
from cosmic_jax.train.checkpoint import CONFIG_FILE, CheckpointError, Checkpointer, checkpoint_steps, load_params
from cosmic_jax.train.loop import Hook, train_loop
from cosmic_jax.train.mae import create_train_state, train_step
from cosmic_jax.train.metrics import MetricWriter, save_recon_grid
from cosmic_jax.train.probe import load_probe_set, probe_scores

log = logging.getLogger(__name__)

# Keys a resumed run may change: how long, how often to log/save/probe, on which devices, where crops
# become float32 (host or device: the same values up to one float32 rounding).
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_ckpts", "async_ckpt", "recon_every",
                     "recon_images", "probe_every", "probe_at_start", "probe_data", "probe_label",
                     "probe_max", "log_batch_indices", "progress", "optim.microbatch", "loader.worker_count",
                     "loader.worker_buffer_size", "loader.worker_transfer_mb", "loader.prefetch",
                     "loader.device_decode", "loader.read_threads", "mesh.", "distributed.")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config of a pretraining workdir (``W/config.json``), typed by its variant."""
    path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no run config; is {workdir!r} a `cosmic pretrain` workdir?")
    try:
        with open(path) as f:
            name = json.load(f).get("name", "test")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt run config ({e})") from None
    if name not in pretrain_configs.VARIANTS:
        raise CheckpointError(f"{path}: unknown config variant {name!r}")
    return cfg_io.load(path, pretrain_configs.get_config(name))


def load_for_inference(workdir: str, step: int | None = None) -> tuple[Any, Any, int, dict[str, Any]]:
    """Model config and params of a pretraining run, on one device, for embedding / export.

    Args:
      workdir: a ``cosmic pretrain`` workdir (``config.json`` + ``checkpoints/``).
      step: checkpoint step; default the newest that restores.

    Returns:
      (model_cfg, params, step, info): the frozen model config, the MAE parameter pytree and a dict
      with ``config`` (the whole run config as a dict), ``workdir``, ``steps`` (all saved steps) and
      ``pose`` (the pose of the crops it was pretrained on; None for runs that predate the record).
    """
    workdir = os.path.abspath(workdir)
    cfg = load_run_config(workdir)
    try:
        model_cfg = model_config(cfg.model)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(workdir, CONFIG_FILE)}: {e}") from None
    params, step = load_params(workdir, step)
    info = {"config": cfg_io.to_dict(cfg), "workdir": workdir, "steps": checkpoint_steps(workdir),
            "pose": read_run_pose(workdir)}
    return model_cfg, params, step, info


def _check_resume(workdir: str, new: ml_collections.ConfigDict) -> None:
    """A resumed run must learn the same thing: refuse changed model / optimizer / data keys."""
    if not checkpoint_steps(workdir):
        return
    old = load_run_config(workdir)
    changed = cfg_io.diff(old, new)
    fatal = [k for k in changed if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE_CHANGES)]
    if fatal:
        raise ValueError(f"{workdir}: holds checkpoints of a run with a different config ({', '.join(fatal)}); "
                         "resume with the saved config (omit --config) or use a fresh workdir")
    if changed:
        log.info("%s: resuming with changed %s", workdir, ", ".join(changed))


def _fixed_crops(data_dir: str, n: int) -> np.ndarray:
    """The first ``n`` crops of a dataset, unaugmented: (n, H, W, C) float32."""
    src = CropSource(data_dir)
    return np.stack([src[i]["image"] for i in range(min(n, len(src)))])


def _replicated_input(x: np.ndarray, mesh) -> jax.Array:
    # Every process holds the same host array; a replicated global array works under multi-process.
    return jax.make_array_from_process_local_data(shd.replicated(mesh), x, x.shape)


def make_recon_hook(cfg, model_cfg, data_dir: str, workdir: str, mesh, rng) -> Hook:
    """Every ``recon_every`` steps: PNG grid original / masked / reconstruction -> W/recon/."""
    images = _fixed_crops(data_dir, cfg.recon_images)
    x = _replicated_input(images, mesh)
    recon = jax.jit(lambda params, x, k: MAE(model_cfg).apply({"params": params}, x, k, method=MAE.reconstruct),
                    out_shardings=shd.replicated(mesh))

    def fn(step: int, state) -> dict[str, float]:
        out = jax.device_get(recon(state.params, x, rng))
        if jax.process_index() == 0:
            save_recon_grid(os.path.join(workdir, "recon", f"step_{step:07d}.png"), images,
                            images * (1.0 - out["mask"]), out["pasted"], title=f"{model_cfg.name} step {step}")
        return {"recon_loss": float(out["loss"])}

    return Hook(cfg.recon_every, fn, "recon")


def make_probe_hook(cfg, model_cfg, data_dir: str, mesh, pose: dict | None = None) -> Hook:
    """Every ``probe_every`` steps: kNN / linear probe accuracy of mean-pooled encoder features.

    ``train_and_evaluate`` also calls it at step 0 of a fresh run (``probe_at_start``), so the
    random-init accuracy, the baseline a useful pretraining must beat, is logged too. Probe crops are
    put into ``pose``, that of the training crops.
    """
    probe_dir = cfg.probe_data or data_dir
    images, labels = load_probe_set(probe_dir, cfg.probe_label, cfg.probe_max)
    scale = scale_into(pose, probe_dir)
    if scale is not None:
        images = orient_batch(images, scale=scale)
    x = _replicated_input(images, mesh)
    encode = jax.jit(lambda params, x: MAE(model_cfg).apply({"params": params}, x, method=MAE.encode, pool="mean"),
                     out_shardings=shd.replicated(mesh))

    def fn(step: int, state) -> dict[str, float]:
        scores = probe_scores(np.asarray(jax.device_get(encode(state.params, x)), np.float64), labels, seed=cfg.seed)
        log.info("probe at step %d: %s", step, scores)
        return scores

    return Hook(cfg.probe_every, fn, "probe")


class _BatchIndexLog:
    """Shards each host batch; optionally writes its per-process example indices (data-order checks)."""

    def __init__(self, workdir: str, start: int, mesh, enabled: bool):
        self.step, self.mesh, self.f = start, mesh, None
        if enabled:
            self.f = open(os.path.join(workdir, f"batch_indices.p{jax.process_index()}.jsonl"), "a")

    def __call__(self, batch):
        self.step += 1
        if self.f is not None:
            self.f.write(json.dumps({"step": self.step, "index": np.asarray(batch["index"]).tolist()}) + "\n")
            self.f.flush()
        return shd.shard_batch(batch, self.mesh)

    def close(self):
        if self.f is not None:
            self.f.close()


def describe_bad_records(batch) -> str:
    """The records of a host batch whose pixels are not finite (for the NaN error), else its range."""
    images = (np.asarray(batch["image"]) if "image" in batch else
              to_values(*(np.asarray(batch[k]) if k in batch else None for k in ("pixels", "scale", "offset"))))
    index = np.asarray(batch.get("index", np.arange(len(images))))
    bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if bad.size:
        return f"non-finite pixels in record(s) {index[bad][:10].tolist()} of the crop dataset"
    return f"records {index[:10].tolist()}{'...' if len(index) > 10 else ''}"


def run_rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, train, hook) keys of a run: what makes two runs with one seed identical."""
    init_rng, train_rng, hook_rng = jax.random.split(jax.random.key(seed), 3)
    return init_rng, train_rng, hook_rng


def train_and_evaluate(config: ml_collections.ConfigDict, data_dir: str, workdir: str,
                       extra_hooks: tuple[Hook, ...] = ()) -> dict[str, Any]:
    """Pretrain the MAE of ``config`` on the crop dataset ``data_dir``, resuming from ``workdir``.

    Args:
      config: run config (``configs/pretrain.py``, e.g. via ``configs.overrides.load_config``).
      data_dir: crop dataset directory (``cosmic_jax.data.records`` format).
      workdir: output dir: config.json, pose.json, checkpoints/, metrics.jsonl, tb/, recon/.
      extra_hooks: more periodic callbacks for the loop (e.g. custom evaluations).

    Returns:
      {"step": final step, "start_step": step resumed from (0 = fresh),
       "state": final TrainState (sharded), "mesh": the Mesh}.
    """
    workdir = os.path.abspath(workdir)
    data_dir = os.path.abspath(data_dir)
    if config.steps <= 0:
        raise ValueError(f"steps must be > 0, got {config.steps}")
    gb = config.loader.global_batch
    if gb <= 0:
        raise ValueError(f"loader.global_batch must be > 0, got {gb}")
    model_cfg = model_config(config.model)
    shd.maybe_initialize_distributed(config.distributed)
    mesh = shd.mesh_from_config(config.mesh)
    optim_cfg = optim.resolve(config.optim, config.steps, gb, mesh.devices.size, mesh.devices.flat[0].platform)
    log.info("mesh %s over %d %s devices; microbatch %d", dict(mesh.shape), mesh.devices.size,
             mesh.devices.flat[0].platform, optim_cfg.microbatch)
    shape = tuple(CropSource(data_dir).image_shape)
    want = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if shape != want:
        raise ValueError(f"{data_dir}: crops are {shape} but model {model_cfg.name!r} expects {want}; "
                         "pick a matching model or set --config.model.image_size / --config.model.channels")
    if gb % mesh.devices.size:
        raise ValueError(f"loader.global_batch={gb} must be divisible by the {mesh.devices.size} devices")
    _check_resume(workdir, config)
    pose = dataset_pose(data_dir)
    check_run_pose(workdir, pose)

    init_rng, train_rng, hook_rng = run_rngs(config.seed)
    init_fn = functools.partial(create_train_state, model_cfg, optim_cfg)
    abstract = jax.eval_shape(init_fn, init_rng)
    shardings = shd.state_shardings(abstract, mesh, param_logical_specs(model_cfg))
    data_iter = make_train_iterator(data_dir, cfg_io.frozen(config.loader))
    ckpt = Checkpointer(workdir, config.ckpt_every, config.keep_ckpts, config.async_ckpt)
    start = 0
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(shd.abstract_with_shardings(abstract, shardings), data_iter)
        log.info("resumed %s from step %d on %d devices", workdir, start, mesh.devices.size)
    else:
        state, _ = shd.create_sharded_state(init_fn, mesh, init_rng, param_specs=param_logical_specs(model_cfg))
    if jax.process_index() == 0:
        cfg_io.save(config, os.path.join(workdir, CONFIG_FILE))  # only once the run is known to start
        write_run_pose(workdir, pose)  # the Embedder puts new crops into this pose

    hooks = []
    if config.recon_every > 0:
        hooks.append(make_recon_hook(config, model_cfg, data_dir, workdir, mesh, hook_rng))
    probe = make_probe_hook(config, model_cfg, data_dir, mesh, pose) if config.probe_every > 0 else None
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    if probe is not None:
        if config.probe_at_start and start == 0:
            # Before the first update (the step donates the state): the random-init baseline.
            writer.write_scalars(0, probe.fn(0, state))
        hooks.append(probe)
    hooks.extend(extra_hooks)
    index_log = _BatchIndexLog(workdir, start, mesh, config.log_batch_indices)
    step_fn = shd.jit_step(functools.partial(train_step, augment=cfg_io.frozen(config.loader.augment)), mesh,
                           shardings)
    if jax.process_count() > 1:
        step_fn = _compile_in_lockstep(step_fn, state, mesh, gb, train_batch_spec(data_dir, config.loader), train_rng)
    try:
        state = train_loop(
            state, step_fn, data_iter, num_steps=config.steps, rng=train_rng,
            fold_rng=False,  # train_step folds state.step into the key itself
            prepare_batch=index_log, describe_batch=describe_bad_records, checkpointer=ckpt,
            data_iterator=data_iter, writer=writer, hooks=hooks, log_every=config.log_every,
            examples_per_step=gb, progress=config.progress, desc=f"pretrain {model_cfg.name}")
    finally:
        index_log.close()
        writer.close()
        ckpt.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return {"step": int(jax.device_get(state.step)), "start_step": start, "state": state, "mesh": mesh}


def _compile_in_lockstep(step_fn, state, mesh, global_batch: int, batch_spec, rng):
    """Compile the step ahead of time, then wait for every process before the first collective.

    CPU (gloo) collectives give up after 30 s if a peer is still compiling; a barrier on the
    distributed client (long timeout) lines the processes up first.
    """
    from jax._src import distributed  # the client's barrier has no public API

    bs = shd.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((global_batch, *shape), jax.dtypes.canonicalize_dtype(dtype), sharding=bs)
             for k, (shape, dtype) in batch_spec.items()}
    compiled = step_fn.lower(state, batch, rng).compile()
    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier("cosmic_pretrain_step_compiled", timeout_in_ms=30 * 60 * 1000)
    return compiled
