"""The grain input pipeline: order, epochs, sharding, resume, workers, errors."""

import jax
import numpy as np
import pytest

from cosmic_jax.data import records
from cosmic_jax.data.device_decode import batch_images
from cosmic_jax.data.loader import LoaderConfig, make_eval_iterator, make_train_iterator, train_batch_spec
from cosmic_jax.data.records import CropSource, RecordError

N = 100  # not a multiple of the batch sizes below, so batches span epoch boundaries
SHAPE = (16, 16, 2)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    d = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    # Continuous random pixels: every crop (and every symmetry of it) is unique.
    recs = (records.encode_record(rng.random(SHAPE, dtype=np.float32), f"cell{i:03d}") for i in range(N))
    records.write_shards(recs, str(d), records_per_shard=32)  # 4 shards: exercises shard offsets
    return str(d)


@pytest.fixture(scope="module")
def raw(crops):
    src = CropSource(crops)
    return np.stack([src[i]["image"] for i in range(N)])


def take(it, k):
    return [next(it) for _ in range(k)]


def indices(batches):
    return np.concatenate([b["index"] for b in batches])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])


def cfg(**kw):
    return LoaderConfig(**{"global_batch": 16, "seed": 3, **kw})


def test_batch_shapes_and_seed_determinism(crops):
    a = take(make_train_iterator(crops, cfg(), 0, 1), 4)
    assert a[0]["image"].shape == (16, *SHAPE) and a[0]["image"].dtype == np.float32
    assert a[0]["index"].dtype == np.int64 and set(a[0]) == {"image", "index"}
    assert_same_batches(a, take(make_train_iterator(crops, cfg(), 0, 1), 4))
    other = indices(take(make_train_iterator(crops, cfg(seed=4), 0, 1), 4))
    assert not np.array_equal(indices(a), other)
    # Unshuffled order is dataset order, wrapping around at the epoch boundary.
    plain = indices(take(make_train_iterator(crops, cfg(shuffle=False), 0, 1), 7))
    np.testing.assert_array_equal(plain, np.arange(112) % N)


def test_every_epoch_is_a_fresh_permutation(crops):
    # 3 epochs of 100 with batch 16: 19 batches, the 7th and 13th straddle epoch boundaries.
    batches = take(make_train_iterator(crops, cfg(), 0, 1), 19)
    epochs = indices(batches)[: 3 * N].reshape(3, N)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_batches_hold_the_stored_crops(crops, raw):
    # The host only reads and batches (augmentation runs in the train step): every image is
    # exactly its record's decoded pixels, also across shard boundaries and epochs.
    for batch in take(make_train_iterator(crops, cfg(), 0, 1), 8):
        np.testing.assert_array_equal(batch["image"], raw[batch["index"]])


def test_shuffle_is_global_per_crop(crops):
    # Every batch mixes crops from across the dataset (not blocks of neighbours): over an
    # epoch, the 99 storage-neighbour pairs (i, i+1) land in the same batch about as often as
    # any random pair would (15/99 each), and batch 0 touches all 4 shards.
    batches = take(make_train_iterator(crops, cfg(), 0, 1), 6)
    same = sum(len(set(b["index"]) & set(b["index"] + 1)) for b in batches)
    assert same < 30, same
    assert set(batches[0]["index"] // 32) == {0, 1, 2, 3}


def test_finite_epochs_and_remainder(crops):
    full = list(make_train_iterator(crops, cfg(num_epochs=2), 0, 1))
    assert [len(b["index"]) for b in full] == [16] * 12  # 200 // 16, rest dropped
    kept = list(make_train_iterator(crops, cfg(num_epochs=2, drop_remainder=False), 0, 1))
    assert [len(b["index"]) for b in kept] == [16] * 12 + [8]
    assert np.array_equal(np.bincount(indices(kept), minlength=N), np.full(N, 2))


def test_restore_from_state_yields_identical_batches(crops):
    it = make_train_iterator(crops, cfg(), 0, 1)
    take(it, 5)  # past the first epoch boundary (step 6.25)
    state = it.get_state()
    expected = take(it, 4)
    fresh = make_train_iterator(crops, cfg(), 0, 1)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected)


def test_restore_through_orbax_checkpoint_manager(crops, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = make_train_iterator(crops, cfg(), 0, 1)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = make_train_iterator(crops, cfg(), 0, 1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 3), expected)


