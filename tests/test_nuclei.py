"""Crop builder: the user's own masks, --save-labels round trip, physical scale, output that survives
failures, and every dropped frame counted. Everything goes through the command line or the
builder's public functions, on stardist's real image and its ground-truth labels."""

import glob
import os
import re

import numpy as np
import pytest
import tifffile
from skimage import transform

from cosmic_jax import cli
from cosmic_jax.data import records
from data_builders import images, nuclei
from data_builders import segment as seg


@pytest.fixture(scope="module")
def stardist():
    img_path, mask_path = images.stardist_sample()
    return tifffile.imread(img_path), tifffile.imread(mask_path)


def _cosmic(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["data", "nuclei", *map(str, argv)])
    err = capsys.readouterr().err
    return rc, err


def _crops(out) -> dict:
    src = records.CropSource(str(out), with_meta=True)
    return {r["cell_id"]: r for r in map(src.read, range(len(src)))}


def _snapshot(folder) -> dict:
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def _window(arr, top, left, side):
    padded = np.pad(arr, side)
    return padded[top + side : top + 2 * side, left + side : left + 2 * side]


@pytest.fixture(scope="module")
def user_data(stardist, tmp_path_factory):
    """Two 256x256 images and their instance labels with arbitrary (non-consecutive, > 2^16) ids."""
    img, gt = stardist
    d = tmp_path_factory.mktemp("user")
    (d / "raw").mkdir()
    (d / "labels").mkdir()
    rng = np.random.default_rng(0)
    for name, (y, x) in {"a": (0, 0), "b": (256, 256)}.items():
        lab = gt[y : y + 256, x : x + 256].astype(np.uint32)
        ids = np.unique(lab)[1:]
        new = rng.choice(np.arange(70_000, 90_000), len(ids), replace=False).astype(np.uint32)
        lut = np.zeros(lab.max() + 1, np.uint32)
        lut[ids] = new
        tifffile.imwrite(d / "raw" / f"{name}.tif", img[y : y + 256, x : x + 256])
        tifffile.imwrite(d / "labels" / f"{name}_labels.tif", lut[lab])
    return d


def test_user_masks_give_exactly_their_instances(user_data, tmp_path, capsys):
    out = tmp_path / "ds"
    # --min-area far above any nucleus: segmentation would find nothing, so the crops come from the labels
    rc, err = _cosmic(capsys, "--images", user_data / "raw", "--masks", user_data / "labels", "--out", out,
                      "--config.segment.min_area=100000")  # fmt: skip
    assert rc == 0, err
    got = _crops(out)
    expected = {}
    for name in ("a", "b"):
        img = tifffile.imread(user_data / "raw" / f"{name}.tif").astype(np.float32)
        lab = tifffile.imread(user_data / "labels" / f"{name}_labels.tif")
        for lid in np.unique(lab)[1:]:
            ys, xs = np.nonzero(lab == lid)
            touches = ys.min() == 0 or xs.min() == 0 or ys.max() == 255 or xs.max() == 255
            if not touches:
                expected[f"{name}_n{lid}"] = (img, lab, lid, ys, xs)
    assert sorted(got) == sorted(expected) and len(got) > 40
    for cid, (img, lab, lid, ys, xs) in expected.items():
        crop, meta = got[cid]["image"][..., 0], got[cid]["meta"]
        assert meta["label"] == lid and meta["area"] == len(ys)
        cy, cx = ys.mean(), xs.mean()
        assert (meta["centroid_y"], meta["centroid_x"]) == pytest.approx((cy, cx))
        top, left = int(round(cy - 31.5)), int(round(cx - 31.5))
        inside = _window(lab, top, left, 64) == lid
        # exactly this label's pixels: nothing outside it, and all but the p1-dimmest inside it
        assert not (crop[~inside] != 0).any()
        assert 0.9 * len(ys) <= np.count_nonzero(crop) <= len(ys)
        raw = _window(img, top, left, 64)[inside]
        lo, hi = np.percentile(img[lab == lid], [1, 99])
        # stored as uint16 per crop (records.py): error <= (max - min) / 131070 = 7.6e-6 here
        np.testing.assert_allclose(crop[inside], np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_mask_errors_name_both_files(user_data, tmp_path, capsys):
    raw, labels = user_data / "raw", user_data / "labels"
    bad = tmp_path / "bad"
    bad.mkdir()
    lab = tifffile.imread(labels / "a_labels.tif")
    cases = {
        "shape": (lab[:200], r"a_mask.tif \(mask of .*raw/a.tif\): shape \(200, 256\) does not match"),
        "float": (lab.astype(np.float32), r"a_mask.tif \(mask of .*raw/a.tif\): has dtype float32"),
        "bool": (lab > 0, r"a_mask.tif \(mask of .*raw/a.tif\): is a binary"),
    }
    for arr, pattern in cases.values():
        tifffile.imwrite(bad / "a_mask.tif", arr)
        tifffile.imwrite(bad / "b_mask.tif", tifffile.imread(labels / "b_labels.tif"))
        rc, err = _cosmic(capsys, "--images", raw, "--masks", bad, "--out", tmp_path / "o")
        lines = [ln for ln in err.splitlines() if ln.startswith("cosmic")]
        assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), err
    os.remove(bad / "b_mask.tif")
    rc, err = _cosmic(capsys, "--images", raw, "--masks", bad, "--out", tmp_path / "o")
    assert rc == 2 and "raw/b.tif: no mask found (looked for b.* or b_mask.*" in err
    tifffile.imwrite(bad / "b.tif", lab)
    tifffile.imwrite(bad / "b_labels.tif", lab)
    rc, err = _cosmic(capsys, "--images", raw, "--masks", bad, "--out", tmp_path / "o")
    assert rc == 2 and "raw/b.tif: ambiguous masks" in err and "--mask-suffix" in err
    assert not os.path.exists(tmp_path / "o")


