"""MAE pretraining: wire config, mesh, data, state, checkpoints and hooks into the generic loop.

``train_and_evaluate(config, data_dir, workdir)`` starts fresh or resumes from the newest
checkpoint in ``workdir`` (train state resharded onto the current mesh, data stream continued).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from cosmic_jax.configs.pretrain import PretrainConfig
from cosmic_jax.train import sharding as shd
from cosmic_jax.train.checkpoint import Checkpointer, load_config, save_config
from cosmic_jax.train.loop import Hook, train_loop
from cosmic_jax.train.metrics import MetricWriter, save_recon_grid

log = logging.getLogger(__name__)


def _fixed_crops(data_dir: str, n: int) -> np.ndarray:
    """The first ``n`` crops of a dataset, unaugmented: (n, H, W, C) float32."""
    from cosmic_jax.data.records import CropSource

    src = CropSource(data_dir)
    return np.stack([src[i]["image"] for i in range(min(n, len(src)))])


def _replicated_input(x: np.ndarray, mesh) -> jax.Array:
    # Every process holds the same host array; a replicated global array works under multi-process.
    return jax.make_array_from_process_local_data(shd.replicated(mesh), x, x.shape)


def make_recon_hook(cfg: PretrainConfig, model_cfg, data_dir: str, workdir: str, mesh, rng) -> Hook:
    """Every ``recon_every`` steps: PNG grid original / masked / reconstruction -> W/recon/."""
    from cosmic_jax.models.mae import MAE

    images = _fixed_crops(data_dir, cfg.recon_images)
    x = _replicated_input(images, mesh)
    rep = shd.replicated(mesh)
    recon = jax.jit(
        lambda params, x, k: MAE(model_cfg).apply({"params": params}, x, k, method=MAE.reconstruct),
        out_shardings=rep,
    )

    def fn(step: int, state) -> dict[str, float]:
        out = jax.device_get(recon(state.params, x, rng))
        if jax.process_index() == 0:
            masked = images * (1.0 - out["mask"])
            save_recon_grid(
                os.path.join(workdir, "recon", f"step_{step:07d}.png"),
                images, masked, out["pasted"], title=f"{model_cfg.name} step {step}",
            )
        return {"recon_loss": float(out["loss"])}

    return Hook(cfg.recon_every, fn, "recon")


def probe_scores(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """5-fold cross-validated kNN (k=5) and logistic-regression accuracy of ``labels`` from ``emb``.

    Args:
      emb: (N, D) embeddings; labels: (N,) class labels.

    Returns:
      {"probe/knn_acc", "probe/linear_acc", "probe/chance"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, counts = np.unique(labels, return_counts=True)
    folds = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    lin = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    return {
        "probe/knn_acc": float(cross_val_score(knn, emb, labels, cv=folds).mean()),
        "probe/linear_acc": float(cross_val_score(lin, emb, labels, cv=folds).mean()),
        "probe/chance": float(counts.max() / counts.sum()),
    }


def load_probe_set(data_dir: str, label_key: str, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C), labels (N,)) from a crop dataset whose meta holds ``label_key``."""
    from cosmic_jax.data.records import CropSource

    src = CropSource(data_dir, with_meta=True)
    n = min(max_n, len(src))
    images, labels = [], []
    for i in range(n):
        el = src[i]
        if label_key not in el["meta"]:
            raise KeyError(f"{data_dir} record {i} ({el['cell_id']}): meta has no probe label {label_key!r}")
        images.append(el["image"])
        labels.append(str(el["meta"][label_key]))
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{data_dir}: probe label {label_key!r} has a single class; nothing to probe")
    return np.stack(images), labels


def make_probe_hook(cfg: PretrainConfig, model_cfg, data_dir: str, mesh) -> Hook:
    """Every ``probe_every`` steps: kNN / linear probe accuracy of mean-pooled encoder features.

    ``train_and_evaluate`` also calls it at step 0 of a fresh run (``probe_at_start``), so the
    random-init accuracy, the baseline a useful pretraining must beat, is logged too.
    """
    from cosmic_jax.models.mae import MAE

    images, labels = load_probe_set(cfg.probe_data or data_dir, cfg.probe_label, cfg.probe_max)
    x = _replicated_input(images, mesh)
    encode = jax.jit(
        lambda params, x: MAE(model_cfg).apply({"params": params}, x, method=MAE.encode, pool="mean"),
        out_shardings=shd.replicated(mesh),
    )

    def fn(step: int, state) -> dict[str, float]:
        emb = np.asarray(jax.device_get(encode(state.params, x)), np.float64)
        scores = probe_scores(emb, labels, seed=cfg.seed)
        log.info("probe at step %d: %s", step, scores)
        return scores

    return Hook(cfg.probe_every, fn, "probe")


class _IndexLog:
    """Writes each step's per-process example indices (for data-order tests); then shards."""

    def __init__(self, workdir: str, start: int, mesh, enabled: bool):
        self.step, self.mesh, self.f = start, mesh, None
        if enabled:
            path = os.path.join(workdir, f"batch_indices.p{jax.process_index()}.jsonl")
            self.f = open(path, "a")

    def __call__(self, batch):
        self.step += 1
        if self.f is not None:
            self.f.write(json.dumps({"step": self.step, "index": np.asarray(batch["index"]).tolist()}) + "\n")
            self.f.flush()
        return shd.shard_batch(batch, self.mesh)

    def close(self):
        if self.f is not None:
            self.f.close()


