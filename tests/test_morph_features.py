"""Measured morphology features: the nucleus is segmented inside the crop, so masking the
background to exactly zero (or not) does not change the features."""

from __future__ import annotations

import numpy as np
import pytest

from cosmic_jax.data import morph_features
from data_builders import render


@pytest.fixture(scope="module")
def nuclei():
    rng = np.random.default_rng(0)
    params = render.params_from_latent(rng.standard_normal((200, len(render.MORPH_PARAMS))))
    images, _ = render.render_batch(params, rng)  # background exactly 0
    return images, params, rng


@pytest.mark.parametrize("offset, noise", [(0.0, 0.02), (0.0, 0.05), (0.04, 0.03)])
def test_masked_and_unmasked_crops_give_the_same_features(nuclei, offset, noise):
    images, _, rng = nuclei
    masked = morph_features.measure_batch(images)
    # The unmasked original: camera background (offset + pixel noise, clipped at 0) where the
    # masked crop is 0.
    bg = np.clip(offset + noise * rng.standard_normal(images.shape), 0.0, None)
    unmasked = morph_features.measure_batch(np.where(images > 0, images, bg).astype(np.float32))
    names = morph_features.FEATURE_NAMES
    rel = np.abs(unmasked - masked) / np.abs(masked).mean(axis=0)
    tol = {"area": 0.03, "elongation": 0.02, "mean_intensity": 0.02, "radial_profile": 0.04,
           "texture_energy": 0.02, "texture_grain": 0.02}
    for name, t in tol.items():
        k = names.index(name)
        assert np.median(rel[:, k]) < t, (name, np.median(rel[:, k]))
        assert np.corrcoef(masked[:, k], unmasked[:, k])[0, 1] > 0.99, name
    for name in ("nucleoli_count", "nucleoli_intensity"):
        k = names.index(name)
        assert np.corrcoef(masked[:, k], unmasked[:, k])[0, 1] > 0.97, name


def test_segmentation_keeps_the_central_nucleus_not_a_brighter_neighbour():
    yy, xx = np.mgrid[0:48, 0:48]
    img = 0.3 * (((yy - 24) / 9.0) ** 2 + ((xx - 24) / 6.0) ** 2 < 1)  # centre: 9 x 6 ellipse
    img = img + 0.9 * (((yy - 4) ** 2 + (xx - 4) ** 2) < 16)  # brighter, larger-contrast corner blob
    img = img + 0.02 * np.random.default_rng(1).standard_normal(img.shape)
    mask = morph_features.segment_batch(img[None])[0]
    assert mask[24, 24] and not mask[4, 4]
    # Smoothing before the 30 % threshold moves a hard edge ~0.5 px outwards.
    area, elong = morph_features.measure(img)[:2]
    assert np.pi * 9 * 6 < area < np.pi * 9.7 * 6.7
    assert abs(elong - 1.5) < 0.1


def test_ring_nucleus_is_filled():
    yy, xx = np.mgrid[0:40, 0:40]
    d2 = ((yy - 19.5) ** 2 + (xx - 19.5) ** 2) / 12.0**2
    img = np.where(d2 < 1, 0.05 + 0.5 * d2, 0.0)  # dark centre, bright periphery
    mask = morph_features.segment_batch(img[None])[0]
    assert mask[20, 20]
    assert (d2 < 1).sum() < mask.sum() < (np.sqrt(d2) < 13 / 12).sum()


def _profile(img: np.ndarray) -> dict[str, float]:
    return dict(zip(morph_features.PROFILE_NAMES, morph_features.profile_batch(img[None])[0]))


def test_profile_shape_of_an_ellipse():
    yy, xx = np.mgrid[0:64, 0:64]
    a, b = 20.0, 12.0  # semi-axes along x and y
    img = 0.5 * (((xx - 31.5) / a) ** 2 + ((yy - 31.5) / b) ** 2 < 1)
    p = _profile(img.astype(np.float64))
    # a hard edge widens ~0.5 px under the segmentation's smoothing (see the test above)
    assert abs(p["shape_major_axis"] - 2 * a) < 2.0 and abs(p["shape_minor_axis"] - 2 * b) < 2.0
    assert abs(p["shape_eccentricity"] - np.sqrt(1 - (b / a) ** 2)) < 0.02
    assert abs(p["shape_extent"] - np.pi / 4) < 0.03  # ellipse / its bounding box
    assert p["shape_solidity"] > 0.95 and 0.85 < p["shape_form_factor"] <= 1.05
    # two overlapping discs: a waist, so a convex hull with ~10 % more area and a longer perimeter
    lobes = 0.5 * ((np.hypot(xx - 22, yy - 31.5) < 11) | (np.hypot(xx - 42, yy - 31.5) < 11))
    q = _profile(lobes.astype(np.float64))
    assert q["shape_solidity"] < 0.93 and q["shape_form_factor"] < p["shape_form_factor"] - 0.05
    # the mask's extra ~0.5 px rim is background: the mean a little under 0.5, the 5 % percentile 0
    assert 0.45 < p["intensity_mean"] < 0.5 and p["intensity_p50"] == 0.5 and p["intensity_p05"] == 0
    assert p["intensity_mass_displacement"] < 0.02


