"""Held-out synthetic paired family: lobed, textured nuclei in unmasked crops + a sparse-module,
zero-inflated count model. Kept out of every tuning decision (issue 11 item 3): run it once.

Written independently of :mod:`data_builders.synthetic` (no shared code beyond the package's
record writer and feature measurement). The dataset arrives the way a lab would bring it::

  out_dir/raw/cells.h5ad   integer counts (CSR) in X; obs: cell_id, cell_type, response
  out_dir/raw/images.npy   (N, H, W) float32, nucleus centred, real background and neighbours
  out_dir/raw/masks.npy    (N, H, W) uint8 nucleus mask of the central cell
  out_dir/truth.json       see :data:`holdout_truth.DEFINITIONS`

Cell state S = (cell type t among 3-5, program z in R^3, response r).

Morphology (see notes/holdout_family.md):
  anchors, S only and at fixed strength so S stays visible in the pixels at every level:
    t -> chromatin texture grain (band-pass wavelength) and contrast;  z1 -> contour lobedness;
    z2 -> chromatin polarity (one half brighter);  z3 -> peripheral heterochromatin band
  mixed, sqrt(a) S + sqrt(1 - a) private with a = morph_shared (default shared_fraction):
    nucleus size, elongation, chromatin brightness, radial profile, heterochromatin foci rate
  private (morphology only): foci brightness, dark nucleoli (rate, depth)
  response (part of S): responders have brighter foci and brighter chromatin
  nuisance: everything :mod:`holdout_render` draws (orientation, jitter, illumination, blur, ...)

Expression: composition softmax(b_g + eta_g) times a log-normal library size whose mean depends on
the type; eta = sigma (sqrt(w) eta_S / s_S + sqrt(1 - w) eta_P / s_P) with sparse gene-module
loadings (type, program and responder modules for eta_S; private modules plus gene-specific noise
for eta_P); counts ~ Poisson(mu * Gamma(r_g, 1/r_g)) (gene-specific dispersion) with dropout
probability sigmoid(o_g - log mu) (expression-dependent zero inflation). The mixing weight w is
calibrated (:func:`holdout_truth.calibrate_mixing`) so that the true overall fraction of
log-normalised variance explained by S equals ``shared_fraction``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import numpy as np
from scipy.special import expit, ndtr, softmax

from cosmic_jax.data.records import encode_record, write_shards
from data_builders.families import holdout_render as render

FAMILY = "holdout"
RESPONSE_LEVELS = ("untreated", "resistant", "responder")
RESPONDER = 2
# (band-pass wavelength in px at an 80 px crop, log-contrast) per cell type: types differ by
# chromatin grain and contrast, not by size. Any subset is pairwise distinct in one of the two.
TEXTURES = ((4.0, 0.40), (5.5, 0.13), (7.5, 0.30), (11.0, 0.16), (9.0, 0.50))
N_PROGRAM = 3
N_PRIVATE_EXPR = 5
MORPH_PRIVATE = ("size", "elongation", "brightness", "profile", "foci_rate", "foci_amp", "nucleoli")
SIGMA_BIO = 1.6  # sd of the biological log-composition signal
LIB_SD = 0.35  # per-cell log library-size sd within a type
TARGET_SUM = 1e4
# Seed-sequence streams: one independent generator per purpose.
WORLD, STATE, EXPR, MORPH, RENDER, CALIB, MORPH_MC, RESP_MC, CHECK = range(9)


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


@dataclasses.dataclass(frozen=True)
class HoldoutConfig:
    """Generator settings; ``seed`` and ``shared_fraction`` are arguments of :func:`generate`."""

    crop_size: int = 80
    n_types: int = 4
    n_genes: int = 300
    response: bool = True
    morph_shared: float | None = None  # S share of the mixed morphology channels (None: shared_fraction)
    zero_inflation: float = 1.0  # scales the dropout probability; 0 = plain negative binomial
    expr_mc: tuple[int, int] = (12000, 4)  # (outer draws of S, inner draws) for the expression truth
    morph_mc: tuple[int, int] = (3000, 3)  # the same for the morphology truth (rendered + measured)
    response_mc: int = 1500  # paired responder/resistant draws for responder_genes / _features
    jackknife_groups: int = 100
    chunk: int = 256  # cells rendered at once

    def validate(self) -> None:
        if not 3 <= self.n_types <= len(TEXTURES):
            raise ValueError(f"n_types must be in [3, {len(TEXTURES)}], got {self.n_types}")
        if not 200 <= self.n_genes <= 2000:
            raise ValueError(f"n_genes must be in [200, 2000], got {self.n_genes}")
        if self.crop_size < 40 or self.crop_size % 8:
            raise ValueError(f"crop_size must be a multiple of 8 and >= 40, got {self.crop_size}")
        if self.morph_shared is not None and not 0 <= self.morph_shared <= 1:
            raise ValueError(f"morph_shared must be in [0, 1], got {self.morph_shared}")
        if min(*self.expr_mc, *self.morph_mc) < 2 or min(self.expr_mc[0], self.morph_mc[0]) < self.jackknife_groups:
            raise ValueError("Monte Carlo sizes: inner >= 2 and outer >= jackknife_groups")


@dataclasses.dataclass
class World:
    """Everything fixed for one seed: type table, gene modules, dispersions, scales."""

    cfg: HoldoutConfig
    type_names: list[str]
    type_probs: np.ndarray  # (K,)
    textures: np.ndarray  # (K, 2) wavelength at 80 px, contrast
    z_mean: np.ndarray  # (K, 3)
    z_centre: np.ndarray  # (3,) population mean and sd of z (standardises the mixed channels)
    z_sd: np.ndarray
    lib_logmean: np.ndarray  # (K,)
    genes: list[str]
    base: np.ndarray  # (G,)
    load_s: np.ndarray  # (G, K + 3 + 1) type, program, responder modules
    load_p: np.ndarray  # (G, N_PRIVATE_EXPR)
    eps_sd: np.ndarray  # (G,)
    nb_shape: np.ndarray  # (G,) inverse dispersion
    zi_offset: np.ndarray  # (G,)
    scale_s: float = 1.0
    scale_p: float = 1.0


def make_world(cfg: HoldoutConfig, seed: int) -> World:
    cfg.validate()
    rng = rng_for(seed, WORLD)
    k, g = cfg.n_types, cfg.n_genes
    type_probs = rng.dirichlet(np.full(k, 6.0))
    textures = np.asarray(TEXTURES)[rng.permutation(len(TEXTURES))[:k]]
    z_mean = rng.normal(0, 0.7, (k, N_PROGRAM))
    z_centre = type_probs @ z_mean
    z_sd = np.sqrt(1 + type_probs @ (z_mean - z_centre) ** 2)

    def sparse(shape, prob, sd):
        return (rng.random(shape) < prob) * rng.normal(0, sd, shape)

    load_s = np.concatenate([sparse((g, k), 0.15, 1.0), sparse((g, N_PROGRAM), 0.2, 0.8), np.zeros((g, 1))], axis=1)
    resp_genes = rng.choice(g, max(8, g // 20), replace=False)
    load_s[resp_genes, -1] = rng.choice([-1.0, 1.0], len(resp_genes)) * rng.uniform(0.8, 1.4, len(resp_genes))
    if not cfg.response:
        load_s[:, -1] = 0
    world = World(
        cfg=cfg,
        type_names=[f"type_{chr(ord('A') + i)}" for i in range(k)],
        type_probs=type_probs,
        textures=textures,
        z_mean=z_mean,
        z_centre=z_centre,
        z_sd=z_sd,
        lib_logmean=np.log(10000.0) + rng.normal(0, 0.25, k),
        genes=[f"hg{i:04d}" for i in range(g)],
        base=rng.normal(0, 1.0, g),
        load_s=load_s,
        load_p=sparse((g, N_PRIVATE_EXPR), 0.2, 1.0),
        eps_sd=rng.uniform(0.25, 0.7, g),
        nb_shape=np.clip(np.exp(rng.normal(np.log(5.0), 0.8, g)), 0.5, 60.0),
        zi_offset=rng.normal(-0.5, 0.7, g),
    )
    eta_s = shared_activity(world, sample_state(world, 20000, rng_for(seed, WORLD, 1))) @ load_s.T
    world.scale_s = float(np.sqrt(eta_s.var(axis=0).mean()))
    world.scale_p = float(np.sqrt(((world.load_p**2).sum(axis=1) + world.eps_sd**2).mean()))
    return world


# --- cell state S


def sample_state(world: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n draws of S: type (n,) int, z (n, 3), response (n,) codes into RESPONSE_LEVELS."""
    t = rng.choice(len(world.type_probs), n, p=world.type_probs)
    z = world.z_mean[t] + rng.standard_normal((n, N_PROGRAM))
    treated, responds = rng.random(n) < 0.6, rng.random(n) < 0.5
    response = np.where(treated, np.where(responds, RESPONDER, 1), 0) if world.cfg.response else np.zeros(n, int)
    return {"type": t, "z": z, "response": response}


