"""Vectorised rendering of synthetic nucleus crops from interpretable morphology parameters.

A nucleus is a soft-edged, centred ellipse with a radial (dome or ring) intensity profile, band-limited
chromatin texture and a few Gaussian nucleoli. Everything is computed for a whole batch at
once with numpy (no per-image Python loop), so streaming a million crops is cheap.

The parameters (see :data:`MORPH_PARAMS`) come from an unconstrained latent ``u`` via
:func:`params_from_latent`; the rendering adds its own nuisance randomness (orientation,
texture field, nucleoli count and positions, pixel noise), which is *not* part of the cell
state shared with expression. The first five parameters (:data:`ROBUST_PARAMS`) are global,
low-frequency properties (size, shape, brightness, radial profile, texture strength) that are
read off an image precisely; the generator lets only those carry the shared state, so the
state is recoverable from the image.
"""

from __future__ import annotations

import numpy as np

# Order matters: columns of the latent matrix fed to params_from_latent.
MORPH_PARAMS = (
    "radius",  # geometric-mean semi-axis, px at 64x64 (scaled with image size)
    "elongation",  # major / minor axis ratio
    "intensity",  # mean chromatin intensity
    "texture_amplitude",  # relative std of the chromatin texture
    "profile",  # radial slope: > 0 dome (bright centre), < 0 ring (bright periphery)
    "texture_scale",  # spatial scale (px) of the band-limited texture
    "nucleoli_rate",  # Poisson mean of the nucleoli count beyond the first
    "nucleoli_brightness",  # peak added intensity of each nucleolus
)
ROBUST_PARAMS = MORPH_PARAMS[:5]

# Ranges chosen so the largest, most elongated nucleus still fits a 64x64 crop with margin
# (16 * sqrt(2.2) ~ 24 px semi-major axis < 31.5 px half-width).
PARAM_RANGES = {
    "radius": (8.0, 16.0),
    "elongation": (1.0, 2.2),
    "intensity": (0.20, 0.60),
    "texture_amplitude": (0.02, 0.20),
    "profile": (-1.0, 1.0),
    "texture_scale": (0.8, 1.8),
    "nucleoli_rate": (0.2, 3.0),
    "nucleoli_brightness": (0.10, 0.60),
}

MAX_NUCLEOLI = 6
# Latent sd ~1.2 (state + offsets) then spans most of each range while the sigmoid stays far
# from saturation, so latent differences remain visible over the whole population.
_LATENT_GAIN = 1.0
_RIM_PX = 1.2  # width of the soft nucleus rim
_NUCLEOLUS_SIGMA_PX = 0.9


def params_from_latent(u: np.ndarray, image_size: int = 64) -> dict[str, np.ndarray]:
    """Map unconstrained latents to bounded morphology parameters.

    Args:
      u: (N, len(MORPH_PARAMS)) latent values, roughly standard normal.
      image_size: crop side; the radius range is scaled by ``image_size / 64``.

    Returns:
      dict name -> (N,) float64 parameter values inside :data:`PARAM_RANGES`.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != len(MORPH_PARAMS):
        raise ValueError(f"morphology latent must be (N, {len(MORPH_PARAMS)}), got {u.shape}")
    out = {}
    for j, name in enumerate(MORPH_PARAMS):
        lo, hi = PARAM_RANGES[name]
        out[name] = lo + (hi - lo) / (1.0 + np.exp(-_LATENT_GAIN * u[:, j]))
    out["radius"] = out["radius"] * (image_size / 64.0)
    return out


def latent_for(name: str, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`params_from_latent` for one parameter (64 px radius units)."""
    lo, hi = PARAM_RANGES[name]
    frac = (np.asarray(value, dtype=np.float64) - lo) / (hi - lo)
    if np.any((frac <= 0) | (frac >= 1)):
        raise ValueError(f"{name}: value {value} outside its range {PARAM_RANGES[name]}")
    return np.log(frac / (1 - frac)) / _LATENT_GAIN


