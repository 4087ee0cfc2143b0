"""Bad input and faults never cost data or answer wrongly without a word (issue 14): each command
fails in one line naming what is wrong, and a damaged newest checkpoint falls back to an older one."""

import json
import os
import shutil

import numpy as np
import pytest

from cosmic_jax.cli import main
from cosmic_jax.testing.crops import blob_crops, write_blob_dataset

FAST = ["--config", "test", "--config.progress=false", "--config.recon_every=0", "--config.log_every=1",
        "--config.loader.global_batch=16", "--config.loader.read_threads=1", "--config.model.depth=1"]


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return write_blob_dataset(str(tmp_path_factory.mktemp("crops") / "c"), 64, seed=3)


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


@pytest.mark.parametrize("extra, match", [
    (["--steps", "-5"], "steps must be > 0, got -5"),
    (["--steps", "0"], "steps must be > 0, got 0"),
    (["--steps", "3", "--config.optim.lr=-1"], "optim.lr must be > 0"),
    (["--steps", "3", "--config.loader.global_batch=-8"], "loader.global_batch must be > 0, got -8"),
    (["--steps", "3", "--config.optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["--steps", "3", "--config.steps=1e3"], "1e3"),
])
def test_bad_pretrain_settings_are_one_line_errors_and_leave_no_config(crops, tmp_path, capsys, extra, match):
    w = str(tmp_path / "w")
    rc, err = _run(["pretrain", "--data", crops, "--workdir", w] + FAST + extra, capsys)
    assert rc == 2 and err.startswith("cosmic pretrain: error:") and match in err, err
    assert not os.path.exists(os.path.join(w, "config.json"))  # a retry is not "resuming a changed config"


def test_nan_crop_is_named():
    """A crop that decodes to NaN (records refuse to store one, but disks rot) stops the run with
    the record named, not a generic "lower the learning rate"."""
    import jax
    import jax.numpy as jnp
    from flax import struct

    from cosmic_jax.train.loop import NonFiniteLossError, train_loop
    from cosmic_jax.train.pretrain import describe_bad_records

    class S(struct.PyTreeNode):
        step: jax.Array

    images, _ = blob_crops(8, seed=1)
    images[5, 3, 3, 0] = np.nan
    batches = iter([{"image": images, "index": np.arange(40, 48)}])
    step = jax.jit(lambda s, b, r: (S(s.step + 1), {"loss": jnp.mean(b)}))
    with pytest.raises(NonFiniteLossError, match=r"at step 1 on a batch holding non-finite pixels in record\(s\) \[45\]"):
        train_loop(S(jnp.zeros((), jnp.int32)), step, batches, num_steps=1, rng=jax.random.key(0),
                   prepare_batch=lambda b: jnp.asarray(b["image"]), describe_batch=describe_bad_records,
                   progress=False)


def test_corrupt_newest_checkpoint_falls_back_and_run_finishes(crops, tmp_path, capsys, caplog):
    w = str(tmp_path / "w")
    common = ["pretrain", "--data", crops, "--workdir", w, "--config.ckpt_every=2", "--config.keep_ckpts=5"] + FAST
    assert main(common + ["--steps", "4"]) == 0
    state_dir = os.path.join(w, "checkpoints", "4", "state")
    for root, _, files in os.walk(state_dir):  # damage every data file of the newest checkpoint
        for f in files:
            if f not in ("_CHECKPOINT_METADATA", "_METADATA"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.write(b"\0garbage\0" * 64)
    # inference falls back to step 2 and says why
    rc = main(["embed", "--checkpoint", w, "--input", crops, "--output", str(tmp_path / "e.npy")])
    out = capsys.readouterr()
    assert rc == 0 and json.loads(out.out.strip().splitlines()[-1])["step"] == 2
    # training resumes from step 2, moves the broken step aside (never deleted) and finishes
    assert main(common + ["--steps", "6"]) == 0
    assert "started at 2" in capsys.readouterr().out
    assert sorted(int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit())[-1] == 6
    assert len(os.listdir(os.path.join(w, "unreadable_checkpoints"))) == 1
    assert "skipped unreadable checkpoint" in caplog.text


def test_not_hdf5_and_missing_files_name_the_path(crops, tmp_path, capsys):
    bad = tmp_path / "cells.h5ad"
    bad.write_text("not hdf5")
    rc, err = _run(["analyze", "--h5ad", str(bad), "--workdir", str(tmp_path / "w")], capsys)
    assert rc == 2 and str(bad) in err and "not an HDF5" in err
    out = tmp_path / "emb.h5ad"
    out.write_text("also not hdf5")
    run = str(tmp_path / "nope")
    rc, err = _run(["embed", "--checkpoint", run, "--input", crops, "--output", str(out)], capsys)
    assert rc == 2 and run in err
    assert out.read_text() == "also not hdf5"  # the user's file is untouched


def test_misspelled_label_key_is_an_error(tmp_path, capsys):
    import anndata as ad

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(3.0, (60, 20)).astype(np.float32))
    a.obs["cell_type"] = rng.choice(["x", "y"], 60)
    path = str(tmp_path / "cells.h5ad")
    a.write_h5ad(path)
    rc, err = _run(["analyze", "--h5ad", path, "--workdir", str(tmp_path / "w"), "--quick",
                    "--config.label_key=cel_type"], capsys)
    assert rc == 2 and "no column 'cel_type'" in err and "cell_type" in err, err


def test_float64_beyond_float32_and_hot_pixel_build_the_same_crops(tmp_path, capsys):
    """Through the builder: a float64 copy scaled by 1e300 and a copy with one 1e6 hot pixel give the
    clean image's nuclei (they used to give "no nuclei" / vanish as empty frames)."""
    import tifffile

    from cosmic_jax.data.records import CropSource
    from data_builders import images

    img = tifffile.imread(images.stardist_sample()[0]).astype(np.float64)
    raw = tmp_path / "raw"
    raw.mkdir()
    tifffile.imwrite(raw / "clean.tif", img.astype(np.float32))
    tifffile.imwrite(raw / "huge.tif", img * 1e300)
    hot = img.astype(np.float32)
    hot[100, 100] = 1e6
    tifffile.imwrite(raw / "hot.tif", hot)
    assert main(["data", "nuclei", "--images", str(raw / "*.tif"), "--out", str(tmp_path / "ds")]) == 0
    by_source = {}
    for cid in CropSource(str(tmp_path / "ds")).cell_ids():
        key, label = cid.rsplit("_n", 1)
        by_source.setdefault(key, set()).add(label)
    assert by_source["clean"] == by_source["huge"] and len(by_source["clean"]) > 80
    assert len(by_source["hot"] ^ by_source["clean"]) <= 2  # the hot pixel may split or join one nucleus


def test_replacing_an_oriented_copy_never_leaves_neither(crops, tmp_path, monkeypatch):
    """If renaming the new copy in fails after the old one was put aside, the old copy goes back in
    place (a crash at that instant would leave it as `.name.old-*`); the next run replaces it."""
    from cosmic_jax.data import swap
    from cosmic_jax.data.orient import write_oriented
    from cosmic_jax.data.records import CropSource

    out = str(tmp_path / "oriented")
    write_oriented(crops, out)
    before = CropSource(out).read_images(range(4))
    real, calls = os.rename, []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            assert not os.path.exists(out) and os.path.basename(b) == "oriented"  # old one is aside now
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(swap.os, "rename", second_fails)
    with pytest.raises(OSError, match="disk gone"):
        write_oriented(crops, out, fill=0.6)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["oriented"]  # no stage, nothing aside
    np.testing.assert_array_equal(CropSource(out).read_images(range(4)), before)
    write_oriented(crops, out, fill=0.6)
    assert not np.array_equal(CropSource(out).read_images(range(4)), before)