def test_two_processes_split_each_global_batch(crops):
    single = take(make_train_iterator(crops, cfg(), 0, 1), 12)
    p0 = take(make_train_iterator(crops, cfg(), 0, 2), 12)
    p1 = take(make_train_iterator(crops, cfg(), 1, 2), 12)
    for g, a, b in zip(single, p0, p1):
        assert a["image"].shape[0] == b["image"].shape[0] == 8
        assert not set(a["index"]) & set(b["index"])
        # The union of one step over processes is exactly that step's global batch, and each
        # example gets the same augmentation whatever the process count.
        union = np.concatenate([a["index"], b["index"]])
        np.testing.assert_array_equal(np.sort(union), np.sort(g["index"]))
        got = dict(zip(union.tolist(), np.concatenate([a["image"], b["image"]])))
        for i, img in zip(g["index"].tolist(), g["image"]):
            np.testing.assert_array_equal(got[i], img)
    # Within the first epoch (steps 0-5 = positions 0..95) the processes' examples are disjoint.
    s0, s1 = set(indices(p0[:6])), set(indices(p1[:6]))
    assert not s0 & s1 and len(s0) == len(s1) == 48


def test_workers_give_same_batches_and_states_move_between_worker_counts(crops):
    ref_it = make_train_iterator(crops, cfg(), 0, 1)
    ref = take(ref_it, 9)
    plain = make_train_iterator(crops, cfg(), 0, 1)
    take(plain, 3)
    it = make_train_iterator(crops, cfg(worker_count=2), 0, 1)
    try:
        it.set_state(plain.get_state())  # 0-worker state -> 2 workers
        assert_same_batches(take(it, 4), ref[3:7])  # batches 3, 5 from worker 0; 4, 6 from worker 1
        state = it.get_state()
    finally:
        it.close()
    back = make_train_iterator(crops, cfg(), 0, 1)
    back.set_state(state)  # and back to 0 workers
    assert_same_batches(take(back, 2), ref[7:9])


def test_state_restores_under_another_process_count_and_rejects_other_streams(crops):
    single = make_train_iterator(crops, cfg(), 0, 1)
    take(single, 5)
    state = single.get_state()
    expected = take(single, 2)
    halves = []
    for p in (0, 1):
        it = make_train_iterator(crops, cfg(), p, 2)
        it.set_state(state)
        halves.append(take(it, 2))
    for g, a, b in zip(expected, *halves):
        np.testing.assert_array_equal(np.sort(np.concatenate([a["index"], b["index"]])), np.sort(g["index"]))
    with pytest.raises(ValueError, match=r"seed: saved 3 != now 4"):
        make_train_iterator(crops, cfg(seed=4), 0, 1).set_state(state)
    with pytest.raises(ValueError, match=r"global_batch: saved 16 != now 32"):
        make_train_iterator(crops, cfg(global_batch=32), 0, 1).set_state(state)
    # A state from the earlier loader (grain's index shuffle, no stream_version) maps batch
    # numbers to other examples: refused rather than silently resumed.
    old = {k: v for k, v in state.items() if k != "stream_version"}
    with pytest.raises(ValueError, match=r"stream_version: saved 1 != now 2"):
        make_train_iterator(crops, cfg(), 0, 1).set_state(old)


def test_eval_iterator_is_one_ordered_pass(crops, raw):
    batches = list(make_eval_iterator(crops, 32))
    assert [len(b["index"]) for b in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(indices(batches), np.arange(N))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), raw)
    ids = np.concatenate([b["cell_id"] for b in batches]).tolist()
    assert ids == [f"cell{i:03d}" for i in range(N)]


def test_clear_errors(crops, tmp_path):
    empty = tmp_path / "empty"
    records.write_shards([], str(empty))
    with pytest.raises(ValueError, match=f"{empty}.*empty"):
        make_train_iterator(str(empty), cfg(), 0, 1)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make_train_iterator(crops, cfg(global_batch=16), 0, 3)
    with pytest.raises(ValueError, match=f"{crops}: global_batch=128 is larger than the dataset"):
        make_train_iterator(crops, cfg(global_batch=128), 0, 1)


