"""Paired toy data with known answers, for the variance tests and the flow / decomposition benchmarks."""

from __future__ import annotations

import numpy as np


class GaussianToy:
    """m = A s + noise, e = B s + noise: p(e | m) is Gaussian with closed-form moments."""

    def __init__(self, frac: float, seed: int, dm: int = 6, de: int = 8, r: int = 3):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(dm, r))
        B = rng.normal(size=(de, r))
        # Per-dimension noise spread so dims have very different explained fractions.
        noise = np.geomspace(0.2, 5.0, de)
        self.s_mm = self.A @ self.A.T + 0.05 * np.eye(dm)
        s_em = B @ self.A.T
        expl = np.trace(s_em @ np.linalg.solve(self.s_mm, s_em.T))
        # Scale the noise so the overall explained fraction is `frac`.
        scale = (expl / frac - np.trace(B @ B.T)) / noise.sum()
        if scale <= 0:
            raise ValueError(f"GaussianToy: explained fraction {frac} is out of reach for this seed/shape")
        self.B, self.noise_var = B, noise * scale
        self.s_em = s_em
        self.s_ee = B @ B.T + np.diag(self.noise_var)
        self.reg = np.linalg.solve(self.s_mm, s_em.T)  # (dm, de)
        self.cond_cov = self.s_ee - s_em @ self.reg
        expl_cov = s_em @ self.reg
        self.truth = np.trace(expl_cov) / np.trace(self.s_ee)
        self.truth_dim = np.diag(expl_cov) / np.diag(self.s_ee)
        self.rng = rng

    def draw(self, n):
        s = self.rng.normal(size=(n, self.A.shape[1]))
        m = s @ self.A.T + np.sqrt(0.05) * self.rng.normal(size=(n, self.A.shape[0]))
        e = s @ self.B.T + np.sqrt(self.noise_var) * self.rng.normal(size=(n, len(self.noise_var)))
        return m, e

    def sampler(self, cond, num_samples, seed):
        mu = cond @ self.reg
        z = np.random.default_rng(seed).standard_normal((num_samples, *mu.shape))
        return mu[None] + z @ np.linalg.cholesky(self.cond_cov).T


class NoisyShrunkSampler:
    """The exact sampler of a `GaussianToy` with its conditional mean shrunk by ``a`` and a fixed per-cell error.

    Mimics a flexible model fitted on few cells: the error is a function of the condition only
    (the same for every draw of a cell), independent of the held-out cell's own noise.
    """

    def __init__(self, toy: GaussianToy, a: float, noise_sd: float, seed: int):
        self.toy, self.a, self.noise_sd, self.seed = toy, a, noise_sd, seed

    def __call__(self, cond, num_samples, seed):
        exact = self.toy.sampler(cond, num_samples, seed)
        mu = cond @ self.toy.reg
        err = np.random.default_rng(self.seed).normal(size=mu.shape) * self.noise_sd
        return exact + (self.a - 1.0) * mu[None] + err[None]


class TanhToy:
    """m ~ N(0, I_d), e = tanh(m W) + sigma * noise, W ~ N(0, 1/d): the flow benchmarks' problem
    (also the CellFlow peer's, ``../shared/bench/peer_cellflow_fm.py``)."""

    def __init__(self, dim: int = 64, sigma: float = 0.3, seed: int = 0):
        self.dim, self.sigma = dim, sigma
        self.rng = np.random.default_rng(seed)
        self.w = self.rng.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, e), each (n, dim) float32."""
        m = self.rng.normal(size=(n, self.dim)).astype(np.float32)
        e = np.tanh(m @ self.w) + self.sigma * self.rng.normal(size=(n, self.dim)).astype(np.float32)
        return m, e.astype(np.float32)

    def explained_fraction(self, n_mc: int = 400_000) -> float:
        """Var(E[e|m]) / Var(e) summed over dims (Monte Carlo over ``n_mc`` fresh draws of m)."""
        var_f = np.tanh(self.rng.normal(size=(n_mc, self.dim)).astype(np.float32) @ self.w).var(0)
        return float(var_f.sum() / (var_f + self.sigma**2).sum())
