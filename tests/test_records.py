"""Crop dataset on disk: exact round trips, sharded jobs, worker determinism, corrupt inputs."""

import csv
import glob
import json
import os

import numpy as np
import pytest
import tifffile

from cosmic_jax.data import records
from data_builders import images, nuclei


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Four real 256x256 source images: the quadrants of stardist's img2d."""
    img = tifffile.imread(images.stardist_sample()[0])
    d = tmp_path_factory.mktemp("tiles")
    for k, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        tifffile.imwrite(d / f"tile{k}.tif", img[y : y + 256, x : x + 256])
    return images.find_images(str(d))


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


def test_write_shards_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.random((23, 8, 8, 1)).astype(np.float32)
    recs = (records.encode_record(im, f"c{i}", {"i": i}) for i, im in enumerate(imgs))
    m = records.write_shards(recs, str(tmp_path), records_per_shard=10)
    assert [s["num_records"] for s in m["shards"]] == [10, 10, 3] and m["num_records"] == 23
    src = records.CropSource(str(tmp_path), with_meta=True).verify()
    assert len(src) == 23 and src.image_shape == (8, 8, 1)
    for i in range(23):
        r = src[i]
        assert np.array_equal(r["image"], imgs[i]) and r["cell_id"] == f"c{i}" and r["meta"] == {"i": i}


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