def _warn_config_change(workdir: str, new: dict[str, Any]) -> None:
    try:
        old = load_config(workdir)
    except Exception:
        return
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        log.warning("%s: resuming with a changed config; differing keys: %s", workdir, changed)


def run_rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, train, hook) keys of a run: what makes two runs with one seed identical."""
    init_rng, train_rng, hook_rng = jax.random.split(jax.random.key(seed), 3)
    return init_rng, train_rng, hook_rng


def train_and_evaluate(
    config: PretrainConfig, data_dir: str, workdir: str, extra_hooks: tuple[Hook, ...] = ()
) -> dict[str, Any]:
    """Pretrain the MAE of ``config`` on the crop dataset ``data_dir``, resuming from ``workdir``.

    Args:
      config: run config (``configs.pretrain.get_config``).
      data_dir: crop dataset directory (``cosmic_jax.data.records`` format).
      workdir: output dir: config.json, checkpoints/, metrics.jsonl, tb/, recon/.
      extra_hooks: more periodic callbacks for the loop (e.g. custom evaluations).

    Returns:
      {"step": final step, "start_step": step resumed from (0 = fresh),
       "state": final TrainState (sharded), "mesh": the Mesh}.
    """
    from cosmic_jax.configs.mae import get_model_config
    from cosmic_jax.data.loader import make_train_iterator
    from cosmic_jax.data.records import CropSource
    from cosmic_jax.train.step import create_train_state, train_step

    shd.maybe_initialize_distributed(config.distributed)
    mesh = shd.mesh_from_config(config.mesh)
    model_cfg = get_model_config(config.model, **config.model_overrides)
    optim_cfg = config.resolved_optim(mesh.devices.size, mesh.devices.flat[0].platform)
    log.info("mesh %s over %d %s devices; microbatch %d", dict(mesh.shape), mesh.devices.size,
             mesh.devices.flat[0].platform, optim_cfg.microbatch)

    shape = tuple(CropSource(data_dir).image_shape)
    want = (model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    if shape != want:
        raise ValueError(
            f"{data_dir}: crops are {shape} but model {model_cfg.name!r} expects {want}; "
            "pick a matching model or set model.image_size / model.channels"
        )
    gb = config.loader.global_batch
    if gb % mesh.devices.size:
        raise ValueError(f"loader.global_batch={gb} must be divisible by the {mesh.devices.size} devices")

    run_cfg = dict(json.loads(json.dumps(_asdict(config))), model_config=model_cfg.to_dict())
    _warn_config_change(workdir, run_cfg)
    save_config(workdir, run_cfg)

    init_rng, train_rng, hook_rng = run_rngs(config.seed)
    init_fn = functools.partial(create_train_state, model_cfg, optim_cfg)
    abstract = jax.eval_shape(init_fn, init_rng)
    shardings = shd.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)

    data_iter = make_train_iterator(data_dir, config.loader)
    ckpt = Checkpointer(workdir, config.ckpt_every, config.keep_ckpts, config.async_ckpt)
    start = 0
    if ckpt.latest_step() is not None:
        target = shd.abstract_with_shardings(abstract, shardings)
        state, start = ckpt.restore(target, data_iter)
        log.info("resumed %s from step %d on %d devices", workdir, start, mesh.devices.size)
    else:
        state = jax.jit(init_fn, out_shardings=shardings)(init_rng)

    hooks = []
    if config.recon_every > 0:
        hooks.append(make_recon_hook(config, model_cfg, data_dir, workdir, mesh, hook_rng))
    probe = make_probe_hook(config, model_cfg, data_dir, mesh) if config.probe_every > 0 else None
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    if probe is not None:
        if config.probe_at_start and start == 0:
            # Before the first update (the step donates the state): the random-init baseline.
            writer.write_scalars(0, probe.fn(0, state))
        hooks.append(probe)
    hooks.extend(extra_hooks)
    index_log = _IndexLog(workdir, start, mesh, config.log_batch_indices)
    step_fn = shd.jit_step(functools.partial(train_step, augment=config.loader.augment), mesh, shardings)
    if jax.process_count() > 1:
        step_fn = _compile_in_lockstep(step_fn, state, mesh, gb, want, train_rng)
    try:
        state = train_loop(
            state,
            step_fn,
            data_iter,
            num_steps=config.steps,
            rng=train_rng,
            fold_rng=False,  # train_step folds state.step into the key itself
            prepare_batch=index_log,
            checkpointer=ckpt,
            data_iterator=data_iter,
            writer=writer,
            hooks=hooks,
            log_every=config.log_every,
            examples_per_step=gb,
            progress=config.progress,
            desc=f"pretrain {model_cfg.name}",
        )
    finally:
        index_log.close()
        writer.close()
        ckpt.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return {"step": int(jax.device_get(state.step)), "start_step": start, "state": state, "mesh": mesh}


def _compile_in_lockstep(step_fn, state, mesh, global_batch: int, image_shape, rng):
    """Compile the step ahead of time, then wait for every process before the first collective.

    CPU (gloo) collectives give up after 30 s if a peer is still compiling; a barrier on the
    distributed client (long timeout) lines the processes up first.
    """
    from jax._src import distributed

    bs = shd.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, *image_shape), np.float32, sharding=bs),
        "index": jax.ShapeDtypeStruct((global_batch,), jax.dtypes.canonicalize_dtype(np.int64), sharding=bs),
    }
    compiled = step_fn.lower(state, batch, rng).compile()
    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier("cosmic_pretrain_step_compiled", timeout_in_ms=30 * 60 * 1000)
    return compiled


def _asdict(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _asdict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_asdict(v) for v in obj]
    return obj