def test_save_labels_round_trip(stardist, tmp_path, capsys):
    img, _ = stardist
    raw = tmp_path / "raw"
    raw.mkdir()
    tifffile.imwrite(raw / "single.tif", img[:256, 256:])
    empty = np.full((200, 200), 7, np.uint16)  # the stack's middle frame has no nuclei
    tifffile.imwrite(raw / "stack.tif", np.stack([img[256:456, :200], empty, img[300:500, 300:500]]), photometric="minisblack")
    scale = ("--pixel-size", 0.5, "--config.crop.target_pixel_size=0.65")  # exercise the rescaled path too
    rc, err = _cosmic(capsys, "--images", raw, "--out", tmp_path / "seg", "--save-labels", tmp_path / "labels",
                      "--skip-empty", *scale)  # fmt: skip
    assert rc == 0, err
    saved = {os.path.basename(p): tifffile.imread(p) for p in glob.glob(str(tmp_path / "labels" / "*"))}
    assert sorted(saved) == ["single.tif", "stack.tif"]
    assert saved["single.tif"].shape == (256, 256) and saved["stack.tif"].shape == (3, 200, 200)
    assert saved["stack.tif"].dtype == np.uint16 and saved["stack.tif"][1].max() == 0
    assert images.pixel_size_um(str(tmp_path / "labels" / "single.tif")) == pytest.approx(0.5)
    first = _crops(tmp_path / "seg")
    # every saved instance off the border is a crop, with its label id
    stack_ids = {f"stack_t{t}_n{v}" for t in (0, 2) for v in np.unique(saved["stack.tif"][t])[1:]}
    assert {c for c in first if c.startswith("stack")} <= stack_ids and len(first) > 40

    rc, err = _cosmic(capsys, "--images", raw, "--masks", tmp_path / "labels", "--out", tmp_path / "again",
                      "--skip-empty", *scale)  # fmt: skip
    assert rc == 0, err
    again = _crops(tmp_path / "again")
    assert list(again) == list(first)
    for cid, rec in first.items():
        assert np.array_equal(again[cid]["image"], rec["image"]), cid
        assert again[cid]["meta"] == rec["meta"], cid


