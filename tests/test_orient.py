"""Crops in a canonical pose: the nucleus's major axis horizontal, its centroid at the centre; an
oriented copy of a crop dataset keeps every cell and is rebuilt only when its source changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from cosmic_jax.data import morph_features
from cosmic_jax.data.orient import major_axis_angle, major_axis_length, orient_batch, write_oriented
from cosmic_jax.data.records import CropSource, encode_record, write_shards
from data_builders import render


@pytest.fixture(scope="module")
def nuclei():
    rng = np.random.default_rng(0)
    params = render.params_from_latent(rng.standard_normal((40, len(render.MORPH_PARAMS))))
    images, _ = render.render_batch(params, rng)  # background exactly 0
    return images.astype(np.float32)


def _ellipse(angle_deg: float, centre=(20.0, 27.0), size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    a = np.radians(angle_deg)
    u = (xx - centre[1]) * np.cos(a) + (yy - centre[0]) * np.sin(a)
    v = -(xx - centre[1]) * np.sin(a) + (yy - centre[0]) * np.cos(a)
    return np.where((u / 12) ** 2 + (v / 6) ** 2 < 1, 0.5 + 0.2 * np.cos(u / 2), 0.0).astype(np.float32)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_major_axis_becomes_horizontal_and_centred(angle):
    out = orient_batch(_ellipse(angle)[None])
    mask = morph_features.segment_batch(out)
    got, cy, cx = major_axis_angle(mask)
    assert abs(np.degrees(got[0])) < 2.0
    assert abs(cy[0] - 23.5) < 0.5 and abs(cx[0] - 23.5) < 0.5
    # the shape is kept: same elongation and area as the input's nucleus
    before = morph_features.measure(_ellipse(angle))[:2]
    after = morph_features.measure(out[0])[:2]
    np.testing.assert_allclose(after, before, rtol=0.04)


def test_a_rotated_nucleus_gives_the_same_oriented_crop(nuclei):
    """Orientation removes the angle: a nucleus and a rotated copy of it end up alike (up to which
    end of the axis points left, which the embedding's dihedral averaging removes)."""
    rng = np.random.default_rng(1)
    angles = rng.uniform(0, 360, len(nuclei))
    turned = np.stack([ndimage.rotate(x, a, reshape=False, order=1) for x, a in zip(nuclei, angles)])
    a, b = orient_batch(nuclei), orient_batch(turned)
    corr = [max(np.corrcoef(x.ravel(), np.rot90(y, k).ravel())[0, 1] for k in (0, 2)) for x, y in zip(a, b)]
    raw = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(nuclei, turned)]
    assert np.median(corr) > 0.98, np.median(corr)
    assert np.median(corr) > np.median(raw) + 0.1  # the unoriented pair differs by the angle


def test_background_fill_is_the_border_level_and_channels_are_kept():
    img = _ellipse(45.0, centre=(14.0, 14.0)) + 0.1  # unmasked: background 0.1, nucleus off-centre
    out = orient_batch(np.stack([img, 2 * img], axis=-1)[None])
    assert out.shape == (1, 48, 48, 2)
    assert np.allclose(out[0, 0, 0], [0.1, 0.2], atol=1e-6) and np.allclose(out[0, -1, -1], [0.1, 0.2], atol=1e-6)
    np.testing.assert_allclose(out[0, ..., 1], 2 * out[0, ..., 0], rtol=1e-5)
    masked = orient_batch(_ellipse(60.0, centre=(14.0, 14.0))[None])
    assert masked[0, 0, 0] == 0.0 and masked[0, -1, -1] == 0.0


def test_constant_crop_is_named():
    crops = np.stack([_ellipse(0.0), np.zeros((48, 48), np.float32)])
    with pytest.raises(ValueError, match="cell7: no nucleus"):
        orient_batch(crops, label_of=lambda i: ["cell3", "cell7"][i])