def test_corrupt_record_error_names_shard_and_record_from_workers(tmp_path):
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    rng = np.random.default_rng(0)
    recs = [records.encode_record(rng.random((8, 8, 1), dtype=np.float32), f"c{i}") for i in range(24)]
    records.write_shards(recs, str(tmp_path), records_per_shard=10)
    # Replace pixel record 3 of shard 1 (crop 13) by bytes of the wrong length, as a damaged or
    # foreign file would hold; everything else stays valid.
    path = str(tmp_path / "crops-00001.array_record")
    reader = ArrayRecordReader(path)
    kept = reader.read(0, reader.num_records())
    reader.close()
    kept[3] = b"not a crop"
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in kept:
        writer.write(r)
    writer.close()
    for workers in (0, 1):  # one worker process is enough to cross the process boundary
        it = make_train_iterator(str(tmp_path), cfg(global_batch=8, shuffle=False, worker_count=workers), 0, 1)
        try:
            with pytest.raises(RecordError, match=r"crops-00001\.array_record record 3: cannot decode"):
                take(it, 3)
        finally:
            it.close()


@pytest.mark.parametrize("transfer_mb", [1e-9, 0.05, 4.0])  # 1, 3 and all batches per transfer
def test_worker_transfers_split_into_the_in_process_batches(crops, raw, transfer_mb):
    # Workers send several batches at once as stored pixels; the batches that come out are
    # exactly the in-process ones, including a partial last batch, a resume in the middle of a
    # transfer unit, and the eval pass with its cell ids.
    kw = dict(num_epochs=2, drop_remainder=False, worker_transfer_mb=transfer_mb)
    ref = list(make_train_iterator(crops, cfg(**kw), 0, 1))
    assert len(ref) == 13 and len(ref[-1]["index"]) == 8
    it = make_train_iterator(crops, cfg(worker_count=2, **kw), 0, 1)
    try:
        got = list(it)
        assert it.get_state()["next_batch"] == 13
        it.set_state({**it.get_state(), "next_batch": 4})
        resumed = take(it, 3)
    finally:
        it.close()
    assert_same_batches(got, ref)
    assert_same_batches(resumed, ref[4:7])
    for b in got:
        assert b["image"].dtype == np.float32 and b["index"].dtype == np.int64 and set(b) == {"image", "index"}
        np.testing.assert_array_equal(b["image"], raw[b["index"]])
    ev = make_eval_iterator(crops, 32, worker_count=2)
    try:
        batches = list(ev)
    finally:
        ev.close()
    plain = list(make_eval_iterator(crops, 32))
    assert [len(b["index"]) for b in batches] == [32, 32, 32, 4]
    for a, b in zip(batches, plain):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decode_hands_over_the_stored_crops(crops, workers):
    # No process converts: the batches hold the stored integer pixels with their per-crop scale
    # and offset, the same crops in the same order as the float32 stream; the train step's
    # conversion on the device gives the host's values up to one float32 rounding.
    ref = take(make_train_iterator(crops, cfg(), 0, 1), 9)
    it = make_train_iterator(crops, cfg(worker_count=workers, device_decode=True), 0, 1)
    try:
        got = take(it, 9)
    finally:
        it.close()
    def spec(batch):
        return {k: (v.shape[1:], v.dtype) for k, v in batch.items()}

    assert spec(ref[0]) == train_batch_spec(crops, cfg())  # what the train step is compiled for
    assert spec(got[0]) == train_batch_spec(crops, cfg(device_decode=True))
    for b, r in zip(got, ref):
        assert set(b) == {"pixels", "scale", "offset", "index"} and b["pixels"].dtype == np.uint16
        assert b["scale"].shape == b["offset"].shape == (16, SHAPE[-1])
        np.testing.assert_array_equal(b["index"], r["index"])
        np.testing.assert_array_equal(records.to_values(b["pixels"], b["scale"], b["offset"]), r["image"])
        on_device = np.asarray(jax.jit(batch_images)({k: b[k] for k in ("pixels", "scale", "offset")}))
        np.testing.assert_allclose(on_device, r["image"], rtol=0, atol=2 * np.finfo(np.float32).eps)


def test_device_decode_keeps_float32_for_crops_stored_as_float32(tmp_path):
    recs = (records.encode_record(np.full((4, 4, 1), i, np.float32), f"c{i}") for i in range(8))
    records.write_shards(recs, str(tmp_path), float_storage="float32")
    spec = train_batch_spec(str(tmp_path), cfg(global_batch=4, device_decode=True))
    batch = next(make_train_iterator(str(tmp_path), cfg(global_batch=4, device_decode=True), 0, 1))
    assert set(spec) == set(batch) == {"image", "index"} and batch["image"].dtype == np.float32
