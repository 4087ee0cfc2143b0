"""The "texture" family: cell types told apart by chromatin texture, sparse zero-inflated genes.

Tuning family for the morphology embedding (issue 11). It differs from
:mod:`data_builders.synthetic` in every respect an embedding or a decomposition could overfit to:

Images (48 x 48 by default; the nucleus fills a larger part of the crop than in the default
family; background NOT masked: a camera background level plus pixel noise, clipped at 0):
  * cell type -> chromatin pattern: fine speckle (grain ~0.8 px), coarse clumps (~2.5 px),
    peripheral heterochromatin (bright band under the envelope), or chromocentres (3-6 large
    bright foci). All types share one size / shape / brightness distribution up to small offsets.
  * shared programs z_s -> size, elongation, brightness (an orthogonal map, so z_s is identifiable).
  * private programs z_m -> boundary irregularity (3rd-5th harmonics), pattern contrast and
    background level: they move other image features than S does.
  * nuisance: orientation, a centre offset of up to 2 px, the pattern's random field, foci
    positions, harmonic phases, pixel noise.
Expression: sparse programs (each gene belongs to a few of the cell-type marker sets, shared
programs and private programs; at least one), gene-specific negative-binomial dispersion
(theta ~ LogNormal), zero inflation (pi_g ~ Beta), library size LogNormal with a cell-type
dependent mean:

  eta_g = b_g + a (T[c, g] + U_s[g] . z_s) + e U_e[g] . z_e,  (a, e) = sigma (cos t, sin t)
  counts_g = 0 with prob pi_g, else NB(mean L exp(eta_g) / sum, theta_g)

t is calibrated so the overall expression truth equals ``shared_fraction``
(:func:`data_builders.synthetic_truth.calibrate`). Truths: the nested MC of
:mod:`data_builders.synthetic_truth` over this module's internals (``truth.json`` keys as there).

  python -m data_builders.families.texture --out DIR --cells 3000 --seed 0 --shared-fraction 0.4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator

import numpy as np

from cosmic_jax.data import morph_features
from cosmic_jax.data.records import encode_record, write_shards
from data_builders import synthetic_truth as st
from data_builders.synthetic import _check_inputs, _chunks, log_normalize, staged_output  # noqa: F401

PATTERNS = ("fine", "coarse", "peripheral", "foci")
# Render parameters; S drives the first three, the private programs the last three.
SHARED_PARAMS = ("radius", "elongation", "brightness")
PRIVATE_PARAMS = ("irregularity", "contrast", "background")
PARAMS = SHARED_PARAMS + PRIVATE_PARAMS
PARAM_RANGES = {
    "radius": (8.5, 14.0),  # px at 48 x 48, geometric-mean semi-axis (scaled with image_size)
    "elongation": (1.0, 1.7),
    "brightness": (0.25, 0.65),
    "irregularity": (0.0, 0.18),  # relative amplitude of the boundary harmonics
    "contrast": (0.2, 0.45),  # relative std of the chromatin pattern
    "background": (0.0, 0.08),
}
_MAX_FOCI = 6
_RIM_PX = 1.0
_BG_NOISE = 0.025
_PIXEL_NOISE = 0.02
_OFFSET_PX = 2.0
# Seed-sequence streams (the names _rng / _CALIB are what synthetic_truth.calibrate uses).
_WORLD, _CALIB, _STATE, _COUNTS, _RENDER, _EXPR_MC, _MORPH_MC = range(7)

DEFINITIONS = st.DEFINITIONS.replace(
    "S = everything that drives morphology AND expression jointly: cell type, response status\n"
    "(untreated / resistant / responder) and the shared continuous programs (obsm['true_shared']).",
    "S = everything that drives morphology AND expression jointly: cell type and the shared\n"
    "continuous programs (obsm['true_shared']); this family has no treatment.",
).replace(
    "for images the private\nprograms, orientation, texture field, nucleoli and pixel noise",
    "for images the private\nprograms, orientation, offset, chromatin field, foci, harmonics and pixel noise",
)


@dataclasses.dataclass
class TextureConfig:
    n_genes: int = 300
    n_cell_types: int = 4  # <= len(PATTERNS)
    n_shared: int = 3  # <= len(SHARED_PARAMS)
    n_morph_private: int = 3
    n_expr_private: int = 4
    gene_log_base_sd: float = 0.8  # spread of the genes' baseline log expression
    expr_signal_sd: float = 2.0
    cell_type_weight: float = 0.5  # share of the S part of each gene's signal from its type markers
    program_density: float = 0.12  # probability that a gene belongs to a given program
    morph_celltype_offset: float = 0.4  # sd of per-type latent offsets of SHARED_PARAMS
    morph_param_noise: float = 0.08  # per-cell render nuisance on the S-driven latents
    library_size_mean: float = 10000.0
    library_size_log_sd: float = 0.45
    library_celltype_log_sd: float = 0.15  # per-type shift of log library size
    dispersion_median: float = 8.0  # theta_g ~ LogNormal(log median, dispersion_log_sd)
    dispersion_log_sd: float = 0.8
    zero_inflation_a: float = 1.0  # pi_g ~ Beta(a, b)
    zero_inflation_b: float = 25.0
    image_size: int = 48
    records_per_shard: int = 4096
    chunk_cells: int = 512
    calib_outer: int = 1500
    calib_inner: int = 4
    expr_mc_outer: int = 3000
    expr_mc_inner: int = 4
    morph_mc_outer: int = 2500
    morph_mc_inner: int = 2
    mc_groups: int = 20

    def validate(self) -> "TextureConfig":
        if not 1 <= self.n_cell_types <= len(PATTERNS):
            raise ValueError(f"TextureConfig.n_cell_types must be in 1..{len(PATTERNS)}, got {self.n_cell_types}")
        if not 1 <= self.n_shared <= len(SHARED_PARAMS):
            raise ValueError(f"TextureConfig.n_shared must be in 1..{len(SHARED_PARAMS)}, got {self.n_shared}")
        if not 1 <= self.n_morph_private <= len(PRIVATE_PARAMS):
            raise ValueError(f"TextureConfig.n_morph_private must be in 1..{len(PRIVATE_PARAMS)}, "
                             f"got {self.n_morph_private}")
        for k in ("n_genes", "n_expr_private", "expr_signal_sd", "library_size_mean", "dispersion_median",
                  "zero_inflation_a", "zero_inflation_b", "records_per_shard", "chunk_cells", "calib_outer",
                  "expr_mc_outer", "morph_mc_outer"):
            if not getattr(self, k) > 0:
                raise ValueError(f"TextureConfig.{k} must be > 0, got {getattr(self, k)!r}")
        for k in ("cell_type_weight", "program_density"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"TextureConfig.{k} must be in [0, 1], got {getattr(self, k)!r}")
        if self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"TextureConfig.image_size must be a multiple of 8, >= 32, got {self.image_size}")
        for k in ("calib_inner", "expr_mc_inner", "morph_mc_inner", "mc_groups"):
            if getattr(self, k) < 2:
                raise ValueError(f"TextureConfig.{k} must be >= 2, got {getattr(self, k)!r}")
        return self


@dataclasses.dataclass
class World(st.SignalSplit):
    config: TextureConfig
    seed: int
    gene_names: list[str]
    cell_types: list[str]
    log_base: np.ndarray  # (G,)
    expr_celltype: np.ndarray  # (K, G)
    expr_shared: np.ndarray  # (G, n_shared)
    expr_private: np.ndarray  # (G, n_expr_private)
    dispersion: np.ndarray  # (G,) theta_g
    zero_inflation: np.ndarray  # (G,) pi_g
    library_celltype: np.ndarray  # (K,) log library-size shift
    morph_celltype: np.ndarray  # (K, P) latent offsets
    morph_shared: np.ndarray  # (P, n_shared)
    morph_private: np.ndarray  # (P, n_morph_private)
    angle: float = np.pi / 4


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E47, *stream]))


def _sparse_programs(rng, n_genes: int, n_programs: int, density: float) -> np.ndarray:
    """(G, n_programs) 0/1 membership: each program holds ~density of the genes; each gene >= 1."""
    member = rng.random((n_genes, n_programs)) < density
    lonely = ~member.any(axis=1)
    member[np.flatnonzero(lonely), rng.integers(0, n_programs, lonely.sum())] = True
    return member


def make_world(config: TextureConfig, seed: int) -> World:
    cfg = config.validate()
    rng = _rng(seed, _WORLD)
    g, k, ns, npr = cfg.n_genes, cfg.n_cell_types, cfg.n_shared, cfg.n_expr_private
    log_base = rng.normal(0.0, cfg.gene_log_base_sd, g)
    log_base -= np.log(np.exp(log_base).sum())
    # Programs: K cell-type marker sets, n_shared shared and npr private programs, all sparse.
    member = _sparse_programs(rng, g, k + ns + npr, cfg.program_density)
    m_ct, m_sh, m_pr = member[:, :k], member[:, k:k + ns], member[:, k + ns:]
    ct = m_ct.T * rng.normal(0.0, 1.0, (k, g)) * np.sqrt(cfg.cell_type_weight * 2)
    ct -= ct.mean(axis=0)
    sh = m_sh * rng.normal(0.0, 1.0, (g, ns)) * np.sqrt((1 - cfg.cell_type_weight) * 2)
    pr = m_pr * rng.normal(0.0, 1.0, (g, npr))
    dispersion = np.exp(rng.normal(np.log(cfg.dispersion_median), cfg.dispersion_log_sd, g))
    zero_inflation = rng.beta(cfg.zero_inflation_a, cfg.zero_inflation_b, g)
    lib_ct = rng.normal(0.0, cfg.library_celltype_log_sd, k)

    p = len(PARAMS)
    sh_idx = [PARAMS.index(n) for n in SHARED_PARAMS]
    pr_idx = [PARAMS.index(n) for n in PRIVATE_PARAMS]
    q, _ = np.linalg.qr(rng.standard_normal((len(sh_idx), len(sh_idx))))
    morph_sh = np.zeros((p, ns))
    morph_sh[sh_idx] = q[:, :ns]
    morph_ct = np.zeros((k, p))
    morph_ct[:, sh_idx] = cfg.morph_celltype_offset * rng.standard_normal((k, len(sh_idx)))
    q2, _ = np.linalg.qr(rng.standard_normal((len(pr_idx), len(pr_idx))))
    morph_pr = np.zeros((p, cfg.n_morph_private))
    morph_pr[pr_idx] = q2[:, :cfg.n_morph_private]
    return World(
        config=cfg, seed=int(seed), gene_names=[f"g{i:04d}" for i in range(g)],
        cell_types=[PATTERNS[i] for i in range(k)], log_base=log_base, expr_celltype=ct, expr_shared=sh,
        expr_private=pr, dispersion=dispersion, zero_inflation=zero_inflation, library_celltype=lib_ct,
        morph_celltype=morph_ct, morph_shared=morph_sh, morph_private=morph_pr,
    )  # fmt: skip


def calibrate_world(config: TextureConfig, seed: int, shared_fraction: float) -> World:
    """The world of ``seed`` with its shared/private angle set so the expression truth is ``shared_fraction``."""
    return st.calibrate(make_world(config, seed), float(shared_fraction), gen=sys.modules[__name__])


# ----------------------------------------------------------------------------- sampling
def sample_state(world: World, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """S for n cells: ``cell_type`` (n,) int, ``shared`` (n, n_shared)."""
    cfg = world.config
    return {"cell_type": rng.integers(0, cfg.n_cell_types, n), "shared": rng.standard_normal((n, cfg.n_shared))}


def sample_counts(world: World, state: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Zero-inflated NB counts given S: ``counts`` (n, G), ``expr_private``, ``library_factor``."""
    cfg = world.config
    c = state["cell_type"]
    n = len(c)
    z_e = rng.standard_normal((n, cfg.n_expr_private))
    eta = (world.log_base + world.shared_scale * (world.expr_celltype[c] + state["shared"] @ world.expr_shared.T)
           + world.private_scale * (z_e @ world.expr_private.T))
    prop = np.exp(eta - eta.max(axis=1, keepdims=True))
    prop /= prop.sum(axis=1, keepdims=True)
    s = cfg.library_size_log_sd
    lib = np.exp(np.log(cfg.library_size_mean) + world.library_celltype[c] - 0.5 * s**2 + s * rng.standard_normal(n))
    mu = lib[:, None] * prop
    theta = world.dispersion
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    counts[rng.random(counts.shape) < world.zero_inflation] = 0
    return {"counts": counts, "expr_private": z_e, "library_factor": lib}


