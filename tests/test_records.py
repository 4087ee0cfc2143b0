"""Crop dataset on disk: exact round trips, sharded jobs, worker determinism, corrupt inputs."""

import csv
import glob
import json
import os
import re

import numpy as np
import pytest

from cosmic_jax.data import records
from cosmic_jax.data.loader import LoaderConfig, make_train_iterator, train_batch_spec
from data_builders import nuclei


@pytest.fixture(scope="module")
def single(tiles, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    return out, nuclei.build_dataset(tiles, out, records_per_shard=40)


def _all(source):
    return [(r["cell_id"], r["image"], r["meta"]) for r in map(source.read, range(len(source)))]


def test_encode_decode_exact():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.uint16):
        img = (rng.random((5, 7, 2)) * 1000).astype(dtype)
        meta = {"area": np.int64(12), "c": np.float32(0.5), "v": np.arange(3), "s": "x"}
        rec = records.decode_record(records.encode_record(img, "id-1", meta))
        assert rec["image"].dtype == dtype and np.array_equal(rec["image"], img)
        assert rec["cell_id"] == "id-1" and rec["meta"] == {"area": 12, "c": 0.5, "v": [0, 1, 2], "s": "x"}
    with pytest.raises(records.RecordError, match="'bad': image has NaN"):
        records.encode_record(np.full((2, 2, 1), np.nan), "bad")


def _write(out_dir, images, **kw):
    recs = (records.encode_record(im, f"c{i}", {"i": i}) for i, im in enumerate(images))
    return records.write_shards(recs, str(out_dir), **kw)


def test_write_shards_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.random((23, 8, 8, 1)).astype(np.float32)
    m = _write(tmp_path, imgs, records_per_shard=10, float_storage="float32")
    assert [s["num_records"] for s in m["shards"]] == [10, 10, 3] and m["num_records"] == 23
    assert m["version"] == 2 and m["storage"]["pixels"] == "<f4" and not m["storage"]["quantized"]
    src = records.CropSource(str(tmp_path), with_meta=True).verify()
    assert len(src) == 23 and src.image_shape == (8, 8, 1)
    for i in range(23):
        r = src[i]
        assert np.array_equal(r["image"], imgs[i]) and r["cell_id"] == f"c{i}" and r["meta"] == {"i": i}
    # Batched reads: any order, repeats, across shards; ids from the metadata blocks only.
    idx = [22, 3, 10, 3, 0, 19]
    np.testing.assert_array_equal(src.read_images(idx), imgs[idx])
    assert src.read_meta(idx) == ([f"c{i}" for i in idx], [{"i": i} for i in idx])
    assert src.cell_ids() == [f"c{i}" for i in range(23)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.bool_])
def test_integer_crops_are_lossless_in_their_own_dtype(tmp_path, dtype):
    rng = np.random.default_rng(2)
    if dtype == np.bool_:
        imgs = rng.random((300, 6, 6, 2)) > 0.5
    else:
        info = np.iinfo(dtype)  # the full range: extremes included
        imgs = rng.integers(info.min, info.max, (300, 6, 6, 2), dtype=dtype, endpoint=True)
    m = _write(tmp_path, imgs, records_per_shard=128)  # 3 shards, 2 metadata blocks in the first
    assert m["dtype"] == np.dtype(dtype).name and m["storage"]["pixels"] == np.dtype(dtype).str
    src = records.CropSource(str(tmp_path))
    got = src.read_images(np.arange(300), dtype=src.dtype)
    assert got.dtype == dtype and np.array_equal(got, imgs)
    assert src.read(257)["image"].dtype == dtype and np.array_equal(src.read(257)["image"], imgs[257])
    np.testing.assert_array_equal(src[5]["image"], imgs[5].astype(np.float32))  # training view
    assert src.cell_ids() == [f"c{i}" for i in range(300)]


