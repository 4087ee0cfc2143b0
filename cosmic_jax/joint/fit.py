"""``fit_joint``: standardise paired embeddings, train with the shared loop, return a JointModel."""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.joint.model import JointModel, check_inputs, standardization
from cosmic_jax.train.joint import train_joint


def fit_joint(m, e, config: ml_collections.ConfigDict | None = None, workdir: str | None = None,
              seed: int | None = None, labels=None, desc: str = "joint fit", hooks: tuple = (),
              pad_rows: int = 0) -> JointModel:
    """Fit encoders + both conditional flows on paired cells.

    Args:
      m: (N, Dm) morphology embeddings; e: (N, De) expression embeddings (row i = the same cell).
      config: joint config (``configs/joint.py``; default ``get_config("default")``).
      workdir: if given, checkpoints go to ``workdir/checkpoints`` (a rerun with the same config
        resumes from the newest), with TensorBoard events and metrics.jsonl, and the final model is
        saved to ``workdir/model``.
      seed: PRNG seed (default ``config.seed``); same seed + data + device count = same model.
      labels: optional (N,) cell labels; only used for the label-level retrieval diagnostic in `info`.
      desc: progress-bar label.
      hooks: periodic ``train.loop.Hook`` callbacks.
      pad_rows: share one compile between fits on subsets of N cells (``train_joint``).

    Returns:
      the fitted `JointModel` (``loss_history``: loss, fm_expr, fm_morph, contrastive per logged window).
    """
    cfg = config if config is not None else joint_configs.get_config()
    seed = cfg.seed if seed is None else int(seed)
    m, e, labels = check_inputs(m, e, cfg.min_cells, labels)
    stats = {"m": standardization(m), "e": standardization(e)}
    ms = (m - stats["m"]["mean"]) / stats["m"]["std"]
    es = (e - stats["e"]["mean"]) / stats["e"]["std"]
    t0 = time.perf_counter()
    params, history, info = train_joint(ms, es, cfg, seed, workdir=workdir, desc=desc, hooks=hooks, pad_rows=pad_rows)
    info.update({"n_cells": int(m.shape[0]), "seed": seed, "train_seconds": time.perf_counter() - t0})
    model = JointModel(cfg, params, stats, history, info)
    sub = np.random.default_rng(seed).permutation(len(m))[: min(len(m), 1024)]
    info["retrieval_top1_train_subset"] = model.retrieval_accuracy(m[sub], e[sub])
    if labels is not None:
        nearest = np.argmax(model.encode_morph(m[sub]) @ model.encode_expr(e[sub]).T, axis=1)
        info["label_match_top1_train_subset"] = float(np.mean(labels[sub][nearest] == labels[sub]))
    if workdir:
        model.save(os.path.join(workdir, "model"))
    return model
