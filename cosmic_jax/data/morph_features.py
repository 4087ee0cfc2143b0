"""Interpretable morphology features measured from a single nucleus crop with scikit-image.

These are the quantities on which the synthetic morphology ground truth is defined
(``truth.json: morph_var_explained_by_expr_per_feature``), so any analysis can recompute
them from the crops alone. All features are rotation invariant.

The nucleus is segmented inside the crop, so the features do not depend on whether the crop's
background was masked to exactly zero or still holds the camera background and noise: smooth
(Gaussian, sigma 1 px); Otsu threshold per crop; edge threshold = 30 % of the nucleus level
(median of the smoothed pixels above the Otsu threshold), or 30 % of the way up from the
background level (median below it) if that is higher. A fraction of the nucleus level alone does
not depend on the background, so a masked crop and its unmasked original segment alike, and 30 %
keeps the dim periphery of dome-shaped nuclei and the dim centre of ring-shaped ones inside. Then
keep the connected component nearest the crop centre and fill its holes. Intensity features read
the pixels as they are (a masked crop carries no background level to subtract).

Features (:data:`FEATURE_NAMES`):
  area: nucleus pixel count.
  elongation: major / minor axis length of the nucleus mask (moments ellipse).
  mean_intensity: mean inside the nucleus of the image with nucleoli removed (I minus its white
    top-hat), so bright spots do not blur the chromatin brightness.
  radial_profile: minus the least-squares slope of that image against the squared normalised
    radius d2 (moments ellipse; pixels with d2 < 0.8 so the soft rim is left out), relative to
    the mean: > 0 bright centre (dome), < 0 bright periphery (ring).
  texture_energy: std, inside the eroded nucleus, of the residual of the lightly smoothed
    (sigma 0.7 px, against pixel noise) nucleoli-removed image after a per-nucleus quadratic
    surface fit (which absorbs the radial profile), relative to the mean: chromatin texture
    strength.
  texture_grain: the part of that residual's std above 1 px (residual minus its G_1 blur),
    relative to the residual std: fine (high) vs coarse (low) chromatin grain.
  nucleoli_count: local maxima of the white top-hat (3 px cross) of the lightly smoothed
    (sigma 0.7 px) crop inside the eroded nucleus, above 0.05 (5x5 non-maximum suppression).
  nucleoli_intensity: the largest such top-hat response inside the eroded nucleus.

The batch path is vectorised (scikit-image / scipy.ndimage filters with (1, k, k) footprints),
and :func:`measure` is exactly the batch path on a batch of one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FEATURE_NAMES = (
    "area",
    "elongation",
    "mean_intensity",
    "radial_profile",
    "texture_energy",
    "texture_grain",
    "nucleoli_count",
    "nucleoli_intensity",
)

# Which rendering parameter each feature mainly reads out (for interpreting planted effects).
PARAM_TO_FEATURES = {
    "radius": ("area",),
    "elongation": ("elongation",),
    "intensity": ("mean_intensity",),
    "texture_amplitude": ("texture_energy",),
    "profile": ("radial_profile",),
    "texture_scale": ("texture_grain",),
    "nucleoli_rate": ("nucleoli_count",),
    "nucleoli_brightness": ("nucleoli_intensity",),
}

_TOPHAT_RADIUS = 1  # opening by a 3 px cross keeps ~1 px nucleoli, flattens smooth chromatin blobs
_ERODE_RADIUS = 2
_SPOT_THRESHOLD = 0.05
_SEG_SIGMA = 1.0  # smoothing before thresholding: pixel noise must not fray the edge
_SEG_LEVEL = 0.3  # edge at this fraction of the nucleus level ...
_SEG_CONTRAST = 0.3  # ... but at least this fraction of the way up from a bright background
_OTSU_BINS = 256


def _as_batch(crops: np.ndarray, where: str) -> np.ndarray:
    imgs = np.asarray(crops)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim != 3:
        raise ValueError(
            f"{where}: expected single-channel crops (N, H, W) or (N, H, W, 1), got shape {imgs.shape}"
        )
    return imgs.astype(np.float64)


def _footprint(radius: int) -> np.ndarray:
    from skimage import morphology

    # (1, k, k): filters act within each image, never across the batch axis.
    return morphology.disk(radius)[None].astype(bool)


def _plane_structure(connectivity: int = 1) -> np.ndarray:
    from scipy import ndimage

    # (3, 3, 3) with only the middle plane set: labelling / hole filling never crosses the batch axis.
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, connectivity)
    return st


def _otsu_batch(x: np.ndarray) -> np.ndarray:
    """Per-image Otsu threshold of (N, H, W) images (histograms of 256 bins between min and max)."""
    n = len(x)
    lo, hi = x.min(axis=(1, 2)), x.max(axis=(1, 2))
    span = np.maximum(hi - lo, 1e-300)
    q = np.clip(((x - lo[:, None, None]) / span[:, None, None] * (_OTSU_BINS - 1)).round().astype(np.int64),
                0, _OTSU_BINS - 1)
    hist = np.bincount((q + _OTSU_BINS * np.arange(n)[:, None, None]).ravel(),
                       minlength=n * _OTSU_BINS).reshape(n, _OTSU_BINS).astype(np.float64)
    centres = lo[:, None] + span[:, None] * np.arange(_OTSU_BINS)[None] / (_OTSU_BINS - 1)
    w0 = np.cumsum(hist, axis=1)
    s0 = np.cumsum(hist * centres, axis=1)
    w1, s1 = w0[:, -1:] - w0, s0[:, -1:] - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    return np.take_along_axis(centres, np.argmax(between, axis=1)[:, None], axis=1)[:, 0]


def _masked_median(x: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Per-image median of x over ``where`` (N, H, W); NaN where an image has no such pixel."""
    return np.nanmedian(np.where(where, x, np.nan).reshape(len(x), -1), axis=1)