def params_from_latent(u: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    out = {}
    for j, name in enumerate(PARAMS):
        lo, hi = PARAM_RANGES[name]
        out[name] = lo + (hi - lo) / (1.0 + np.exp(-u[:, j]))
    out["radius"] = out["radius"] * image_size / 48.0
    return out


def _bandpass(rng, n: int, size: int, scale: float) -> np.ndarray:
    """(n, size, size) unit-variance noise with a difference-of-Gaussians pass band at ``scale`` px."""
    f2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2
    transfer = np.exp(-2 * np.pi**2 * scale**2 * f2) - np.exp(-2 * np.pi**2 * 4 * scale**2 * f2)
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, size, size))) * transfer, s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / (field.std(axis=(1, 2), keepdims=True) + 1e-12)


def render_batch(params: dict[str, np.ndarray], pattern: np.ndarray, rng: np.random.Generator,
                 image_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render nuclei on a noisy camera background (NOT masked).

    Args:
      params: name -> (B,) values of :data:`PARAMS`.
      pattern: (B,) int index into :data:`PATTERNS` (the cell type's chromatin pattern).
    Returns:
      (B, H, W) float32 images in [0, 1]; nuisance dict (orientation, offset_y, offset_x).
    """
    n, size = len(pattern), int(image_size)
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    orient = rng.uniform(0, 2 * np.pi, n)
    off = rng.uniform(-_OFFSET_PX, _OFFSET_PX, (n, 2))
    phases = rng.uniform(0, 2 * np.pi, (n, 3))
    weights = rng.dirichlet(np.ones(3), n)
    fine, coarse = _bandpass(rng, n, size, 0.8), _bandpass(rng, n, size, 2.5)
    foci_n = rng.integers(3, _MAX_FOCI + 1, n)
    foci_r = 0.65 * np.sqrt(rng.uniform(size=(n, _MAX_FOCI)))
    foci_phi = rng.uniform(0, 2 * np.pi, (n, _MAX_FOCI))
    noise = rng.standard_normal((n, size, size))
    bg_noise = rng.standard_normal((n, size, size))

    p = {k: v[:, None, None] for k, v in params.items()}
    sq = np.sqrt(p["elongation"])
    a, b = p["radius"] * sq, p["radius"] / sq
    dy, dx = yy[None] - c - off[:, 0, None, None], xx[None] - c - off[:, 1, None, None]
    co, si = np.cos(orient)[:, None, None], np.sin(orient)[:, None, None]
    xr, yr = (dx * co + dy * si) / a, (dy * co - dx * si) / b
    theta = np.arctan2(yr, xr)
    harm = sum(weights[:, j, None, None] * np.cos((j + 3) * theta - phases[:, j, None, None]) for j in range(3))
    rho = np.sqrt(xr**2 + yr**2) / (1.0 + p["irregularity"] * harm)
    cover = np.clip((1.0 - rho) * b / _RIM_PX + 0.5, 0.0, 1.0)

    # Chromatin pattern (zero mean, unit scale) by type.
    peripheral = np.exp(-((rho - 0.82) ** 2) / (2 * 0.1**2))
    ex = foci_r * np.cos(foci_phi) * a[:, :, 0]
    ey = foci_r * np.sin(foci_phi) * b[:, :, 0]
    fx = ex * co[:, :, 0] - ey * si[:, :, 0] + c + off[:, 1, None]
    fy = ex * si[:, :, 0] + ey * co[:, :, 0] + c + off[:, 0, None]
    active = (np.arange(_MAX_FOCI)[None] < foci_n[:, None]).astype(np.float64)
    gx = np.exp(-((xx[0][None, None] - fx[..., None]) ** 2) / (2 * 1.6**2))
    gy = np.exp(-((yy[:, 0][None, None] - fy[..., None]) ** 2) / (2 * 1.6**2))
    foci = np.einsum("bk,bky,bkx->byx", active, gy, gx)
    pat = np.select(
        [pattern[:, None, None] == i for i in range(len(PATTERNS))],
        [fine, coarse, 2.5 * (peripheral - 0.35) + 0.4 * fine, 2.5 * (foci - 0.15) + 0.4 * fine],
    )
    nucleus = p["brightness"] * (1.0 + p["contrast"] * pat) + _PIXEL_NOISE * noise
    background = p["background"] + _BG_NOISE * bg_noise
    img = np.clip(cover * np.maximum(nucleus, 0.02) + (1.0 - cover) * background, 0.0, 1.0)
    return img.astype(np.float32), {"orientation": orient, "offset_y": off[:, 0], "offset_x": off[:, 1]}


def sample_images(world: World, state: dict[str, np.ndarray], rng: np.random.Generator):
    """Images given S: draws z_m and the render nuisance. Returns (images, z_m, params, nuisance)."""
    cfg = world.config
    c = state["cell_type"]
    n = len(c)
    z_m = rng.standard_normal((n, cfg.n_morph_private))
    s_driven = np.isin(PARAMS, SHARED_PARAMS)
    nuis = cfg.morph_param_noise * rng.standard_normal((n, len(PARAMS))) * s_driven
    u = world.morph_celltype[c] + state["shared"] @ world.morph_shared.T + z_m @ world.morph_private.T + nuis
    params = params_from_latent(u, cfg.image_size)
    images, nuisance = render_batch(params, c, rng, cfg.image_size)
    return images, z_m, params, nuisance


# ----------------------------------------------------------------------------- dataset
def _anndata(world, shared_fraction, state, cell_ids, counts, lib, z_m, z_e, params, et):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({
        "cell_id": cell_ids,
        "cell_type": pd.Categorical(np.asarray(world.cell_types, dtype=object)[state["cell_type"]],
                                    categories=world.cell_types),
        "library_size": counts.sum(axis=1).astype(np.int64),
        "true_library_factor": lib,
    }, index=pd.Index(cell_ids, name="cell"))  # fmt: skip
    var = pd.DataFrame({
        "gene_name": world.gene_names,
        "true_expr_frac_explained_by_morph": et["per_gene"],
        "true_expr_frac_explained_by_morph_se": et["per_gene_se"],
        "true_dispersion": world.dispersion,
        "true_zero_inflation": world.zero_inflation,
    }, index=pd.Index(world.gene_names, name="gene"))  # fmt: skip
    obsm = {"true_shared": state["shared"], "true_morph_private": z_m, "true_expr_private": z_e,
            "true_morph_params": pd.DataFrame(params, index=obs.index, columns=list(PARAMS))}
    uns = {"texture_family": {"config_json": json.dumps(dataclasses.asdict(world.config), sort_keys=True),
                              "seed": world.seed, "shared_fraction": float(shared_fraction),
                              "expr_shared_scale": world.shared_scale, "expr_private_scale": world.private_scale}}
    return ad.AnnData(X=counts, obs=obs, var=var, obsm=obsm, uns=uns)


def generate(out_dir: str, n_cells: int, seed: int, shared_fraction: float, config: TextureConfig | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Write a texture-family paired dataset: ``cells.h5ad``, ``crops/`` (keyed by cell_id), ``truth.json``.

    Args / returns as :func:`data_builders.synthetic.generate`.
    """
    _check_inputs(out_dir, n_cells, shared_fraction)
    cfg = (config or TextureConfig()).validate()
    with staged_output(out_dir, overwrite, "texture-family dataset") as work:
        summary = _write_dataset(work, int(n_cells), int(seed), shared_fraction, cfg)
    return {"out_dir": out_dir, **summary}


def _write_dataset(out_dir: str, n_cells: int, seed: int, shared_fraction: float, cfg: TextureConfig) -> dict:
    """The body of :func:`generate`, writing into the staging folder ``out_dir``."""
    mod = sys.modules[__name__]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    world = calibrate_world(cfg, seed, shared_fraction)
    timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    et = st.expression_truth(world, _rng(seed, _EXPR_MC), gen=mod)
    mt = st.morphology_truth(world, _rng(seed, _MORPH_MC), gen=mod)
    timings["truth_mc"] = time.perf_counter() - t

    state = sample_state(world, n_cells, _rng(seed, _STATE))
    cell_ids = [f"tex{i:07d}" for i in range(n_cells)]
    z_m_all = np.empty((n_cells, cfg.n_morph_private))
    params_all = np.empty((n_cells, len(PARAMS)))

    def records() -> Iterator[bytes]:
        for ci, lo, hi in _chunks(n_cells, cfg.chunk_cells):
            sub = {k: v[lo:hi] for k, v in state.items()}
            images, z_m, params, _ = sample_images(world, sub, _rng(seed, _RENDER, ci))
            z_m_all[lo:hi] = z_m
            params_all[lo:hi] = np.stack([params[k] for k in PARAMS], axis=1)
            for j in range(hi - lo):
                yield encode_record(images[j][..., None], cell_ids[lo + j],
                                    {"cell_type": world.cell_types[state["cell_type"][lo + j]]})

    t = time.perf_counter()
    crops_dir = os.path.join(out_dir, "crops")
    write_shards(records(), crops_dir, records_per_shard=cfg.records_per_shard,
                 extra={"source": "texture_family", "seed": seed, "n_cells": n_cells})
    timings["render_crops"] = time.perf_counter() - t
    t = time.perf_counter()
    counts = np.empty((n_cells, cfg.n_genes), np.int64)
    z_e_all, lib = np.empty((n_cells, cfg.n_expr_private)), np.empty(n_cells)
    for ci, lo, hi in _chunks(n_cells, cfg.chunk_cells):
        out = sample_counts(world, {k: v[lo:hi] for k, v in state.items()}, _rng(seed, _COUNTS, ci))
        counts[lo:hi], z_e_all[lo:hi], lib[lo:hi] = out["counts"], out["expr_private"], out["library_factor"]
    adata = _anndata(world, shared_fraction, state, cell_ids, counts.astype(np.int32), lib, z_m_all, z_e_all,
                     params_all, et)
    adata.write_h5ad(os.path.join(out_dir, "cells.h5ad"))
    truth = st.truth_core(world, shared_fraction, n_cells, et, mt, DEFINITIONS)
    truth["family"] = "texture"
    with open(os.path.join(out_dir, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    timings["counts_write"] = time.perf_counter() - t
    return {"n_cells": n_cells,
            **{k: truth[k] for k in ("expr_var_explained_by_morph", "expr_var_explained_by_morph_se",
                                     "morph_var_explained_by_expr", "morph_var_explained_by_expr_se")},
            "timings_s": {k: round(v, 2) for k, v in timings.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="texture-family paired dataset (cells.h5ad, crops/, truth.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-fraction", type=float, default=0.4)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TextureConfig fields")
    a = p.parse_args(argv)
    cfg = TextureConfig()
    for item in a.overrides:
        key, _, text = item.partition("=")
        if not hasattr(cfg, key):
            raise ValueError(f"unknown TextureConfig key {key!r} in {item!r}")
        cfg = dataclasses.replace(cfg, **{key: type(getattr(cfg, key))(text)})
    print(json.dumps(generate(a.out, a.cells, a.seed, a.shared_fraction, cfg, a.overwrite), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