def _write(out_dir, images, seed=0):
    ids = [f"c{i:03d}" for i in range(len(images))]
    write_shards((encode_record(x[..., None], c, {"row": i, "seed": seed}) for i, (x, c) in enumerate(zip(images, ids))),
                 out_dir, records_per_shard=16)
    return ids


def test_oriented_copy_keeps_cells_and_is_rebuilt_only_when_the_source_changes(tmp_path, nuclei):
    src, out = str(tmp_path / "crops"), str(tmp_path / "oriented")
    ids = _write(src, nuclei)
    write_oriented(src, out, chunk=16)
    copy = CropSource(out, with_meta=True)
    assert copy.cell_ids() == ids
    assert copy.read_meta(np.arange(len(ids)))[1][5] == {"row": 5, "seed": 0}
    np.testing.assert_allclose(copy.read_images(np.arange(len(ids)))[..., 0], orient_batch(nuclei), atol=2e-5)
    manifest = os.path.join(out, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    write_oriented(src, out)  # unchanged source: kept
    write_oriented(src, out, size=64)  # the source's own side asked for explicitly: the same copy
    assert os.stat(manifest).st_mtime_ns == stamp

    # the source is rebuilt with other crops under the same ids: the copy follows it
    new = str(tmp_path / "crops_new")
    _write(new, nuclei[::-1].copy(), seed=1)
    os.rename(src, str(tmp_path / "crops_old"))
    os.rename(new, src)
    write_oriented(src, out)
    again = CropSource(out, with_meta=True)
    np.testing.assert_allclose(again.read_images([0])[0, ..., 0], orient_batch(nuclei[-1:])[0], atol=2e-5)
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_oriented_copy_refuses_to_replace_a_folder_that_is_not_a_crop_dataset(tmp_path, nuclei):
    src, out = str(tmp_path / "crops"), tmp_path / "notes"
    _write(src, nuclei[:4])
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an oriented crop dataset"):
        write_oriented(src, str(out))
    assert (out / "keep.txt").read_text() == "mine"


def test_fill_magnifies_the_dataset_by_one_factor(tmp_path, nuclei):
    src, out = str(tmp_path / "crops"), str(tmp_path / "oriented")
    _write(src, nuclei)
    write_oriented(src, out, fill=0.85)
    big = CropSource(out).read_images(np.arange(len(nuclei)))[..., 0]
    before, after = major_axis_length(nuclei), major_axis_length(big)
    assert abs(np.percentile(after, 95) / 64 - 0.85) < 0.03  # the 95th-percentile nucleus spans 85 %
    ratio = after / before  # one factor for every nucleus: relative sizes kept
    assert np.percentile(before, 95) < 0.7 * 64 and ratio.min() > 1.2
    assert ratio.std() / ratio.mean() < 0.02
    stamp = os.stat(os.path.join(out, "manifest.json")).st_mtime_ns
    write_oriented(src, out, fill=0.85)
    assert os.stat(os.path.join(out, "manifest.json")).st_mtime_ns == stamp
    write_oriented(src, out)  # another setting: rebuilt at the original scale
    np.testing.assert_allclose(major_axis_length(CropSource(out).read_images(np.arange(4))[..., 0]),
                               before[:4], rtol=0.05)
    with pytest.raises(ValueError, match="fill=3"):
        write_oriented(src, out, fill=3.0)


def test_size_places_the_nucleus_in_a_crop_of_another_side():
    img = _ellipse(30.0)  # 48 px
    out = orient_batch(img[None], size=64)
    assert out.shape == (1, 64, 64)
    got, cy, cx = major_axis_angle(morph_features.segment_batch(out))
    assert abs(np.degrees(got[0])) < 2.0 and abs(cy[0] - 31.5) < 0.5 and abs(cx[0] - 31.5) < 0.5
    np.testing.assert_allclose(morph_features.measure(out[0])[:2], morph_features.measure(img)[:2], rtol=0.04)
    # the same as orienting in place and padding the margin (background 0)
    np.testing.assert_allclose(out[0, 8:56, 8:56], orient_batch(img[None])[0], atol=1e-5)