@dataclasses.dataclass
class Moments:
    area: np.ndarray  # (N,)
    cy: np.ndarray  # (N,) mask centroid
    cx: np.ndarray
    dy: np.ndarray  # (N, H, W) offsets from the mask centroid
    dx: np.ndarray
    mu20: np.ndarray  # (N,) central second moments, x x
    mu02: np.ndarray  # y y
    mu11: np.ndarray
    l1: np.ndarray  # (N,) inertia eigenvalues, l1 >= l2 > 0
    l2: np.ndarray
    d2: np.ndarray  # (N, H, W) squared normalised radius of the moments ellipse (1 at its edge)


def moments(mask: np.ndarray) -> Moments:
    """Moments ellipse of each (N, H, W) mask; the same second moments (with the 1/12 pixel term) as
    skimage regionprops' inertia tensor."""
    n, h, w = mask.shape
    m = mask.astype(np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    area = m.sum(axis=(1, 2))
    cy = (m * yy).sum(axis=(1, 2)) / area
    cx = (m * xx).sum(axis=(1, 2)) / area
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    mu20 = (m * dx**2).sum(axis=(1, 2)) / area + 1 / 12
    mu02 = (m * dy**2).sum(axis=(1, 2)) / area + 1 / 12
    mu11 = (m * dx * dy).sum(axis=(1, 2)) / area
    half_tr = (mu20 + mu02) / 2
    disc = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    # uniform ellipse: cov = diag(a^2, b^2) / 4
    det = np.maximum(mu20 * mu02 - mu11**2, 1e-9)
    d2 = (mu02[:, None, None] * dx**2 - 2 * mu11[:, None, None] * dx * dy + mu20[:, None, None] * dy**2)
    return Moments(area, cy, cx, dy, dx, mu20, mu02, mu11, half_tr + disc, np.maximum(half_tr - disc, 1e-9),
                    d2 / (4 * det[:, None, None]))


def segment_batch(crops: np.ndarray, label_of=None) -> np.ndarray:
    """Segment the nucleus of each crop (see the module docstring).

    Args:
      crops: (N, H, W) float images; background masked to 0 or not.
      label_of: ``i -> name`` of crop i for error messages.

    Returns:
      (N, H, W) bool nucleus masks (one filled component per crop).
    """
    from scipy import ndimage
    from skimage import filters

    imgs = np.asarray(crops, np.float64)
    n, h, w = imgs.shape
    label_of = label_of or (lambda i: f"crop {i}")
    smooth = filters.gaussian(imgs, sigma=(0, _SEG_SIGMA, _SEG_SIGMA), preserve_range=True)
    flat = np.ptp(smooth.reshape(n, -1), axis=1) <= 1e-9 * np.maximum(np.abs(smooth).max(axis=(1, 2)), 1.0)
    if flat.any():
        raise ValueError(f"{label_of(int(np.argmax(flat)))}: no nucleus (the crop is constant)")
    otsu = _otsu_batch(smooth)[:, None, None]
    fg_level = _masked_median(smooth, smooth > otsu)
    bg_level = _masked_median(smooth, smooth <= otsu)
    thr = np.maximum(_SEG_LEVEL * fg_level, bg_level + _SEG_CONTRAST * (fg_level - bg_level))
    fg = smooth > thr[:, None, None]

    # Keep the component nearest the crop centre (ties: the larger one). ndimage.label numbers
    # components in C order, so each image's labels follow the previous image's.
    labels, n_lab = ndimage.label(fg, structure=_plane_structure())
    idx = np.arange(1, n_lab + 1)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.broadcast_to(np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2), imgs.shape)
    near = ndimage.minimum(dist, labels, idx)
    size = np.bincount(labels.ravel(), minlength=n_lab + 1)[1:]
    owner = ndimage.minimum(np.broadcast_to(np.arange(n)[:, None, None], imgs.shape), labels, idx).astype(np.int64)
    order = np.lexsort((-size, near, owner))
    first = np.unique(owner[order], return_index=True)[1]
    best = np.zeros(n, np.int64)
    best[owner[order[first]]] = idx[order[first]]
    return ndimage.binary_fill_holes(labels == best[:, None, None], structure=_plane_structure())


