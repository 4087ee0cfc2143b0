"""A fitted joint model: encoders, both conditional flows, standardisation; sampling and persistence.

Networks and loss: ``cosmic_jax.models.joint``; fitting: ``cosmic_jax.joint.fit.fit_joint`` (which
runs the shared training loop through ``cosmic_jax.train.joint``). Inputs are standardised per
feature inside (mean/std stored with the model); samples come back in the caller's units.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.data.swap import write_text
from cosmic_jax.joint.sampling import solve_flow
from cosmic_jax.models.joint import build_nets, init_params

MODEL_FILE = "joint_model.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 2


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


def check_inputs(m: Any, e: Any, min_cells: int, labels: Any = None):
    m = _as_matrix(m, "m (morphology embeddings)")
    e = _as_matrix(e, "e (expression embeddings)")
    if m.shape[0] != e.shape[0]:
        raise ValueError(f"m has {m.shape[0]} cells but e has {e.shape[0]}; rows must be paired cells")
    if m.shape[0] < min_cells:
        raise ValueError(f"too few cells to fit the joint model: {m.shape[0]} < min_cells={min_cells}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape[:1] != (m.shape[0],):
            raise ValueError(f"labels has shape {labels.shape}, expected ({m.shape[0]},)")
    return m, e, labels


def standardization(x: np.ndarray) -> dict[str, np.ndarray]:
    mean = x.mean(0, dtype=np.float64)
    std = x.std(0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)  # constant features: keep them constant, avoid 0/0
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


ENCODE_CHUNK = 4096  # rows per jitted encoder call (one shape, the last chunk padded)


def _fixed_chunks(fn, x: np.ndarray, rows: int, width: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of exactly ``rows`` rows (the last one padded): one compile."""
    out = [np.asarray(fn(np.pad(x[i:i + rows], ((0, max(0, i + rows - len(x))), (0, 0)))))[: len(x) - i]
           for i in range(0, len(x), rows)]
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


@functools.lru_cache(maxsize=32)
def _encoder_fn(config, dm: int, de: int, which: str):
    """Jitted encoder apply, shared by every model of one config and shape (e.g. the folds of a cross-fit)."""
    nets = build_nets(config.model, dm, de)
    return jax.jit((nets.enc_m if which == "m" else nets.enc_e).apply)


@functools.lru_cache(maxsize=32)
def _sampler_fn(config, dm: int, de: int, target: str, num_samples: int, method: str, steps: int, guidance: float):
    """Jitted ``(params, cond, cell_ids, key) -> (S, C, D)`` solve, shared by every model of one config
    and shape; params are an argument, so the folds of a cross-fit reuse one compile."""
    nets = build_nets(config.model, dm, de)
    flow = nets.flow_e if target == "e" else nets.flow_m
    d_out = de if target == "e" else dm
    src_enc = nets.enc_m if target == "e" else nets.enc_e
    latent_cond = config.model.condition_on == "latent"
    power = config.sampling.time_power

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

    return jax.jit(run)


# ----------------------------------------------------------------------------------------------
# the fitted model


