"""Synthetic IRIS-like paired nucleus images + expression counts with known ground truth.

Generative model (one cell):

  S = (cell type c, response status r, shared programs z_s)      drives BOTH modalities
  z_m  morphology-private programs,  z_e  expression-private programs

  morphology latent u = M_c[c] + W_s z_s + m_r [r = responder] + W_m z_m + nuisance
  image = render(params(u)) with nuisance: orientation, texture field, nucleoli, pixel noise
  log-mean  eta_g = b_g + a (C[c, g] + U_s[g] . z_s) + d_g [r = responder] + e U_e[g] . z_e
  counts_g ~ NegBinomial(mean = L exp(eta_g), inverse dispersion theta),  L ~ LogNormal

The truth is Var(E[. | S]) / Var(.), which an analysis can only reach if S is recoverable from
the image. So S and the private programs drive DIFFERENT render parameters: S drives only the
robust, global ones (``render.ROBUST_PARAMS``: size, elongation, intensity, texture strength
through an invertible map of z_s; cell type through well separated radial-profile levels),
with a small nuisance; z_m drives only texture grain and nucleoli. Truth estimation and
calibration live in :mod:`data_builders.synthetic_truth` (re-exported here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from cosmic_jax.commands import add_config
from cosmic_jax.configs import synthetic as synthetic_configs
from cosmic_jax.configs.overrides import frozen, load_config
from cosmic_jax.data import morph_features
from cosmic_jax.data.records import encode_record, write_shards
from data_builders import outdir, render, synthetic_truth
from data_builders.synthetic_truth import DEFINITIONS  # noqa: F401  (re-exported public API)

RESPONSE_LEVELS = ("untreated", "resistant", "responder")
RESPONDER = 2
# Planted morphology effect of responding: bright nucleoli. A parameter of its own, so the
# response is not confounded with the z_s-driven size / intensity.
RESPONDER_PARAMS = ("nucleoli_brightness",)
# Render parameters driven by S: z_s -> the first four (an orthogonal map, so z_s is
# identifiable); the cell type -> profile (one level per type) plus smaller offsets everywhere.
SHARED_PARAMS = ("radius", "elongation", "intensity", "texture_amplitude")
CELLTYPE_PARAM = "profile"
PRIVATE_PARAMS = ("texture_scale", "nucleoli_rate")
# The truth machinery is generic over generator modules (the families use it too); bound to this one.
_THIS = sys.modules[__name__]
calibrate = functools.partial(synthetic_truth.calibrate, gen=_THIS)
expression_truth = functools.partial(synthetic_truth.expression_truth, gen=_THIS)
morphology_truth = functools.partial(synthetic_truth.morphology_truth, gen=_THIS)
attainability = functools.partial(synthetic_truth.attainability, gen=_THIS)
truth_dict = functools.partial(synthetic_truth.truth_dict, gen=_THIS)
build_anndata = functools.partial(synthetic_truth.build_anndata, gen=_THIS)
OUT_NAMES = ("cells.h5ad", "truth.json", "crops")  # what a dataset folder holds
# Seed-sequence streams: each purpose gets its own independent generator.
_WORLD, _CALIB, _STATE, _COUNTS, _RENDER, _EXPR_MC, _MORPH_MC, _CHECK = range(8)

SyntheticConfig = ml_collections.FrozenConfigDict  # ``configs/synthetic.py``, checked and frozen


def check_config(cfg: Any) -> SyntheticConfig:
    """Validate generator settings and freeze them (hashable, stored with the dataset).

    Raises:
      ValueError naming the field at fault.
    """
    cfg = frozen(cfg)
    positive = [
        "n_genes", "n_cell_types", "n_shared", "n_morph_private", "n_expr_private",
        "library_size_mean", "nb_inverse_dispersion", "image_size", "records_per_shard",
        "chunk_cells", "calib_outer", "expr_mc_outer", "morph_mc_outer", "expr_signal_sd",
    ]  # fmt: skip
    for k in positive:
        if not cfg[k] > 0:
            raise ValueError(f"synthetic config {k} must be > 0, got {cfg[k]!r}")
    if not 0.0 < cfg.morph_profile_span < 1.0:
        raise ValueError(f"synthetic config morph_profile_span must be in (0, 1), got {cfg.morph_profile_span!r}")
    for k in ("morph_celltype_offset", "morph_param_noise", "responder_morph_effect"):
        if not cfg[k] >= 0:
            raise ValueError(f"synthetic config {k} must be >= 0, got {cfg[k]!r}")
    if cfg.n_shared > len(SHARED_PARAMS):
        raise ValueError(
            f"synthetic config n_shared={cfg.n_shared} exceeds the {len(SHARED_PARAMS)} S-driven render "
            f"parameters {SHARED_PARAMS}: the shared programs would not be recoverable from the image"
        )
    for k in ("treated_fraction", "responder_fraction", "cell_type_weight"):
        if not 0.0 <= cfg[k] <= 1.0:
            raise ValueError(f"synthetic config {k} must be in [0, 1], got {cfg[k]!r}")
    for k in ("calib_inner", "expr_mc_inner", "morph_mc_inner", "mc_groups"):
        if cfg[k] < 2:
            raise ValueError(f"synthetic config {k} must be >= 2, got {cfg[k]!r}")
    if not 0 <= cfg.n_responder_genes <= cfg.n_genes:
        raise ValueError(f"synthetic config n_responder_genes must be in [0, n_genes], got {cfg.n_responder_genes}")
    if cfg.image_size < 32:
        raise ValueError(f"synthetic config image_size must be >= 32, got {cfg.image_size}")
    return cfg


def make_config(name: str = "default", overrides: Sequence[str] = ()) -> SyntheticConfig:
    """A checked config: variant ``name`` of ``configs/synthetic.py`` with ``--config.key=value`` items."""
    return check_config(load_config(synthetic_configs, name, overrides))


@dataclasses.dataclass
class World(synthetic_truth.SignalSplit):
    """All fixed parameters of one synthetic world (drawn from ``seed``), plus calibrated scales."""

    config: SyntheticConfig
    seed: int
    gene_names: list[str]
    cell_types: list[str]
    log_base: np.ndarray  # (G,) log gene proportions
    shared_mix: np.ndarray  # (G,) rho_g: how S-driven gene g is relative to private programs
    expr_celltype: np.ndarray  # (K, G)
    expr_shared: np.ndarray  # (G, n_shared)
    expr_private: np.ndarray  # (G, n_expr_private)
    responder_lfc: np.ndarray  # (G,) zero except planted responder genes
    morph_celltype: np.ndarray  # (K, P)
    morph_shared: np.ndarray  # (P, n_shared)
    morph_private: np.ndarray  # (P, n_morph_private)
    morph_responder: np.ndarray  # (P,)
    angle: float = np.pi / 4  # shared/private split of the expression signal

    @property
    def responder_genes(self) -> list[str]:
        return [self.gene_names[g] for g in np.flatnonzero(self.responder_lfc)]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


def make_world(config: Any, seed: int) -> World:
    """Draw the fixed loadings / effects of a world (uncalibrated: angle pi/4)."""
    cfg = check_config(config)
    rng = _rng(seed, _WORLD)
    g, k, p = cfg.n_genes, cfg.n_cell_types, len(render.MORPH_PARAMS)
    cw = cfg.cell_type_weight
    rho = rng.beta(2.0, 2.0, g)
    log_base = rng.normal(0.0, 0.8, g)
    log_base -= np.log(np.exp(log_base).sum())
    ct = rng.standard_normal((k, g))
    ct -= ct.mean(axis=0)  # cell types differ; the population mean stays in log_base
    expr_ct = np.sqrt(rho * cw) * ct
    expr_sh = np.sqrt(rho * (1 - cw))[:, None] * rng.standard_normal((g, cfg.n_shared)) / np.sqrt(cfg.n_shared)
    expr_pr = np.sqrt(1 - rho)[:, None] * rng.standard_normal((g, cfg.n_expr_private)) / np.sqrt(cfg.n_expr_private)
    lfc = np.zeros(g)
    resp_idx = rng.choice(g, cfg.n_responder_genes, replace=False)
    lfc[resp_idx] = cfg.responder_gene_effect * rng.choice([-1.0, 1.0], cfg.n_responder_genes)

    # Morphology: S only moves the robust render parameters, z_m only the others, so S is a
    # function of the image up to the small render nuisance (see the module docstring).
    idx = {n: i for i, n in enumerate(render.MORPH_PARAMS)}
    sh = [idx[n] for n in SHARED_PARAMS]
    pr = [idx[n] for n in PRIVATE_PARAMS]
    q, _ = np.linalg.qr(rng.standard_normal((len(sh), len(sh))))
    m_sh = np.zeros((p, cfg.n_shared))
    m_sh[sh] = q[:, : cfg.n_shared]  # orthonormal columns: each z_s direction is its own image axis
    m_ct = np.zeros((k, p))
    m_ct[:, sh] = cfg.morph_celltype_offset * rng.standard_normal((k, len(sh)))
    levels = np.linspace(-cfg.morph_profile_span, cfg.morph_profile_span, k)  # equally spaced in the image
    m_ct[:, idx[CELLTYPE_PARAM]] = rng.permutation(render.latent_for(CELLTYPE_PARAM, levels))
    m_pr = np.zeros((p, cfg.n_morph_private))
    m_pr[pr] = rng.standard_normal((len(pr), cfg.n_morph_private))
    m_pr[pr] /= np.linalg.norm(m_pr[pr], axis=1, keepdims=True)
    m_ct[:, [idx[n] for n in RESPONDER_PARAMS]] = -cfg.responder_morph_effect / 2  # centre the two levels
    m_resp = np.array([cfg.responder_morph_effect if n in RESPONDER_PARAMS else 0.0 for n in render.MORPH_PARAMS])
    return World(
        config=cfg, seed=int(seed), gene_names=[f"gene{i:04d}" for i in range(g)],
        cell_types=[f"type{i}" for i in range(k)], log_base=log_base, shared_mix=rho,
        expr_celltype=expr_ct, expr_shared=expr_sh, expr_private=expr_pr, responder_lfc=lfc,
        morph_celltype=m_ct, morph_shared=m_sh, morph_private=m_pr, morph_responder=m_resp,
    )  # fmt: skip


# ----------------------------------------------------------------------------- sampling


def sample_state(world: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw S for n cells: ``cell_type`` (n,) int, ``response`` (n,) int, ``shared`` (n, n_shared)."""
    cfg = world.config
    cell_type = rng.integers(0, cfg.n_cell_types, n)
    treated = rng.random(n) < cfg.treated_fraction
    responder = treated & (rng.random(n) < cfg.responder_fraction)
    response = np.where(responder, RESPONDER, np.where(treated, 1, 0))
    shared = rng.standard_normal((n, cfg.n_shared))
    return {"cell_type": cell_type, "response": response, "shared": shared}