def take(state: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in state.items()}


def shared_activity(world: World, state: dict[str, np.ndarray]) -> np.ndarray:
    """Module activities driven by S: one-hot type, program z, responder indicator."""
    onehot = np.eye(len(world.type_probs))[state["type"]]
    return np.concatenate([onehot, state["z"], (state["response"] == RESPONDER)[:, None]], axis=1)


# --- expression


def expression_noise(world: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Everything of the expression that S does not fix, except the count sampling."""
    return {"u": rng.standard_normal((n, N_PRIVATE_EXPR)), "eps": rng.standard_normal((n, len(world.genes))),
            "lib": rng.standard_normal(n)}


def expression_mean(world: World, state: dict, noise: dict, w: float) -> np.ndarray:
    """(n, G) expected counts given S, the private draws and the mixing weight w."""
    eta_s = shared_activity(world, state) @ world.load_s.T / world.scale_s
    eta_p = (noise["u"] @ world.load_p.T + noise["eps"] * world.eps_sd) / world.scale_p
    eta = SIGMA_BIO * (np.sqrt(w) * eta_s + np.sqrt(1 - w) * eta_p)
    lib = np.exp(world.lib_logmean[state["type"]] + LIB_SD * noise["lib"])
    return lib[:, None] * softmax(world.base + eta, axis=1)


def count_draws(world: World, shape: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The count noise that does not depend on the mean: gamma multipliers and dropout uniforms."""
    return {"gamma": rng.gamma(world.nb_shape, 1 / world.nb_shape, shape).astype(np.float32),
            "drop": rng.random(shape, dtype=np.float32)}


def sample_counts(world: World, mu: np.ndarray, draws: dict, rng: np.random.Generator) -> np.ndarray:
    """Gamma-Poisson (negative binomial) counts with expression-dependent dropout, int32."""
    counts = rng.poisson(mu * draws["gamma"]).astype(np.int32)
    p_drop = world.cfg.zero_inflation * expit(world.zi_offset - np.log(np.maximum(mu, 1e-12)))
    counts[draws["drop"] < p_drop] = 0
    return counts


def log_normalise(counts: np.ndarray) -> np.ndarray:
    lib = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return np.log1p(counts / lib * TARGET_SUM)


# --- morphology parameters


def morph_private(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, len(MORPH_PRIVATE)) standard-normal morphology-only factors."""
    return rng.standard_normal((n, len(MORPH_PRIVATE)))


def morph_params(world: World, state: dict, private: np.ndarray, a: float) -> dict[str, np.ndarray]:
    """Render parameters (:data:`holdout_render.PARAM_KEYS`) of each cell."""
    zs = (state["z"] - world.z_centre) / world.z_sd
    resp = (state["response"] == RESPONDER).astype(float)
    scale = world.cfg.crop_size / 80.0
    sa, sp = np.sqrt(a), np.sqrt(1 - a)
    p = dict(zip(MORPH_PRIVATE, private.T))
    size = sa * (zs[:, 0] - zs[:, 2]) / np.sqrt(2) + sp * p["size"]
    elong = sa * zs[:, 1] + sp * p["elongation"]
    bright = sa * (zs[:, 1] + zs[:, 2]) / np.sqrt(2) + sp * p["brightness"]
    profile = -sa * zs[:, 2] + sp * p["profile"]  # high z3: bright periphery, like the band
    foci = -sa * (zs[:, 0] + zs[:, 1]) / np.sqrt(2) + sp * p["foci_rate"]
    tex = world.textures[state["type"]]
    return {
        "radius": render.NOMINAL_RADIUS * world.cfg.crop_size * np.exp(0.11 * size),
        "elongation": 1.05 + 0.70 * ndtr(elong),
        "lobes": np.clip(0.11 + 0.045 * zs[:, 0], 0.0, 0.24),
        "profile": 0.5 * np.tanh(0.8 * profile),
        "rim": np.clip(0.6 + 0.25 * zs[:, 2], 0.0, 1.3),
        "polarity": np.clip(0.35 + 0.15 * zs[:, 1], 0.0, 0.8),
        "brightness": render.NOMINAL_BRIGHTNESS * np.exp(0.14 * bright + 0.12 * resp),
        "tex_wavelength": tex[:, 0] * scale,
        "tex_contrast": tex[:, 1],
        "foci_rate": 4.0 * np.exp(0.4 * foci),
        "foci_amp": 0.30 * np.exp(0.25 * p["foci_amp"] + 0.35 * resp),
        "nucleoli_rate": 1.5 * np.exp(0.5 * p["nucleoli"]),
        "nucleoli_depth": 0.15 + 0.3 * expit(p["nucleoli"]),
    }


def render_cells(world: World, state: dict, private: np.ndarray, a: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of every cell, rendered in chunks of ``cfg.chunk``."""
    params = morph_params(world, state, private, a)
    n, size = len(private), world.cfg.crop_size
    images = np.empty((n, size, size), np.float32)
    masks = np.empty((n, size, size), np.uint8)
    for start in range(0, n, world.cfg.chunk):
        sl = slice(start, min(start + world.cfg.chunk, n))
        images[sl], masks[sl] = render.render({k: v[sl] for k, v in params.items()}, rng, size)
    return images, masks


def masked_crops(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Crops as the analysis sees them after ``cosmic data paired --masks``: 0 outside the mask."""
    return np.where(np.asarray(masks) > 0, np.asarray(images), 0).astype(np.float32)


# --- dataset


def generate(out_dir: str, n_cells: int, seed: int, shared_fraction: float, crop_size: int = 80,
             overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """Write a held-out paired dataset (``raw/`` as a lab brings it, plus ``truth.json``).

    Args:
      out_dir: output directory.
      n_cells: cells to generate (>= 20).
      seed: fixes the world, the cells and the Monte Carlo; same seed -> identical files.
      shared_fraction: target true share of log-normalised expression variance explained by S.
      crop_size: crop side in pixels (multiple of 8, default 80).
      overwrite: replace an earlier dataset in out_dir.
      options: other :class:`HoldoutConfig` fields (n_types, n_genes, response, morph_shared,
        zero_inflation, expr_mc, morph_mc, response_mc, ...).

    Returns:
      summary: paths, the calibrated mixing weight, overall truths with MC SEs, timings (wall s per
      stage, plus this process's total CPU s).
    """
    from data_builders.families import holdout_truth as truth_mod

    if n_cells < 20:
        raise ValueError(f"n_cells must be >= 20, got {n_cells}")
    if not 0 < shared_fraction < 1:
        raise ValueError(f"shared_fraction must be in (0, 1), got {shared_fraction}")
    unknown = set(options) - {f.name for f in dataclasses.fields(HoldoutConfig)}
    if unknown:
        raise ValueError(f"holdout.generate: unknown options {sorted(unknown)}")
    for key in ("expr_mc", "morph_mc"):
        if key in options:
            options[key] = tuple(options[key])
    cfg = HoldoutConfig(crop_size=crop_size, **options)
    raw = os.path.join(out_dir, "raw")
    _prepare(out_dir, raw, overwrite)
    cpu0 = time.process_time()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    world = make_world(cfg, seed)
    a = shared_fraction if cfg.morph_shared is None else cfg.morph_shared
    w, expr_truth = truth_mod.calibrate_mixing(world, shared_fraction, seed)
    timings["calibrate_expression_truth"] = time.perf_counter() - t

    t = time.perf_counter()
    state = sample_state(world, n_cells, rng_for(seed, STATE))
    rng = rng_for(seed, EXPR)
    mu = expression_mean(world, state, expression_noise(world, n_cells, rng), w)
    counts = sample_counts(world, mu, count_draws(world, mu.shape, rng), rng)
    images, masks = render_cells(world, state, morph_private(n_cells, rng_for(seed, MORPH)), a,
                                 rng_for(seed, RENDER))
    timings["cells"] = time.perf_counter() - t

    t = time.perf_counter()
    morph_truth = truth_mod.morphology_truth(world, a, seed)
    timings["morphology_truth"] = time.perf_counter() - t
    t = time.perf_counter()
    resp = truth_mod.responder_truth(world, w, a, seed) if cfg.response else {}
    timings["responder_truth"] = time.perf_counter() - t

    truth = truth_mod.truth_dict(world, seed, shared_fraction, a, w, expr_truth, morph_truth, resp)
    _write_anndata(os.path.join(raw, "cells.h5ad"), world, state, counts)
    np.save(os.path.join(raw, "images.npy"), images, allow_pickle=False)
    np.save(os.path.join(raw, "masks.npy"), masks, allow_pickle=False)
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    timings["cpu_total"] = time.process_time() - cpu0
    return {
        "out_dir": out_dir,
        "raw": raw,
        "truth": os.path.join(out_dir, "truth.json"),
        "mixing_weight": w,
        "morph_shared": a,
        **{k: truth[k] for k in ("expr_var_explained_by_morph", "morph_var_explained_by_expr")},
        "mc_standard_errors": truth["mc_standard_errors"],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }


def _prepare(out_dir: str, raw: str, overwrite: bool) -> None:
    ours = [p for p in (raw, os.path.join(out_dir, "truth.json")) if os.path.exists(p)]
    if ours and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds {[os.path.basename(p) for p in ours]}; pass overwrite=True")
    for p in ours:
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(raw)


def _write_anndata(path: str, world: World, state: dict, counts: np.ndarray) -> None:
    import anndata
    import pandas as pd
    from scipy import sparse

    n = len(counts)
    obs = pd.DataFrame({
        "cell_id": [f"hc{i:06d}" for i in range(n)],
        "cell_type": pd.Categorical(np.asarray(world.type_names)[state["type"]], categories=world.type_names),
    })
    if world.cfg.response:
        obs["response"] = pd.Categorical(np.asarray(RESPONSE_LEVELS)[state["response"]], categories=RESPONSE_LEVELS)
    obs.index = obs["cell_id"].to_numpy()
    var = pd.DataFrame(index=world.genes)
    anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)


def write_paired(out_dir: str, records_per_shard: int = 4096) -> dict[str, Any]:
    """Import ``out_dir/raw`` as ``cosmic data paired --masks`` would: ``out_dir/cells.h5ad`` + ``crops/``.

    Crops are the images with pixels outside the mask set to 0, float32 (H, W, 1), keyed by cell_id,
    in AnnData row order. Stand-in until ``cosmic data paired`` lands.
    """
    import anndata

    raw = os.path.join(out_dir, "raw")
    paths = {k: os.path.join(raw, f) for k, f in (("adata", "cells.h5ad"), ("images", "images.npy"),
                                                   ("masks", "masks.npy"))}
    for p in paths.values():
        if not os.path.exists(p):
            raise FileNotFoundError(f"paired import: {p} not found")
    adata = anndata.read_h5ad(paths["adata"])
    images = np.load(paths["images"], mmap_mode="r")
    masks = np.load(paths["masks"], mmap_mode="r")
    if images.shape != masks.shape or images.shape[0] != adata.n_obs:
        raise ValueError(f"{raw}: images {images.shape}, masks {masks.shape} and {adata.n_obs} cells disagree")
    ids = np.asarray(adata.obs["cell_id"]).astype(str)
    crops_dir = os.path.join(out_dir, "crops")
    if os.path.exists(crops_dir):
        shutil.rmtree(crops_dir)

    def records():
        for start in range(0, len(ids), 512):
            block = masked_crops(images[start:start + 512], masks[start:start + 512])
            for j, crop in enumerate(block):
                yield encode_record(crop[..., None], ids[start + j])

    # exact pixels: the truth's features were measured on these very values
    manifest = write_shards(records(), crops_dir, records_per_shard=records_per_shard, float_storage="float32")
    adata.write_h5ad(os.path.join(out_dir, "cells.h5ad"))
    return {"h5ad": os.path.join(out_dir, "cells.h5ad"), "crops": crops_dir, "num_records": manifest["num_records"]}