def test_profile_radial_rings_of_a_bright_rim_and_a_dome():
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - 31.5, xx - 31.5) / 18.0
    inside = r < 1
    ring = _profile(np.where(inside, 0.1 + 0.6 * r**2, 0.0))  # dark centre, bright periphery
    dome = _profile(np.where(inside, 0.7 - 0.6 * r**2, 0.0))  # bright centre
    fr = lambda p: np.array([p[f"radial_fraction_ring{i}"] for i in range(4)])  # noqa: E731
    assert abs(fr(ring).sum() - 1) < 1e-6 and abs(fr(dome).sum() - 1) < 1e-6
    # the rim's intensity sits outwards of the dome's, ring by ring
    assert fr(ring)[0] < 0.5 * fr(dome)[0] and fr(ring)[3] > fr(dome)[3] + 0.1
    assert (np.cumsum(fr(ring))[:3] < np.cumsum(fr(dome))[:3]).all()
    # a circle of radius 18 px: equivalent diameter ~36 px, no elongation
    assert abs(ring["shape_equivalent_diameter"] - 36) < 2 and ring["shape_eccentricity"] < 0.15


def test_profile_texture_reads_grain_and_strength():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    inside = np.hypot(yy - 31.5, xx - 31.5) < 20
    from scipy import ndimage

    def textured(sigma, amp):
        field = ndimage.gaussian_filter(rng.standard_normal((64, 64)), sigma)
        field /= field[inside].std()
        return np.where(inside, 0.5 * (1 + amp * field), 0.0)

    fine, coarse = _profile(textured(0.8, 0.2)), _profile(textured(3.0, 0.2))
    flat, strong = _profile(textured(1.5, 0.02)), _profile(textured(1.5, 0.2))
    assert fine["texture_band0_energy"] > 2 * coarse["texture_band0_energy"]
    assert coarse["texture_band3_energy"] > 1.5 * fine["texture_band3_energy"]
    grain = lambda p: p["texture_band3_energy"] / p["texture_band0_energy"]  # noqa: E731
    assert grain(coarse) > 3 * grain(fine)
    assert fine["glcm_contrast_d1"] > coarse["glcm_contrast_d1"]
    assert coarse["glcm_correlation_d1"] > fine["glcm_correlation_d1"]
    assert strong["texture_total_energy"] > 3 * flat["texture_total_energy"]
    assert strong["granularity_r1"] > 3 * flat["granularity_r1"]


def test_profile_matches_batch_of_one_and_rejects_bad_crops():
    images = render.render_batch(render.params_from_latent(np.random.default_rng(2).standard_normal(
        (4, len(render.MORPH_PARAMS)))), np.random.default_rng(3))[0]
    batch = morph_features.profile_batch(images)
    assert batch.shape == (4, len(morph_features.PROFILE_NAMES)) and np.isfinite(batch).all()
    np.testing.assert_allclose(morph_features.profile_batch(images[2:3])[0], batch[2], rtol=1e-9, atol=1e-12)
    bad = images.copy()
    bad[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="cell-b"):
        morph_features.profile_batch(bad, names=["cell-a", "cell-b", "cell-c", "cell-d"])


def test_profile_boundary_harmonics_of_a_three_lobed_outline():
    yy, xx = np.mgrid[0:64, 0:64]
    r, th = np.hypot(yy - 31.5, xx - 31.5), np.arctan2(yy - 31.5, xx - 31.5)
    p = _profile(0.5 * (r < 18 * (1 + 0.15 * np.cos(3 * th))).astype(np.float64))
    h = {k: p[f"shape_boundary_harmonic{k}"] for k in (2, 3, 4, 5, 6)}
    assert abs(h[3] - 0.15 / 2) < 0.01, h  # |c_3| / c_0 of r = r0 (1 + a cos 3 theta) is a / 2
    assert max(h[k] for k in (2, 4, 5, 6)) < 0.01, h