def _bandlimited_noise(rng: np.random.Generator, n: int, size: int, scale: np.ndarray) -> np.ndarray:
    """(n, size, size) unit-variance noise with a difference-of-Gaussians spectrum.

    The pass band centres on ``scale`` px (per image), so ``scale`` is the chromatin grain size.
    """
    white = rng.standard_normal((n, size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f2 = (fx**2 + fy**2)[None]
    s2 = (scale**2)[:, None, None]
    transfer = np.exp(-2 * np.pi**2 * s2 * f2) - np.exp(-2 * np.pi**2 * 4 * s2 * f2)
    field = np.fft.irfft2(np.fft.rfft2(white) * transfer, s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-12
    return field


def render_batch(
    params: dict[str, np.ndarray],
    rng: np.random.Generator,
    image_size: int = 64,
    pixel_noise: float = 0.02,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one batch of centred single-channel nuclei.

    Args:
      params: dict name -> (B,) values for every name in :data:`MORPH_PARAMS`.
      rng: source of the rendering nuisance randomness.
      image_size: crop side H = W.
      pixel_noise: sd of additive noise inside the nucleus.

    Returns:
      images: (B, H, W) float32 in [0, 1]; background exactly 0, nucleus strictly > 0.
      nuisance: dict with ``orientation`` (B,) radians and ``nucleoli_count`` (B,) int.
    """
    missing = [k for k in MORPH_PARAMS if k not in params]
    if missing:
        raise KeyError(f"render_batch: missing morphology parameters {missing}")
    p = {k: np.asarray(params[k], dtype=np.float64) for k in MORPH_PARAMS}
    n = p["radius"].shape[0]
    size = int(image_size)
    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - centre

    # Nuisance draws, in a fixed order so a given rng state always gives the same batch.
    orientation = rng.uniform(0.0, np.pi, n)
    texture = _bandlimited_noise(rng, n, size, p["texture_scale"])
    n_nuc = np.minimum(1 + rng.poisson(p["nucleoli_rate"]), MAX_NUCLEOLI)  # >= 1: brightness always shows
    nuc_r = 0.55 * np.sqrt(rng.uniform(size=(n, MAX_NUCLEOLI)))
    nuc_phi = rng.uniform(0.0, 2 * np.pi, size=(n, MAX_NUCLEOLI))
    pix = rng.standard_normal((n, size, size), dtype=np.float32)

    f32 = np.float32
    sq = np.sqrt(p["elongation"])
    a = (p["radius"] * sq).astype(f32)[:, None, None]  # semi-major
    b = (p["radius"] / sq).astype(f32)[:, None, None]  # semi-minor
    cos = np.cos(orientation).astype(f32)[:, None, None]
    sin = np.sin(orientation).astype(f32)[:, None, None]
    xx32, yy32 = xx.astype(f32)[None], yy.astype(f32)[None]
    xr = xx32 * cos + yy32 * sin
    yr = yy32 * cos - xx32 * sin
    d2 = (xr / a) ** 2 + (yr / b) ** 2
    rim = np.clip((1.0 - np.sqrt(d2)) * (b / _RIM_PX), 0.0, 1.0)

    inten = p["intensity"].astype(f32)[:, None, None]
    amp = p["texture_amplitude"].astype(f32)[:, None, None]
    # The radial term averages to 0 over the ellipse (E[d2] = 1/2), so the profile does not move
    # the mean intensity.
    prof = p["profile"].astype(f32)[:, None, None]
    body = inten * (1.0 + prof * (0.5 - d2)) * (1.0 + amp * texture.astype(f32))

    # Nucleoli positions in the ellipse frame, rotated back to pixel coordinates.
    ex = nuc_r * np.cos(nuc_phi) * a[:, :, 0]
    ey = nuc_r * np.sin(nuc_phi) * b[:, :, 0]
    px = ex * cos[:, :, 0] - ey * sin[:, :, 0]
    py = ex * sin[:, :, 0] + ey * cos[:, :, 0]
    active = (np.arange(MAX_NUCLEOLI)[None] < n_nuc[:, None]) * p["nucleoli_brightness"][:, None]
    # Isotropic Gaussian spots are separable: (B, K, H) x (B, K, W) profiles, summed over K.
    axis = xx[0]
    gx = np.exp(-((axis[None, None] - px[..., None]) ** 2) / (2 * _NUCLEOLUS_SIGMA_PX**2))
    gy = np.exp(-((axis[None, None] - py[..., None]) ** 2) / (2 * _NUCLEOLUS_SIGMA_PX**2))
    spots = np.einsum("bk,bky,bkx->byx", active, gy, gx).astype(f32)

    # Floor keeps every pixel inside the rim strictly positive, so "image > 0" is the mask.
    inner = np.maximum(body + spots + f32(pixel_noise) * pix, f32(0.02))
    images = np.clip(rim * inner, 0.0, 1.0).astype(np.float32, copy=False)
    return images, {"orientation": orientation, "nucleoli_count": n_nuc.astype(np.int64)}