class JointModel:
    """A fitted joint model: encoders, both conditional flows, standardisation, loss history.

    Build it with `fit_joint` or `JointModel.load`.
    """

    def __init__(self, config: Any, params: dict, stats: dict, loss_history: dict | None = None,
                 info: dict | None = None):
        self.config = cfg_io.frozen(config)
        self.params = jax.device_put(jax.device_get(params), jax.devices()[0])
        self.stats = {k: {kk: np.asarray(vv, np.float32) for kk, vv in v.items()} for k, v in stats.items()}
        self.dim_morph = int(self.stats["m"]["mean"].shape[0])
        self.dim_expr = int(self.stats["e"]["mean"].shape[0])
        self.loss_history = loss_history or {}
        self.info = info or {}
        self.nets = build_nets(self.config.model, self.dim_morph, self.dim_expr)

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
    def _encode(self, which: str, x_std: np.ndarray) -> np.ndarray:
        fn = _encoder_fn(self.config, self.dim_morph, self.dim_expr, which)
        return _fixed_chunks(lambda x: fn(self.params["enc_" + which], x), x_std, ENCODE_CHUNK,
                             self.config.model.latent_dim)

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
    def _sample(self, target: str, cond_std: np.ndarray, num_samples: int, seed: int, method, steps, guidance,
                chunk_rows) -> np.ndarray:
        cfg = self.config.sampling
        method = method or cfg.solver
        steps = int(steps or cfg.steps)
        guidance = float(cfg.guidance if guidance is None else guidance)
        if guidance != 1.0 and self.config.model.cfg_dropout <= 0:
            raise ValueError("guidance != 1 needs a model trained with cfg_dropout > 0 (no null condition learned)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        n = cond_std.shape[0]
        d_out = self.dim_expr if target == "e" else self.dim_morph
        out = np.empty((num_samples, n, d_out), np.float32)
        if n == 0:
            return out
        fn = _sampler_fn(self.config, self.dim_morph, self.dim_expr, target, num_samples, method, steps, guidance)
        params = {"flow": self.params["flow_" + target], "enc": self.params["enc_" + ("m" if target == "e" else "e")]}
        # One chunk shape (cells) for every call, the last chunk padded: each model, fold and
        # held-out set reuses one compile of the solve.
        per = max(1, int(chunk_rows or cfg.chunk_rows) // num_samples)
        per = per // 64 * 64 or per
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
        """Write ``config.json`` (the joint config), ``joint_model.json`` (dims, standardisation,
        history) and the orbax ``params`` into ``directory``.

        Returns:
          the absolute directory.
        """
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(directory, PARAMS_DIR), self.params, force=True)
        ckptr.wait_until_finished()
        cfg_io.save(ml_collections.ConfigDict(self.config), os.path.join(directory, CONFIG_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "dim_morph": self.dim_morph,
            "dim_expr": self.dim_expr,
            "stats": {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in self.stats.items()},
            "loss_history": self.loss_history,
            "info": self.info,
        }
        write_text(os.path.join(directory, MODEL_FILE), json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str) -> "JointModel":
        """Read a model written by `save`; errors name the missing / corrupt file."""
        directory = os.path.abspath(directory)
        mpath = os.path.join(directory, MODEL_FILE)
        try:
            with open(mpath) as f:
                meta = json.load(f)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{mpath}: not found; is {directory!r} a saved JointModel?") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{mpath}: corrupt JSON ({err})") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{mpath}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}; "
                             "refit the model with this version")
        cpath = os.path.join(directory, CONFIG_FILE)
        with open(cpath) as f:
            name = json.load(f).get("name", "default")
        cfg = cfg_io.load(cpath, joint_configs.get_config(name if name in joint_configs.VARIANTS else "default"))
        try:
            dm, de = int(meta["dim_morph"]), int(meta["dim_expr"])
            stats = {k: {kk: np.asarray(vv, np.float32) for kk, vv in v.items()} for k, v in meta["stats"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{mpath}: missing or invalid entry ({err})") from err
        nets = build_nets(cfg.model, dm, de)
        target = jax.eval_shape(lambda: init_params(nets, cfg.model, dm, de, jax.random.key(0)))
        ppath = os.path.join(directory, PARAMS_DIR)
        if not os.path.isdir(ppath):
            raise FileNotFoundError(f"{ppath}: parameter checkpoint missing")
        try:
            params = ocp.StandardCheckpointer().restore(ppath, target)
        except Exception as err:  # orbax raises several types; name the file either way
            raise ValueError(f"{ppath}: cannot restore parameters ({type(err).__name__}: {str(err)[:200]})") from err
        return cls(cfg, params, stats, meta.get("loss_history"), meta.get("info"))