def test_same_physical_scale_after_rescaling(stardist, tmp_path):
    img, gt = stardist
    up = transform.resize(img.astype(np.float32), (1024, 1024), order=1, preserve_range=True).astype(np.uint16)
    gt_up = np.kron(gt, np.ones((2, 2), gt.dtype))
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    # the pixel sizes come from metadata, written the way ImageJ and OME writers do
    tifffile.imwrite(a, img, imagej=True, resolution=(1 / 0.5, 1 / 0.5), metadata={"unit": "micron"})
    tifffile.imwrite(b, up[None], ome=True, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    tifffile.imwrite(tmp_path / "a_mask.tif", gt)
    tifffile.imwrite(tmp_path / "b_mask.tif", gt_up)
    assert images.pixel_size_um(str(a)) == pytest.approx(0.5) and images.pixel_size_um(str(b)) == 0.25

    def metas(path, mask, target):
        recs, _, _ = nuclei.process_image(str(path), "k", seg.segment_params(),
                                          nuclei.crop_settings(target_pixel_size=target), mask and str(mask))  # fmt: skip
        return [records.decode_record(r)["meta"] for r in recs]

    for masks, tol in (((tmp_path / "a_mask.tif", tmp_path / "b_mask.tif"), 0.03), ((None, None), 0.10)):
        ma, mb = metas(a, masks[0], 0.5), metas(b, masks[1], 0.5)
        assert {m["pixel_size"] for m in ma} == {0.5} and {m["pixel_size"] for m in mb} == {0.25}
        assert {m["crop_pixel_size"] for m in ma + mb} == {0.5}
        r = _matched_area_ratios(ma, mb)
        assert len(ma) > 80 and len(r) >= 0.8 * len(ma) and abs(np.median(r) - 1) < tol, (np.median(r), len(r), len(ma))
    # without a target scale the same nuclei are 4x larger in the 2x image: the test can fail
    r = _matched_area_ratios(metas(a, tmp_path / "a_mask.tif", None), metas(b, tmp_path / "b_mask.tif", None))
    assert np.median(r) == pytest.approx(4.0, rel=0.05)


def _matched_area_ratios(small: list[dict], big: list[dict]) -> np.ndarray:
    """area(big) / area(small) for nuclei whose centroids agree (big's input grid is 2x finer)."""
    ratios = []
    for m in small:
        y, x = 2 * m["centroid_y"] + 0.5, 2 * m["centroid_x"] + 0.5
        d = [np.hypot(n["centroid_y"] - y, n["centroid_x"] - x) for n in big]
        if d and min(d) < 3.0:
            ratios.append(big[int(np.argmin(d))]["area"] / m["area"])
    return np.array(ratios)


def test_pixel_size_metadata(tmp_path):
    a = np.zeros((16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "ijnm.tif", a, imagej=True, resolution=(1 / 325, 1 / 325), metadata={"unit": "nm"})
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(1e4 / 0.3, 1e4 / 0.3), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", a, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "plain.tif", a)
    got = {n: images.pixel_size_um(str(tmp_path / f"{n}.tif")) for n in ("ij", "ijnm", "cm", "inch", "plain")}
    assert got["ij"] == pytest.approx(0.65) and got["ijnm"] == pytest.approx(0.325)
    assert got["cm"] == pytest.approx(0.3) and got["inch"] is None and got["plain"] is None


def _two_tiles(stardist, folder):
    img, _ = stardist
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", img[:256, :256])
    tifffile.imwrite(folder / "b.tif", img[256:, 256:])
    return folder


def test_good_dataset_survives_failed_rebuilds(stardist, tmp_path, capsys):
    raw = _two_tiles(stardist, tmp_path / "raw")
    out = tmp_path / "ds"
    rc, err = _cosmic(capsys, "--images", raw, "--out", out, "--config.records_per_shard=10")
    assert rc == 0, err
    before = _snapshot(out)
    assert len(before) > 3
    # b.tif fails after a.tif's crops already streamed into a shard; then a flat frame; then a bad mask
    (raw / "b.tif").write_bytes(b"not a tiff" * 100)
    rc, err = _cosmic(capsys, "--images", raw, "--out", out, "--config.records_per_shard=10")
    assert rc == 2 and "b.tif: unreadable image" in err
    tifffile.imwrite(raw / "b.tif", np.full((128, 128), 9, np.uint16))
    rc, err = _cosmic(capsys, "--images", raw, "--out", out)
    assert rc == 2 and "b.tif: segmentation found no nuclei" in err and "--skip-empty" in err
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ds", "raw"]  # no staging folder left behind
    # a successful rebuild replaces it (and only then)
    rc, err = _cosmic(capsys, "--images", raw, "--out", out, "--skip-empty")
    assert rc == 0 and _snapshot(out) != before and sorted(os.listdir(tmp_path)) == ["ds", "raw"]
    assert all(os.path.getsize(out / n) > 0 for n in os.listdir(out))


def test_foreign_output_folder_is_refused(stardist, tmp_path, capsys):
    raw = _two_tiles(stardist, tmp_path / "raw")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "cells.h5ad").write_text("x")
    rc, err = _cosmic(capsys, "--images", raw, "--out", out)
    assert rc == 2 and "holds files that are not part of a nuclei crop dataset (cells.h5ad, notes.txt)" in err
    assert sorted(os.listdir(out)) == ["cells.h5ad", "notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    rc, err = _cosmic(capsys, "--images", raw, "--out", out / "notes.txt")
    assert rc == 2 and "exists and is not a folder" in err
    before = _snapshot(raw)
    rc, err = _cosmic(capsys, "--images", raw, "--out", tmp_path / "ds", "--save-labels", raw)
    assert rc == 2 and "--save-labels would overwrite the input file" in err and _snapshot(raw) == before


def test_shard_rerun_replaces_only_its_own_files(stardist, tmp_path):
    raw = _two_tiles(stardist, tmp_path / "raw")
    tifffile.imwrite(raw / "c.tif", stardist[0][:256, 256:])
    sources = images.find_images(str(raw))
    out = tmp_path / "ds"
    for i in range(3):
        nuclei.build_dataset(sources, str(out), shard=(i, 3), records_per_shard=10)
    union = _crops(out)
    others = {n: v for n, v in _snapshot(out).items() if "-00001-of-" not in n}
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in others}
    job1 = sorted(n for n in os.listdir(out) if "-00001-of-" in n)
    # a failing re-run of job 1 (its image is now unreadable) changes nothing at all
    good_b = (raw / "b.tif").read_bytes()
    (raw / "b.tif").write_bytes(b"junk" * 100)
    snap = _snapshot(out)
    with pytest.raises(images.ImageError, match="b.tif: unreadable"):
        nuclei.build_dataset(sources, str(out), shard=(1, 3), records_per_shard=10)
    assert _snapshot(out) == snap and not [n for n in os.listdir(out) if n.startswith(".")]
    # a good re-run swaps job 1's files; the other jobs' files are untouched
    (raw / "b.tif").write_bytes(good_b)
    nuclei.build_dataset(sources, str(out), shard=(1, 3), records_per_shard=10)
    after = _snapshot(out)
    assert {n: v for n, v in after.items() if "-00001-of-" not in n} == others
    assert {n: os.stat(out / n).st_mtime_ns for n in others} == mtimes
    new_job1 = sorted(n for n in os.listdir(out) if "-00001-of-" in n)
    assert set(new_job1).isdisjoint(set(job1) - {"manifest-00001-of-00003.json"})  # old shards/CSV gone
    again = _crops(out)
    assert list(again) == list(union)
    assert all(np.array_equal(again[c]["image"], union[c]["image"]) for c in union)


def test_every_dropped_frame_is_counted(stardist, tmp_path, capsys, caplog):
    img, gt = stardist
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    raw.mkdir()
    masks.mkdir()
    flat = np.full((128, 128), 7, np.uint16)
    tifffile.imwrite(raw / "stack.tif", np.stack([img[:128, :128], flat, img[128:256, :128]]), photometric="minisblack")
    filtered = np.zeros((128, 128), np.uint16)
    filtered[0:10, 50:60] = 1  # touches the border
    filtered[40:90, 40:90] = 2  # wider than a 32-pixel crop
    lab = np.stack([gt[:128, :128], np.zeros((128, 128), gt.dtype), filtered]).astype(np.uint16)
    tifffile.imwrite(masks / "stack.tif", lab, photometric="minisblack")
    (raw / "zz_broken.tif").write_bytes(b"junk" * 50)
    args = ("--images", raw / "*.tif", "--masks", masks, "--mask-suffix", "", "--out", tmp_path / "ds", "--config.crop.size=32")
    rc, err = _cosmic(capsys, *args, "--skip-empty", "--config.crop.skip_unreadable=true")
    assert rc == 2 and "zz_broken.tif: no mask found" in err  # a missing mask is never skipped
    tifffile.imwrite(masks / "zz_broken.tif", lab[0])
    rc, err = _cosmic(capsys, *args)
    assert rc == 2 and "stack.tif frame 1: its mask has no labels" in err and "--skip-empty" in err
    rc, err = _cosmic(capsys, *args, "--skip-empty")
    assert rc == 2 and "zz_broken.tif: unreadable image" in err
    rc, err = _cosmic(capsys, *args, "--skip-empty", "--config.crop.skip_unreadable=true")
    assert rc == 0, err
    stats = records.read_manifests(str(tmp_path / "ds"))[0]["build"]["stats"]
    assert (stats["images"], stats["unreadable_images"], stats["frames"]) == (2, 1, 3)
    assert (stats["empty_frames"], stats["frames_without_crops"]) == (1, 1)
    n0 = len(np.unique(gt[:128, :128])) - 1
    assert stats["candidates"] == n0 + 2 and stats["dropped_too_large_for_crop"] >= 1
    summary = [r.getMessage() for r in caplog.records if r.name == "data_builders.nuclei" and "job 0/1" in r.getMessage()]
    assert len(summary) == 1 and "1 empty, 1 with every nucleus filtered out, plus 1 unreadable image(s)" in summary[0]
    with pytest.raises(seg.EmptySegmentationError, match="stack.tif frame 1: segmentation found no .*--skip-empty"):
        nuclei.process_image(str(raw / "stack.tif"), "stack", seg.segment_params(), nuclei.crop_settings(size=32))