@pytest.mark.parametrize("storage,qmax", [("uint16", 65535), ("uint8", 255)])
def test_float_crops_quantised_with_bounded_error(tmp_path, storage, qmax):
    rng = np.random.default_rng(3)
    imgs = (rng.normal(size=(40, 16, 16, 3)) * rng.uniform(0.1, 50, (40, 1, 1, 3))).astype(np.float32)
    imgs[:, :4] = 0.0  # a zero background ...
    imgs[:20] = np.abs(imgs[:20])  # ... that is the minimum of half the crops
    imgs[30, ..., 1] = 2.5  # a flat channel
    m = _write(tmp_path, imgs, float_storage=storage)
    assert m["storage"] == {"pixels": np.dtype(storage).str, "quantized": True, "meta_block": 256}
    got = records.CropSource(str(tmp_path)).read_images(np.arange(40))
    rng_c = imgs.max(axis=(1, 2)) - imgs.min(axis=(1, 2))  # (40, 3) per crop and channel
    bound = rng_c / (2 * qmax) + 4 * np.finfo(np.float32).eps * np.abs(imgs).max(axis=(1, 2))
    err = np.abs(got - imgs).max(axis=(1, 2))
    assert np.all(err <= bound), (err / bound).max()
    assert err.max() > 0.1 * bound.max()  # lossy as documented, not silently exact
    assert np.all(got[:20, :4] == 0)  # a crop's minimum is stored exactly
    assert np.all(got[30, ..., 1] == 2.5)


def test_bytes_per_crop_reported_and_compact(tmp_path):
    imgs = np.random.default_rng(5).random((200, 64, 64, 1)).astype(np.float32)  # incompressible
    sizes = {}
    for storage in ("float32", "uint16", "uint8"):
        m = _write(tmp_path / storage, imgs, float_storage=storage)
        on_disk = sum(os.path.getsize(tmp_path / storage / s["file"]) for s in m["shards"])
        assert m["bytes_per_crop"] == on_disk / 200 == sum(s["bytes"] for s in m["shards"]) / 200
        sizes[storage] = m["bytes_per_crop"]
    # 4, 2 or 1 bytes per pixel (zstd saves a little on float32 exponents) + ~100 bytes of
    # record/index overhead + ~100 KiB of file framing per shard (a 4096-crop shard: 25 B/crop)
    pad = 2 * 65536 / 200
    assert 0.8 * 16384 < sizes["float32"] < 1.05 * 16384 + pad
    assert 8192 < sizes["uint16"] < 1.05 * 8192 + pad and 4096 < sizes["uint8"] < 1.05 * 4096 + pad


def test_jobs_with_different_float_storage_read_together(tmp_path):
    # Two --shard jobs of one dataset that happened to store floats differently: one batch
    # spanning both is decoded per job, each within its own error bound.
    imgs = np.random.default_rng(6).random((50, 8, 8, 1)).astype(np.float32)
    recs = [records.encode_record(im, f"c{i}") for i, im in enumerate(imgs)]
    records.write_shards(recs[:20], str(tmp_path), prefix="a", records_per_shard=8, manifest_name="manifest-a.json",
                         float_storage="uint8")
    records.write_shards(recs[20:], str(tmp_path), prefix="b", records_per_shard=8, manifest_name="manifest-b.json",
                         float_storage="float32")
    src = records.CropSource(str(tmp_path))
    idx = [45, 3, 21, 19, 0, 30, 3]
    got = src.read_images(idx)
    exact = np.array(idx) >= 20
    np.testing.assert_array_equal(got[exact], imgs[idx][exact])
    assert 0 < np.abs(got[~exact] - imgs[idx][~exact]).max() <= 1 / 510 + 1e-6
    assert src.cell_ids() == [f"c{i}" for i in range(50)]


def test_mixed_shapes_or_dtypes_refused_naming_the_record(tmp_path):
    good = records.encode_record(np.zeros((4, 4, 1), np.uint16), "a")
    with pytest.raises(records.RecordError, match=r"input record 1 \('b'\): crop shape \(5, 4, 1\)"):
        records.write_shards([good, records.encode_record(np.zeros((5, 4, 1), np.uint16), "b")], str(tmp_path))
    with pytest.raises(records.RecordError, match=r"input record 1 \('c'\): crop dtype float32 differs"):
        records.write_shards([good, records.encode_record(np.zeros((4, 4, 1), np.float32), "c")], str(tmp_path))
    with pytest.raises(records.RecordError, match=r"input record 0: cannot decode"):
        records.write_shards([b"\x85not a crop"], str(tmp_path))