def _take(state: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in state.items()}


def sample_counts(world: World, state: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Expression given S: draws the private programs, library factor and NB noise.

    Returns:
      dict with ``counts`` (n, G) int64, ``expr_private`` (n, n_expr_private), ``library_factor`` (n,).
    """
    cfg = world.config
    n = len(state["cell_type"])
    z_e = rng.standard_normal((n, cfg.n_expr_private))
    eta = (
        world.log_base
        + world.shared_scale * (world.expr_celltype[state["cell_type"]] + state["shared"] @ world.expr_shared.T)
        + world.responder_lfc * (state["response"] == RESPONDER)[:, None]
        + world.private_scale * (z_e @ world.expr_private.T)
    )
    s = cfg.library_size_log_sd
    lib = np.exp(np.log(cfg.library_size_mean) - 0.5 * s**2 + s * rng.standard_normal(n))
    mu = lib[:, None] * np.exp(eta)
    theta = cfg.nb_inverse_dispersion
    counts = rng.poisson(rng.gamma(theta, mu / theta))  # gamma-Poisson = negative binomial
    return {"counts": counts, "expr_private": z_e, "library_factor": lib}


def log_normalize(counts: np.ndarray) -> np.ndarray:
    """(n, G) counts -> x = log1p(counts / library_size * 1e4), library_size = row total."""
    counts = np.asarray(counts, dtype=np.float64)
    lib = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(counts / lib * 1e4)


def morph_latent(
    world: World, state: dict[str, np.ndarray], z_m: np.ndarray, nuisance: np.ndarray | None = None
) -> np.ndarray:
    """(n, P) morphology latent from S, the private programs z_m (n, n_morph_private) and the
    render nuisance (n, P) (added to the S-driven parameters only)."""
    u = (
        world.morph_celltype[state["cell_type"]]
        + state["shared"] @ world.morph_shared.T
        + world.morph_responder * (state["response"] == RESPONDER)[:, None]
        + z_m @ world.morph_private.T
    )
    return u if nuisance is None else u + nuisance


def sample_images(world: World, state: dict[str, np.ndarray], rng: np.random.Generator):
    """Images given S: draws z_m and the render nuisance.

    Returns:
      images (n, H, W) float32, z_m (n, n_morph_private), params dict name -> (n,), nuisance dict.
    """
    n, cfg = len(state["cell_type"]), world.config
    z_m = rng.standard_normal((n, cfg.n_morph_private))
    s_driven = np.isin(render.MORPH_PARAMS, SHARED_PARAMS + (CELLTYPE_PARAM,) + RESPONDER_PARAMS)
    nuisance = cfg.morph_param_noise * rng.standard_normal((n, len(render.MORPH_PARAMS))) * s_driven
    params = render.params_from_latent(morph_latent(world, state, z_m, nuisance), cfg.image_size)
    images, nuisance = render.render_batch(params, rng, world.config.image_size, world.config.pixel_noise)
    return images, z_m, params, nuisance


# ----------------------------------------------------------------------------- dataset


def _check_inputs(out_dir: str, n_cells: int, shared_fraction: float) -> None:
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells <= 0:
        raise ValueError(f"n_cells must be a positive integer, got {n_cells!r}")
    if not (isinstance(shared_fraction, (int, float)) and 0.0 < float(shared_fraction) < 1.0):
        raise ValueError(f"shared_fraction must be strictly between 0 and 1, got {shared_fraction!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"output path {out_dir!r} exists and is not a directory")


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool, what: str = "synthetic dataset") -> Iterator[str]:
    """A staging folder that becomes ``out_dir`` once the block finishes (an earlier dataset there is
    replaced only with ``overwrite``, and only after the new one is complete)."""
    present = [n for n in OUT_NAMES if os.path.exists(os.path.join(out_dir, n))]
    if present and not overwrite:
        raise outdir.OutputExistsError(
            f"{out_dir}: already holds {present}; pass --overwrite to replace it (nothing was changed)")
    with outdir.staged_dir(out_dir, OUT_NAMES, what) as tmp:
        yield tmp


def _chunks(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, start, min(start + size, n)


def generate(
    out_dir: str,
    n_cells: int,
    seed: int,
    shared_fraction: float,
    config: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic paired dataset: ``cells.h5ad``, ``crops/`` and ``truth.json``.

    Args:
      out_dir: output directory (created; must not be a file).
      n_cells: number of cells (> 0).
      seed: fixes the world, the cells and the Monte Carlo; same seed -> identical files.
      shared_fraction: target overall true expression fraction explained by S, in (0, 1).
      config: generator settings (``make_config(...)``; default: the ``default`` variant).
      overwrite: replace an earlier dataset in ``out_dir`` (only once the new one is complete).

    Returns:
      summary dict: paths, calibrated scales, overall truths with MC errors, timings (s).
    """
    _check_inputs(out_dir, n_cells, shared_fraction)
    cfg = make_config() if config is None else check_config(config)
    with staged_output(out_dir, overwrite) as work:
        summary = _write_dataset(work, int(n_cells), int(seed), float(shared_fraction), cfg)
    return {**summary, "out_dir": out_dir, "h5ad": os.path.join(out_dir, "cells.h5ad"),
            "crops": os.path.join(out_dir, "crops"), "truth": os.path.join(out_dir, "truth.json")}


def _write_dataset(out_dir: str, n_cells: int, seed: int, shared_fraction: float, cfg: SyntheticConfig) -> dict:
    """The body of :func:`generate`, writing into the staging folder ``out_dir``."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world = calibrate(make_world(cfg, seed), shared_fraction)
    timings["calibrate"] = time.perf_counter() - t0

    t = time.perf_counter()
    expr_truth = expression_truth(world, _rng(seed, _EXPR_MC))
    morph_truth = morphology_truth(world, _rng(seed, _MORPH_MC))
    timings["truth_mc"] = time.perf_counter() - t

    state = sample_state(world, n_cells, _rng(seed, _STATE))
    cell_ids = [f"cell{i:07d}" for i in range(n_cells)]

    # Crops are streamed chunk by chunk into the shards; only per-cell scalars are kept.
    t = time.perf_counter()
    n_p, n_f = len(render.MORPH_PARAMS), len(morph_features.FEATURE_NAMES)
    z_m_all = np.empty((n_cells, cfg.n_morph_private))
    params_all = np.empty((n_cells, n_p + 2))
    feats_all = np.full((n_cells, n_f), np.nan)

    def records() -> Iterator[bytes]:
        for ci, lo, hi in _chunks(n_cells, cfg.chunk_cells):
            st = _take(state, np.arange(lo, hi))
            images, z_m, params, nuis = sample_images(world, st, _rng(seed, _RENDER, ci))
            z_m_all[lo:hi] = z_m
            params_all[lo:hi, :n_p] = np.stack([params[k] for k in render.MORPH_PARAMS], axis=1)
            params_all[lo:hi, n_p] = nuis["orientation"]
            params_all[lo:hi, n_p + 1] = nuis["nucleoli_count"]
            if cfg.measure_features:
                feats_all[lo:hi] = morph_features.measure_batch(images, cell_ids[lo:hi])
            for j in range(hi - lo):
                i = lo + j
                meta = {
                    "cell_type": world.cell_types[state["cell_type"][i]],
                    "treatment": "treated" if state["response"][i] > 0 else "control",
                    "response": RESPONSE_LEVELS[state["response"][i]],
                }
                yield encode_record(images[j][..., None], cell_ids[i], meta)

    crops_dir = os.path.join(out_dir, "crops")
    write_shards(
        records(), crops_dir, records_per_shard=cfg.records_per_shard,
        extra={"source": "synthetic", "seed": seed, "n_cells": n_cells},
        float_storage="float32",  # exact: the truth features were measured on these very pixels
    )  # fmt: skip
    timings["render_crops"] = time.perf_counter() - t

    t = time.perf_counter()
    counts = np.empty((n_cells, cfg.n_genes), np.int64)
    z_e_all = np.empty((n_cells, cfg.n_expr_private))
    lib_factor = np.empty(n_cells)
    for ci, lo, hi in _chunks(n_cells, cfg.chunk_cells):
        out = sample_counts(world, _take(state, np.arange(lo, hi)), _rng(seed, _COUNTS, ci))
        counts[lo:hi], z_e_all[lo:hi], lib_factor[lo:hi] = out["counts"], out["expr_private"], out["library_factor"]
    if counts.max() > np.iinfo(np.int32).max:
        raise OverflowError("synthetic counts exceed int32; lower library_size_mean")
    timings["counts"] = time.perf_counter() - t

    t = time.perf_counter()
    adata = build_anndata(
        world, shared_fraction, state, cell_ids, counts.astype(np.int32), lib_factor, z_m_all, z_e_all,
        params_all, feats_all, expr_truth, morph_truth,
    )  # fmt: skip
    adata.write_h5ad(os.path.join(out_dir, "cells.h5ad"))
    truth = truth_dict(world, shared_fraction, n_cells, expr_truth, morph_truth)
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {
        "n_cells": n_cells,
        "expr_shared_scale": world.shared_scale,
        "expr_private_scale": world.private_scale,
        **{k + se: truth[k + se] for k in ("expr_var_explained_by_morph", "morph_var_explained_by_expr")
           for se in ("", "_se")},  # fmt: skip
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def load_world(out_dir: str) -> World:
    """Rebuild the calibrated :class:`World` of a generated dataset (for fresh MC or more cells)."""
    import anndata as ad

    path = os.path.join(out_dir, "cells.h5ad")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {out_dir!r} a synthetic dataset?")
    uns = ad.read_h5ad(path, backed="r").uns
    try:
        info = uns["synthetic"]
        cfg = check_config(ml_collections.ConfigDict(json.loads(info["config_json"])))
        angle = float(np.arctan2(info["expr_private_scale"], info["expr_shared_scale"]))
        seed = int(info["seed"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: uns['synthetic'] lacks the generator record ({e})") from e
    return dataclasses.replace(make_world(cfg, seed), angle=angle)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Arguments of ``cosmic data synthetic`` (data_builders/cli.py wires the sub-command)."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--cells", type=int, default=2000, help="number of cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-fraction", type=float, default=0.5,
                        help="true overall fraction of expression variance explained by S, in (0, 1)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset in --out (only once the new one is complete)")
    add_config(parser, synthetic_configs, "default")


def run(args) -> int:
    """Run ``cosmic data synthetic`` from parsed :func:`add_arguments` args; prints a JSON summary."""
    cfg = check_config(args.cfg)
    summary = generate(args.out, args.cells, args.seed, args.shared_fraction, cfg, overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    return 0
