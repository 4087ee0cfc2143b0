"""Pixel renderer of the held-out family: one unmasked fluorescence crop per nucleus.

A nucleus is a Fourier-perturbed ellipse (radius r(phi) = 1 + sum_k A_k cos(k phi + psi_k),
k = 3..7; k = 2 would mimic elongation) with a soft edge, a radial intensity profile, a bright
peripheral heterochromatin band, a linear chromatin polarity gradient (one half brighter, random
direction), multiplicative band-pass chromatin texture (log-normal, so strong contrast looks
speckled), bright heterochromatin foci and dark nucleoli.
Around it: a smooth background and fragments of neighbouring nuclei. The scene is lit by a
linear illumination ramp, defocused by a per-cell Gaussian blur and recorded by a 12-bit camera
(Poisson shot noise, Gaussian read noise, offset), then scaled to float32 in [0, 1].

The caller passes the cell's render parameters (:data:`PARAM_KEYS`); everything drawn here is
nuisance (orientation, position jitter, lobe phases, texture / foci / nucleoli positions,
polarity direction, illumination, background, neighbours, blur, exposure, camera noise).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit

PARAM_KEYS = ("radius", "elongation", "lobes", "profile", "rim", "polarity", "brightness", "tex_wavelength",
              "tex_contrast", "foci_rate", "foci_amp", "nucleoli_rate", "nucleoli_depth")
HARMONICS = np.arange(3, 8)
HARMONIC_SHARE = np.array([0.35, 0.25, 0.18, 0.12, 0.10])  # fixed, so "lobes" alone sets the contour roughness
MAX_FOCI = 16
MAX_NUCLEOLI = 4
MAX_NEIGHBOURS = 3
# Camera: electrons per unit scene intensity, ADU per electron, offset and read noise (ADU), 12 bit.
_ELECTRONS, _GAIN, _OFFSET, _READ_SD, _FULL_SCALE = 1800.0, 2.0, 100.0, 6.0, 4095.0
_EDGE_PX = 0.7  # width of the soft nuclear edge
_BAND_WIDTH = 0.18  # peripheral heterochromatin band, in units of the normalised radius
# Typical nucleus radius (fraction of the crop side) and brightness; neighbours are drawn around these.
NOMINAL_RADIUS = 0.19
NOMINAL_BRIGHTNESS = 0.40


def _freq_radius(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return np.sqrt(fx**2 + fy**2)


def _filtered_noise(rng: np.random.Generator, n: int, size: int, transfer: np.ndarray) -> np.ndarray:
    """White noise through per-image transfer functions ((n or 1, size, size//2+1)), unit std each."""
    spec = np.fft.rfft2(rng.standard_normal((n, size, size))) * transfer
    field = np.fft.irfft2(spec, s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    return field / np.maximum(field.std(axis=(1, 2), keepdims=True), 1e-12)


def _bandpass(wavelength: np.ndarray, size: int) -> np.ndarray:
    """Log-Gaussian annulus around frequency 1/wavelength, one per cell: (n, size, size//2+1)."""
    f = np.maximum(_freq_radius(size), 1e-6)[None]
    f0 = 1.0 / wavelength[:, None, None]
    return np.exp(-np.log(f / f0) ** 2 / (2 * 0.35**2))


def _lowpass(size: int, cutoff: float) -> np.ndarray:
    return np.exp(-((_freq_radius(size) / cutoff) ** 2))[None]


def _contour(phi: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """r(phi) for (n, ...) angles; amp / phase (n, len(HARMONICS))."""
    shape = (len(phi),) + (1,) * (phi.ndim - 1)
    r = np.ones_like(phi)
    for j, k in enumerate(HARMONICS):
        r = r + amp[:, j].reshape(shape) * np.cos(k * phi + phase[:, j].reshape(shape))
    return r


def _splat(pos_y: np.ndarray, pos_x: np.ndarray, weight: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Gaussian blobs of peak ``weight`` at sub-pixel positions (n, K); zero weight = absent."""
    n, k = weight.shape
    out = np.zeros((n, size, size))
    y0, x0 = np.floor(pos_y), np.floor(pos_x)
    fy, fx = pos_y - y0, pos_x - x0
    cell = np.repeat(np.arange(n), k).reshape(n, k)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy = np.clip(y0 + dy, 0, size - 1).astype(np.int64)
        xx = np.clip(x0 + dx, 0, size - 1).astype(np.int64)
        np.add.at(out, (cell, yy, xx), weight * wgt)
    return ndimage.gaussian_filter(out, sigma=(0, sigma, sigma)) * (2 * np.pi * sigma**2)


def _points_inside(rng, n, k, extent, cy, cx, cos_t, sin_t, a_ax, b_ax, amp, phase):
    """k uniform points per nucleus within ``extent`` of its (lobed) contour, in pixel coordinates."""
    rho = extent * np.sqrt(rng.random((n, k)))
    phi = rng.uniform(0, 2 * np.pi, (n, k))
    r = rho * _contour(phi, amp, phase)
    u, v = r * a_ax[:, None] * np.cos(phi), r * b_ax[:, None] * np.sin(phi)
    return cy[:, None] + sin_t[:, None] * u + cos_t[:, None] * v, cx[:, None] + cos_t[:, None] * u - sin_t[:, None] * v


def render(params: dict[str, np.ndarray], rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one crop per cell.

    Args:
      params: :data:`PARAM_KEYS` -> (n,) arrays (lengths in pixels).
      rng: source of all nuisance.
      size: crop side in pixels.

    Returns:
      images (n, size, size) float32 in [0, 1] (unmasked), masks (n, size, size) uint8 (1 = nucleus).
    """
    p = {k: np.asarray(params[k], np.float64) for k in PARAM_KEYS}
    n = len(p["radius"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = (size - 1) / 2
    cy = centre + rng.uniform(-2.5, 2.5, n)
    cx = centre + rng.uniform(-2.5, 2.5, n)
    theta = rng.uniform(0, np.pi, n)
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    a_ax = p["radius"] * np.sqrt(p["elongation"])
    b_ax = p["radius"] / np.sqrt(p["elongation"])
    amp = p["lobes"][:, None] * HARMONIC_SHARE
    phase = rng.uniform(0, 2 * np.pi, (n, len(HARMONICS)))

    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    u = cos_t[:, None, None] * dx + sin_t[:, None, None] * dy
    v = -sin_t[:, None, None] * dx + cos_t[:, None, None] * dy
    un, vn = u / a_ax[:, None, None], v / b_ax[:, None, None]
    rho = np.hypot(un, vn) / _contour(np.arctan2(vn, un), amp, phase)
    masks = (rho < 1).astype(np.uint8)
    edge = expit((1 - rho) * p["radius"][:, None, None] / _EDGE_PX)

    # Chromatin: radial profile (> 0 bright centre, < 0 bright periphery), peripheral band,
    # polarity gradient along a random direction, times band-pass texture.
    body = 1 + p["profile"][:, None, None] * (0.5 - np.minimum(rho, 1) ** 2)
    body = body * (1 + p["rim"][:, None, None] * np.exp(-(((1 - np.minimum(rho, 1)) / _BAND_WIDTH) ** 2)))
    gamma = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    body = body * (1 + p["polarity"][:, None, None] * np.clip(np.cos(gamma) * un + np.sin(gamma) * vn, -1, 1))
    c = p["tex_contrast"][:, None, None]
    tex = np.exp(c * _filtered_noise(rng, n, size, _bandpass(p["tex_wavelength"], size)) - c**2 / 2)

    n_foci = np.minimum(rng.poisson(p["foci_rate"]), MAX_FOCI)
    fy, fx = _points_inside(rng, n, MAX_FOCI, 0.8, cy, cx, cos_t, sin_t, a_ax, b_ax, amp, phase)
    f_w = (np.arange(MAX_FOCI)[None] < n_foci[:, None]) * rng.uniform(0.7, 1.3, (n, MAX_FOCI))
    foci = _splat(fy, fx, f_w, size, sigma=1.1)
    n_nuc = np.minimum(rng.poisson(p["nucleoli_rate"]), MAX_NUCLEOLI)
    ny, nx = _points_inside(rng, n, MAX_NUCLEOLI, 0.6, cy, cx, cos_t, sin_t, a_ax, b_ax, amp, phase)
    nuc = _splat(ny, nx, (np.arange(MAX_NUCLEOLI)[None] < n_nuc[:, None]).astype(float), size, sigma=2.0)
    dark = 1 - p["nucleoli_depth"][:, None, None] * np.minimum(nuc, 1.0)
    bright = p["brightness"][:, None, None]
    nucleus = bright * (body * tex * dark + p["foci_amp"][:, None, None] * foci)

    scene = rng.uniform(0.02, 0.05, (n, 1, 1)) + 0.008 * _filtered_noise(rng, n, size, _lowpass(size, 0.04))
    scene = scene + _neighbours(rng, a_ax, amp, cy, cx, yy, xx, size)
    img = edge * nucleus + (1 - edge) * scene

    ramp = rng.uniform(0, 0.3, n)
    alpha = rng.uniform(0, 2 * np.pi, n)
    illum = 1 + ramp[:, None, None] * (np.cos(alpha)[:, None, None] * (xx - centre) +
                                       np.sin(alpha)[:, None, None] * (yy - centre)) / size
    img = img * illum * np.exp(rng.normal(0, 0.04, n))[:, None, None]
    blur = rng.uniform(0.4, 0.9, n)
    img = np.stack([ndimage.gaussian_filter(img[i], blur[i], mode="nearest") for i in range(n)])
    return _camera(img, rng), masks


def _neighbours(rng, a_ax, amp, cy, cx, yy, xx, size) -> np.ndarray:
    """Fragments of up to MAX_NEIGHBOURS nuclei just outside the central one (brightest wins)."""
    n = len(a_ax)
    reach = a_ax * (1 + amp.sum(axis=1)) + 1
    count = np.minimum(rng.poisson(1.3, n), MAX_NEIGHBOURS)
    texture = np.exp(0.2 * _filtered_noise(rng, n, size, _lowpass(size, 0.12)))
    out = np.zeros((n, size, size))
    for j in range(MAX_NEIGHBOURS):
        r_nb = NOMINAL_RADIUS * size * rng.uniform(0.8, 1.25, n)
        e_nb = rng.uniform(1.0, 1.6, n)
        beta, th = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, np.pi, n)
        dist = reach + r_nb * rng.uniform(0.3, 1.0, n)
        ncy, ncx = cy + dist * np.sin(beta), cx + dist * np.cos(beta)
        dy, dx = yy[None] - ncy[:, None, None], xx[None] - ncx[:, None, None]
        c, s = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
        a, b = (r_nb * np.sqrt(e_nb))[:, None, None], (r_nb / np.sqrt(e_nb))[:, None, None]
        rho = np.hypot((c * dx + s * dy) / a, (-s * dx + c * dy) / b)
        level = (j < count) * NOMINAL_BRIGHTNESS * rng.uniform(0.5, 1.3, n)
        out = np.maximum(out, level[:, None, None] * expit((1 - rho) * r_nb[:, None, None] / _EDGE_PX) * texture)
    return out


def _camera(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    electrons = rng.poisson(np.maximum(scene, 0) * _ELECTRONS)
    adu = np.round(electrons * _GAIN + _OFFSET + rng.normal(0, _READ_SD, scene.shape))
    return (np.clip(adu, 1, _FULL_SCALE) / _FULL_SCALE).astype(np.float32)