def _write_v1(out_dir, images, per_shard):
    """A dataset exactly as the earlier release wrote it: one encode_record per ArrayRecord record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir)
    shards = []
    for k, s in enumerate(range(0, len(images), per_shard)):
        name = f"crops-{k:05d}.array_record"
        w = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
        for i in range(s, min(s + per_shard, len(images))):
            w.write(records.encode_record(images[i], f"c{i}", {"i": i}))
        w.close()
        shards.append({"file": name, "num_records": min(per_shard, len(images) - s)})
    m = {"format": "cosmic-crops", "version": 1, "num_records": len(images), "image_shape": list(images.shape[1:]),
         "dtype": "float32", "shards": shards}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(m, f)


def test_version1_datasets_stay_readable_and_repack(tmp_path):
    imgs = np.random.default_rng(4).random((30, 8, 8, 1)).astype(np.float32)
    old = str(tmp_path / "v1")
    _write_v1(old, imgs, per_shard=12)
    src = records.CropSource(old, with_meta=True).verify()
    np.testing.assert_array_equal(src.read_images([29, 0, 13]), imgs[[29, 0, 13]])
    assert src[13]["meta"] == {"i": 13} and src.cell_ids() == [f"c{i}" for i in range(30)]
    new = str(tmp_path / "v2")
    m = records.repack(old, new, float_storage="float32", records_per_shard=16)
    assert m["version"] == 2 and m["repacked_from"] == os.path.abspath(old)
    rep = records.CropSource(new, with_meta=True)
    np.testing.assert_array_equal(rep.read_images(np.arange(30)), imgs)
    assert rep.read_meta(np.arange(30)) == src.read_meta(np.arange(30))
    with pytest.raises(FileExistsError, match="already holds a crop dataset"):
        records.repack(old, new)
    with open(os.path.join(old, "manifest.json")) as f:
        m = json.load(f)
    m["version"] = 3
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(records.RecordError, match=r"manifest.json: crop dataset format version 3.*upgrade"):
        records.CropSource(old)


def test_builder_output_matches_csv_and_stats(single):
    out, manifest = single
    src = records.CropSource(out, with_meta=True).verify()
    stats = manifest["build"]["stats"]
    assert len(src) == manifest["num_records"] == stats["crops"] > 80
    assert len(manifest["shards"]) == -(-stats["crops"] // 40)
    # Every candidate is accounted for by exactly one reason.
    dropped = stats["dropped_small"] + stats["dropped_large"] + stats["dropped_border"]
    assert stats["candidates"] == dropped + stats["dropped_too_large_for_crop"] + stats["crops"]
    with open(os.path.join(out, "metadata.csv")) as f:
        rows = list(csv.DictReader(f))
    ids = src.cell_ids()
    assert [r["cell_id"] for r in rows] == ids and len(set(ids)) == len(ids)
    rec = src.read(7)
    assert float(rows[7]["area"]) == rec["meta"]["area"] and rows[7]["source"] == rec["meta"]["source"]
    assert ids[0].startswith("tile0_n")


def test_shard_jobs_disjoint_and_union_equals_single(tiles, single, tmp_path):
    out = str(tmp_path)
    parts = [nuclei.build_dataset(tiles, out, shard=(i, 3), records_per_shard=40) for i in range(3)]
    sources = [set(p["build"]["sources"]) for p in parts]
    assert sum(map(len, sources)) == len(tiles) and set.union(*sources) == set(tiles)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "manifest*.json"))) == [
        f"manifest-{i:05d}-of-00003.json" for i in range(3)
    ]
    union, one = _all(records.CropSource(out)), _all(records.CropSource(single[0]))
    assert [u[0] for u in union] == [o[0] for o in one]
    assert all(np.array_equal(u[1], o[1]) and u[2] == o[2] for u, o in zip(union, one))
    with pytest.raises(FileExistsError, match="different --shard layout"):
        nuclei.build_dataset(tiles, out)  # a single job may not land on top of sharded output


def test_workers_output_identical(tiles, single, tmp_path):
    out = str(tmp_path)
    nuclei.build_dataset(tiles, out, workers=2, records_per_shard=40)
    for name in ["metadata.csv"] + [s["file"] for s in single[1]["shards"]]:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(single[0], name), "rb") as b:
            assert a.read() == b.read(), name


def test_truncated_shard_is_named(single, tmp_path):
    out = str(tmp_path / "copy")
    os.makedirs(out)
    for name in os.listdir(single[0]):
        with open(os.path.join(single[0], name), "rb") as f:
            data = f.read()
        if name == "crops-00001.array_record":
            data = data[: len(data) // 2]
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    src = records.CropSource(out)
    assert src[0]["cell_id"]  # shard 0 is intact
    with pytest.raises(records.RecordError, match="crops-00001.array_record"):
        src.verify()


def test_manifest_with_missing_shard(single, tmp_path):
    with open(os.path.join(single[0], "manifest.json")) as f:
        m = json.load(f)
    m["shards"].append({"file": "crops-00099.array_record", "num_records": 5})
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump(m, f)
    for s in m["shards"][:-1]:
        os.symlink(os.path.join(single[0], s["file"]), tmp_path / s["file"])
    with pytest.raises(records.RecordError, match="manifest.json: lists shard crops-00099.array_record"):
        records.CropSource(str(tmp_path))
    with pytest.raises(records.RecordError, match="no manifest"):
        records.CropSource(str(tmp_path / "sub")) if os.makedirs(tmp_path / "sub") is None else None
    os.symlink(single[0], tmp_path / "sub" / "crops")  # a paired dataset's folder: the error names its crops
    with pytest.raises(records.RecordError, match=re.escape(f"crop dataset is {tmp_path / 'sub' / 'crops'}: pass that")):
        records.CropSource(str(tmp_path / "sub"))


@pytest.mark.parametrize("storage", ["uint16", "uint8", "float32", "int"])
def test_read_stored_then_to_values_equals_read_images(tmp_path, storage):
    # What grain workers send (stored pixels + per-crop scale/offset), converted after the
    # transfer, must be bit-identical to an in-process read, in the requested order.
    rng = np.random.default_rng(7)
    if storage == "int":
        imgs = rng.integers(0, 4096, (30, 6, 5, 2)).astype(np.uint16)
        records.write_shards([records.encode_record(im, f"c{i}") for i, im in enumerate(imgs)], str(tmp_path),
                             records_per_shard=8)
    else:
        imgs = (rng.random((30, 6, 5, 2)) * rng.uniform(0.1, 9, (30, 1, 1, 2))).astype(np.float32)
        records.write_shards([records.encode_record(im, f"c{i}") for i, im in enumerate(imgs)], str(tmp_path),
                             records_per_shard=8, float_storage=storage)
    src = records.CropSource(str(tmp_path))
    idx = [29, 3, 3, 17, 0, 8, 22, 7]
    stored = src.read_stored(idx)
    quantized = storage in ("uint16", "uint8")
    assert set(stored) == ({"pixels", "scale", "offset"} if quantized else {"pixels"})
    assert stored["pixels"].dtype == np.dtype("uint16" if storage == "int" else storage)
    assert stored["pixels"].shape == (len(idx), 6, 5, 2)
    if quantized:
        assert stored["scale"].shape == stored["offset"].shape == (len(idx), 2)
        np.testing.assert_array_equal(stored["offset"], imgs[idx].min(axis=(1, 2)))
    got = records.to_values(**stored)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, src.read_images(idx))
    if not quantized:
        np.testing.assert_array_equal(got, imgs[idx].astype(np.float32))


def test_read_stored_declines_crops_stored_differently(tmp_path):
    imgs = np.random.default_rng(8).random((12, 4, 4, 1)).astype(np.float32)
    recs = [records.encode_record(im, f"c{i}") for i, im in enumerate(imgs)]
    records.write_shards(recs[:6], str(tmp_path), prefix="a", manifest_name="manifest-a.json", float_storage="uint8")
    records.write_shards(recs[6:], str(tmp_path), prefix="b", manifest_name="manifest-b.json")
    src = records.CropSource(str(tmp_path))
    assert src.read_stored([1, 7]) is None  # one crop per job: no common codec
    assert set(src.read_stored([1, 2])) == {"pixels", "scale", "offset"}
    assert src.stored_bytes_per_crop() == 8 + 16 * 2  # the uint16 job's records are the larger
    # so the loader hands every batch over as float32 images, device_decode or not (one step shape)
    assert src.codec is None
    cfg = LoaderConfig(global_batch=4, device_decode=True)
    assert set(train_batch_spec(src, cfg)) == {"image", "index"}
    batch = next(make_train_iterator(src, cfg, 0, 1))
    assert set(batch) == {"image", "index"} and batch["image"].dtype == np.float32