def checked_masks(crops, names=None, where: str = "crops", mask: np.ndarray | None = None):
    """Checked (N, H, W) float64 crops and their nucleus masks (errors name the crop by ``names``);
    ``mask``: masks this function already gave for these crops (checked for shape, not recomputed).
    Share one call between :func:`measure_batch` and :func:`profile_batch` (``mask=``)."""
    imgs = _as_batch(crops, where)
    label_of = (lambda i: names[i]) if names is not None else (lambda i: f"crop {i}")
    bad = ~np.isfinite(imgs).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{label_of(int(np.argmax(bad)))}: crop has NaN or Inf values")
    if mask is None:
        return imgs, segment_batch(imgs, label_of)
    if mask.shape != imgs.shape:
        raise ValueError(f"{where}: mask shape {mask.shape} != crops {imgs.shape}")
    return imgs, mask


def measure_batch(crops: np.ndarray, names: list[str] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Measure :data:`FEATURE_NAMES` on a batch of crops (vectorised over the batch).

    Args:
      crops: (N, H, W) or (N, H, W, 1) images, background masked to zero or not.
      names: optional per-crop names (cell_ids) used in error messages.
      mask: (N, H, W) nucleus masks from :func:`checked_masks`, to share one segmentation with
        :func:`profile_batch` (default: segment here).

    Returns:
      (N, len(FEATURE_NAMES)) float64 raw (unstandardised) features.
    """
    # Imported here so `cosmic --help` (which imports the synthetic module) stays instant.
    from scipy import ndimage
    from skimage import filters, morphology

    imgs, mask = checked_masks(crops, names, "measure_batch", mask)
    n, h, w = imgs.shape

    m = mask.astype(np.float64)
    mo = moments(mask)
    area = mo.area
    elongation = np.sqrt(mo.l1 / mo.l2)

    # Nucleoli first: their top-hat is also removed from the image the chromatin features read.
    # Light smoothing: a matched filter for ~1 px nucleoli that suppresses pixel noise.
    inner = ndimage.binary_erosion(mask, structure=_footprint(_ERODE_RADIUS))
    small = inner.sum(axis=(1, 2)) < 4  # tiny nucleus: use the full mask, not empty stats
    inner[small] = mask[small]
    fi = inner.astype(np.float64)
    n_in = fi.sum(axis=(1, 2))
    g07 = filters.gaussian(imgs, sigma=(0, 0.7, 0.7), preserve_range=True)
    tophat = morphology.white_tophat(g07, footprint=_footprint(_TOPHAT_RADIUS))
    is_peak = (
        inner
        & (tophat >= ndimage.maximum_filter(tophat, footprint=_footprint(2), mode="constant"))
        & (tophat > _SPOT_THRESHOLD)
    )
    nucleoli_count = is_peak.sum(axis=(1, 2)).astype(np.float64)
    nucleoli_intensity = np.where(inner, tophat, -np.inf).max(axis=(1, 2))

    chrom = imgs - tophat * m
    mean_intensity = (chrom * m).sum(axis=(1, 2)) / area

    d2 = mo.d2
    core = m * (d2 < 0.8)
    n_core = np.maximum(core.sum(axis=(1, 2)), 1.0)
    d2_mean = (core * d2).sum(axis=(1, 2)) / n_core
    c_mean = (core * chrom).sum(axis=(1, 2)) / n_core
    dd = (d2 - d2_mean[:, None, None]) * core
    slope = (dd * chrom).sum(axis=(1, 2)) / np.maximum((dd**2).sum(axis=(1, 2)), 1e-9)
    radial_profile = -slope / np.maximum(c_mean, 1e-6)

    # Quadratic surface per nucleus (6 terms, least squares over the eroded nucleus) absorbs the
    # smooth body and radial profile, so the residual is the chromatin texture.
    smooth = filters.gaussian(chrom, sigma=(0, 0.7, 0.7), preserve_range=True)
    # Fixed pixel-grid basis (a quadratic in shifted coordinates spans the same space), so
    # the per-nucleus normal equations are two plain matrix products over the batch.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    gy, gx = (yy - (h - 1) / 2) / 16.0, (xx - (w - 1) / 2) / 16.0
    basis = np.stack([np.ones_like(gx), gx, gy, gx * gx, gx * gy, gy * gy], axis=-1).reshape(h * w, 6)
    fflat = fi.reshape(n, h * w)
    gram = (fflat @ (basis[:, :, None] * basis[:, None, :]).reshape(h * w, 36)).reshape(n, 6, 6)
    rhs = (fflat * smooth.reshape(n, h * w)) @ basis
    coef = np.linalg.solve(gram + 1e-9 * np.eye(6), rhs[..., None])[..., 0]
    resid = (smooth - (coef @ basis.T).reshape(n, h, w)) * fi
    level = np.maximum((chrom * fi).sum(axis=(1, 2)) / n_in, 1e-6)
    res_sd = np.sqrt((resid**2).sum(axis=(1, 2)) / n_in)
    texture_energy = res_sd / level
    hi = (resid - filters.gaussian(resid, sigma=(0, 1.0, 1.0), preserve_range=True)) * fi
    texture_grain = np.sqrt((hi**2).sum(axis=(1, 2)) / n_in) / np.maximum(res_sd, 1e-9)
    return np.stack(
        [area, elongation, mean_intensity, radial_profile, texture_energy, texture_grain, nucleoli_count,
         nucleoli_intensity],
        axis=1,
    )


def measure(crop: np.ndarray, where: str = "crop") -> np.ndarray:
    """Measure :data:`FEATURE_NAMES` on one crop.

    Args:
      crop: (H, W) or (H, W, 1) image, background masked to zero or not.
      where: names the crop in error messages (e.g. its cell_id).

    Returns:
      (len(FEATURE_NAMES),) float64 raw features (identical to the batch path).
    """
    img = np.asarray(crop)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"{where}: expected a single-channel crop (H, W) or (H, W, 1), got {img.shape}")
    return measure_batch(img[None], names=[where])[0]


def standardize(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(N, F) raw features -> z-scores with the given population statistics."""
    std = np.where(np.asarray(std) > 0, std, 1.0)
    return (np.asarray(features) - mean) / std


# Generic per-nucleus profile (what CellProfiler / scikit-image measure for any nucleus, not what a
# generator varies). These are extra morphology INPUTS of the analysis; the morphology-side targets
# and the synthetic truth stay on FEATURE_NAMES.
_RINGS = 4  # radial bins of the normalised radius, as CellProfiler's MeasureObjectIntensityDistribution
_PERCENTILES = (5, 25, 50, 75, 95)
# band-pass texture energies between consecutive scales (0 = the image itself)
_DOG_SIGMAS = (0.0, 0.7, 1.4, 2.8, 5.6)
_GRANULARITY_RADII = (1, 2, 3, 4)  # grey-opening spectrum (CellProfiler MeasureGranularity)
_HARMONICS = (2, 3, 4, 5, 6)  # boundary Fourier descriptors (2 = elongation, higher = irregularity)
_BOUNDARY_BINS = 64
_GLCM_LEVELS = 16
_GLCM_DISTANCES = (1, 2)
_GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
PROFILE_NAMES = (
    ("shape_area", "shape_perimeter", "shape_form_factor", "shape_solidity", "shape_extent",
     "shape_eccentricity", "shape_major_axis", "shape_minor_axis", "shape_equivalent_diameter")
    + tuple(f"shape_boundary_harmonic{k}" for k in _HARMONICS)
    + ("intensity_integrated", "intensity_mean", "intensity_std", "intensity_max")
    + tuple(f"intensity_p{p:02d}" for p in _PERCENTILES)
    + ("intensity_edge_mean", "intensity_mass_displacement")
    + tuple(f"radial_fraction_ring{i}" for i in range(_RINGS))
    + tuple(f"radial_cv_ring{i}" for i in range(_RINGS))
    + tuple(f"texture_band{i}_energy" for i in range(len(_DOG_SIGMAS) - 1)) + ("texture_total_energy",)
    + tuple(f"granularity_r{r}" for r in _GRANULARITY_RADII)
    + tuple(f"glcm_{p}_d{d}" for d in _GLCM_DISTANCES for p in _GLCM_PROPS)
)


def _masked_percentiles(x: np.ndarray, mask: np.ndarray, qs) -> np.ndarray:
    return np.nanpercentile(np.where(mask, x, np.nan).reshape(len(x), -1), qs, axis=1).T


def _shape_loop(mask: np.ndarray) -> np.ndarray:
    """Perimeter, solidity, extent per mask (regionprops: needs the contour / convex hull of each)."""
    from skimage import measure

    out = np.empty((len(mask), 3))
    for i, mk in enumerate(mask):
        p = measure.regionprops(mk.astype(np.uint8))[0]
        out[i] = p.perimeter, p.solidity, p.extent
    return out


def _boundary_harmonics(mask: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """|c_k| / c_0 of the radius function r(theta) (farthest mask pixel from the centroid in each
    of 64 angle bins; empty bins take the mean radius): rotation-invariant outline descriptors."""
    n = len(mask)
    ang = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * _BOUNDARY_BINS).astype(np.int64) % _BOUNDARY_BINS
    key = (np.arange(n)[:, None, None] * _BOUNDARY_BINS + ang)[mask]
    r = np.full(n * _BOUNDARY_BINS, -1.0)
    np.maximum.at(r, key, np.hypot(dy, dx)[mask])
    r = r.reshape(n, _BOUNDARY_BINS)
    fill = np.where(r >= 0, r, 0).sum(1) / np.maximum((r >= 0).sum(1), 1)
    r = np.where(r >= 0, r, fill[:, None]) + 0.5  # + half a pixel: a pixel centre is not the edge
    c = np.abs(np.fft.rfft(r, axis=1))
    return c[:, list(_HARMONICS)] / np.maximum(c[:, :1], 1e-9)


def _glcm_loop(imgs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Haralick features inside the nucleus: grey levels 1..L over each nucleus's own 1-99 % range,
    0 outside (the row and column of level 0 are dropped), symmetric, averaged over 4 angles."""
    from skimage.feature import graycomatrix, graycoprops

    lo = _masked_percentiles(imgs, mask, (1,))[:, 0]
    hi = _masked_percentiles(imgs, mask, (99,))[:, 0]
    q = (imgs - lo[:, None, None]) / np.maximum(hi - lo, 1e-9)[:, None, None]
    q = np.where(mask, 1 + np.clip(np.floor(q * _GLCM_LEVELS), 0, _GLCM_LEVELS - 1), 0).astype(np.uint8)
    angles = (0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    out = np.empty((len(imgs), len(_GLCM_DISTANCES), len(_GLCM_PROPS)))
    for i, qi in enumerate(q):
        g = graycomatrix(qi, _GLCM_DISTANCES, angles, levels=_GLCM_LEVELS + 1, symmetric=True)[1:, 1:]
        g = g.astype(np.float64) / np.maximum(g.sum(axis=(0, 1), keepdims=True), 1)
        out[i] = np.stack([graycoprops(g, p).mean(axis=1) for p in _GLCM_PROPS], axis=1)
    return out.reshape(len(imgs), -1)


def profile_batch(crops: np.ndarray, names: list[str] | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Measure :data:`PROFILE_NAMES` on a batch of crops (nucleus segmented as :func:`segment_batch`).

    Shape: area, perimeter, form factor 4 pi A / P^2, solidity, extent, eccentricity, major / minor
    axis and equivalent diameter (regionprops conventions); boundary Fourier descriptors: harmonics
    2-6 of the radius-vs-angle function relative to its mean. Intensity inside the nucleus: integrated,
    mean, std, max, percentiles, mean of the 2 px edge band, and the distance between the intensity
    and mask centroids over the equivalent radius. Radial distribution: share of the integrated
    intensity and coefficient of variation in 4 rings of the normalised (moments-ellipse) radius.
    Texture: median absolute band-pass response (difference of Gaussians by normalised convolution
    inside the nucleus) between consecutive scales 0 (the pixels), 0.7, 1.4, 2.8, 5.6 px and in
    total (pixels minus the 5.6 px blur), each relative to the local level (the 5.6 px blur);
    granularity = share of the intensity removed by grey openings of radius 1-4 px; GLCM contrast /
    homogeneity / energy / correlation at 1 and 2 px.

    Args:
      crops: (N, H, W) or (N, H, W, 1) images, background masked to zero or not.
      names: optional per-crop names (cell_ids) used in error messages.
      mask: (N, H, W) nucleus masks from :func:`checked_masks` (default: segment here).

    Returns:
      (N, len(PROFILE_NAMES)) float64 raw features.
    """
    from scipy import ndimage
    from skimage import filters, morphology

    imgs, mask = checked_masks(crops, names, "profile_batch", mask)
    n, h, w = imgs.shape
    m = mask.astype(np.float64)
    mo = moments(mask)
    area, cy, cx = mo.area, mo.cy, mo.cx
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    major, minor = 4 * np.sqrt(mo.l1), 4 * np.sqrt(mo.l2)
    eccentricity = np.sqrt(1 - mo.l2 / mo.l1)
    perimeter, solidity, extent = _shape_loop(mask).T
    harmonics = _boundary_harmonics(mask, mo.dy, mo.dx)
    form_factor = 4 * np.pi * area / np.maximum(perimeter, 1.0) ** 2
    eq_diam = 2 * np.sqrt(area / np.pi)

    total = (m * imgs).sum(axis=(1, 2))
    mean = total / area
    std = np.sqrt((m * (imgs - mean[:, None, None]) ** 2).sum(axis=(1, 2)) / area)
    vmax = np.where(mask, imgs, -np.inf).max(axis=(1, 2))
    pct = _masked_percentiles(imgs, mask, _PERCENTILES)
    edge = mask & ~ndimage.binary_erosion(mask, structure=_footprint(2))
    edge_mean = (edge * imgs).sum(axis=(1, 2)) / np.maximum(edge.sum(axis=(1, 2)), 1)
    wt = m * np.clip(imgs, 0, None)
    wsum = np.maximum(wt.sum(axis=(1, 2)), 1e-12)
    iy, ix = (wt * yy).sum(axis=(1, 2)) / wsum, (wt * xx).sum(axis=(1, 2)) / wsum
    mass_disp = np.hypot(iy - cy, ix - cx) / (eq_diam / 2)

    r = np.sqrt(mo.d2)  # 1 at the moments-ellipse edge
    ring = np.minimum((r * _RINGS).astype(np.int64), _RINGS - 1)
    fracs, cvs = [], []
    for k in range(_RINGS):
        rk = mask & (ring == k)
        nk = np.maximum(rk.sum(axis=(1, 2)), 1)
        sk = (rk * imgs).sum(axis=(1, 2))
        mk = sk / nk
        fracs.append(sk / np.where(total != 0, total, 1.0))
        cvs.append(np.sqrt((rk * (imgs - mk[:, None, None]) ** 2).sum(axis=(1, 2)) / nk) / np.maximum(np.abs(mk), 1e-6))

    # Normalised convolution G(I m) / G(m): blurs see only the nucleus, so its edge against the
    # background is no texture and masked / unmasked crops read alike.
    blurs = [imgs]
    for sg in _DOG_SIGMAS[1:]:
        num = filters.gaussian(imgs * m, sigma=(0, sg, sg), preserve_range=True)
        blurs.append(num / np.maximum(filters.gaussian(m, sigma=(0, sg, sg), preserve_range=True), 1e-6))
    # relative to the local level (the coarsest blur): chromatin texture multiplies the nucleus's
    # smooth body, so a bright centre or rim does not read as stronger texture
    level = np.maximum(np.abs(blurs[-1]), 1e-3 * np.maximum(np.abs(mean), 1e-6)[:, None, None])
    # Read inside the eroded nucleus (the edge's own fall-off is no texture either), robustly
    # (median absolute response: a few bright spots must not read as texture everywhere).
    inner = mask & ~edge
    small = inner.sum(axis=(1, 2)) < 4
    inner[small] = mask[small]
    bands = [_masked_median(np.abs(a - b) / level, inner) for a, b in zip(blurs, blurs[1:])]
    bands.append(_masked_median(np.abs(imgs - blurs[-1]) / level, inner))  # total
    gran, prev = [], imgs
    for rad in _GRANULARITY_RADII:
        opened = morphology.opening(imgs, footprint=_footprint(rad))
        gran.append((m * (prev - opened)).sum(axis=(1, 2)) / np.maximum(np.abs(total), 1e-12))
        prev = opened
    glcm = _glcm_loop(imgs, mask)
    return np.column_stack(
        [area, perimeter, form_factor, solidity, extent, eccentricity, major, minor, eq_diam, harmonics,
         total, mean, std, vmax, pct, edge_mean, mass_disp, *fracs, *cvs, *bands, *gran, glcm]
    )
