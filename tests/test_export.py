"""Export: fresh-process consumer (jax only) == in-memory == checkpoint; hashes; tampering; CLI."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from cosmic_jax.configs import pretrain as pretrain_configs  # noqa: E402
from cosmic_jax.models.mae import model_config  # noqa: E402
from cosmic_jax.embed import Embedder  # noqa: E402
from cosmic_jax.embed.export import (  # noqa: E402
    ExportError,
    export_embedder,
    flatten_params,
    load_export,
)
from test_embed import ATOL, random_params, save_checkpoint, write_crops  # noqa: E402

CONSUMER = os.path.join(os.path.dirname(__file__), "_export_consumer.py")


@pytest.fixture(scope="module")
def cfg():
    return model_config(pretrain_configs.get_config("test").model)


@pytest.fixture(scope="module")
def params(cfg):
    return random_params(cfg, seed=7)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(10).normal(size=(7, 32, 32, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def embedder(cfg, params):
    return Embedder(cfg, params, batch_size=4, layer=0, step=5)  # an intermediate layer on purpose


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, embedder, params):
    out = str(tmp_path_factory.mktemp("exp") / "export")
    export_embedder(embedder, out, full_params=params)
    return out


def _copy(export_dir, tmp_path):
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(export_dir, dst)
    return dst


def test_manifest_and_files(export_dir, params):
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "cosmic-embed-export" and manifest["format_version"] == 1
    assert sorted(manifest["files"]) == ["config.json", "encoder.safetensors", "encoder.stablehlo",
                                         "mae.safetensors"]
    for name, info in manifest["files"].items():
        with open(os.path.join(export_dir, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == info["sha256"], name
        assert info["what"]
    b = load_export(export_dir)
    assert b.config["input"] == {**b.config["input"], "shape": [32, 32, 1], "dtype": "float32"}
    assert b.config["embedding"]["layer"] == 0 and b.config["training_step"] == 5
    assert b.config["model_config"]["name"] == "vit_test"
    enc = flatten_params(b.params)
    assert "encoder/block_0/attn/qkv/kernel" in enc and "patch_embed/kernel" in enc
    assert not any(k.startswith("decoder") for k in enc)  # encoder only
    full, want = flatten_params(b.full_params), flatten_params(params)
    assert sorted(full) == sorted(want)
    for k in want:  # --with-decoder weights round-trip exactly
        np.testing.assert_array_equal(full[k], want[k])


def test_fresh_process_consumer_matches(tmp_path, export_dir, embedder, images):
    np.save(tmp_path / "x.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, CONSUMER, export_dir, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["in_shapes"] == ["(b, 32, 32, 1)"] and "cuda" in info["platforms"]
    got = np.load(tmp_path / "y.npy")
    want = embedder.embed(images)
    assert got.shape == want.shape == (7, 128)  # mean and std of block 0's tokens
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_from_export_matches_in_memory(export_dir, embedder, images):
    e = Embedder.from_export(export_dir, batch_size=3)
    assert (e.layer, e.pool, e.dihedral, e.step) == (0, "mean_std", True, 5)
    # it runs the exported StableHLO, not a model rebuilt from config.json
    x = jax.ShapeDtypeStruct((3, 32, 32, 1), np.float32)
    assert "call_exported" in str(jax.make_jaxpr(e.forward)(e.params, x))
    np.testing.assert_allclose(e.embed(images), embedder.embed(images), atol=ATOL)
    # the 1-device program split over the 8 host devices, 2 passes each: same rows, no collectives
    e8 = Embedder.from_export(export_dir, batch_size=16, micro_batch=1)
    assert (e8.num_devices, e8.micro_batch) == (8, 1)
    np.testing.assert_allclose(e8.embed(images), embedder.embed(images), atol=ATOL)
    hlo = e8._encode.lower(e8.params, jax.device_put(np.zeros((16, 32, 32, 1), np.float32),
                                                     e8._batch_sharding)).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))
    last = Embedder.from_export(export_dir, layer=-1, batch_size=3).embed(images)
    assert np.abs(last - e.embed(images)).max() > 0.1  # the layer can still be overridden


def _rehash(path, name):
    """Update the manifest hash of ``name``, as a careless editor of the export would."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        m = json.load(f)
    with open(os.path.join(path, name), "rb") as f:
        m["files"][name]["sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(mpath, "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("field, value, match", [
    ("layer", 1, r"config.json embedding.layer = 1 but encoder.stablehlo computes \[0\]"),
    ("layer", [0, 1], r"config.json embedding.layer = \[0, 1\]"),
    ("pool", "mean", r"config.json embedding.pool = 'mean' but encoder.stablehlo computes 'mean_std'"),
    ("dihedral", False, r"config.json embedding.dihedral = False"),
    ("output", {"shape": ["b", 64], "dtype": "float32"}, r"config.json output.shape"),
])
def test_edited_config_is_refused(tmp_path, export_dir, field, value, match):
    """config.json edited and its hash updated: the program still computes the old read-out, so
    the export is refused, naming the directory and the field (issue 14)."""
    d = _copy(export_dir, tmp_path)
    cpath = os.path.join(d, "config.json")
    config = json.load(open(cpath))
    if field == "output":
        config["output"] = value
    else:
        config["embedding"][field] = value
    json.dump(config, open(cpath, "w"))
    _rehash(d, "config.json")
    with pytest.raises(ExportError, match=rf"^{d}: {match}"):
        Embedder.from_export(d)


def test_weights_not_fitting_the_program_refused(tmp_path, export_dir):
    import safetensors.numpy

    d = _copy(export_dir, tmp_path)
    wpath = os.path.join(d, "encoder.safetensors")
    w = safetensors.numpy.load_file(wpath)
    w["patch_embed/kernel"] = w["patch_embed/kernel"][:, :-1]
    safetensors.numpy.save_file(w, wpath)
    _rehash(d, "encoder.safetensors")
    with pytest.raises(ExportError, match=r"encoder.safetensors: weight 'patch_embed/kernel' is \(\(64, 63\)"):
        load_export(d)


@pytest.mark.parametrize("name", ["encoder.safetensors", "encoder.stablehlo", "config.json", "mae.safetensors"])
def test_flipped_byte_is_refused(tmp_path, export_dir, name):
    d = _copy(export_dir, tmp_path)
    p = os.path.join(d, name)
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(p, "wb").write(bytes(data))
    with pytest.raises(ExportError, match=rf"{name}: sha256 .* does not match the manifest"):
        Embedder.from_export(d)


def test_version_and_missing_files_refused(tmp_path, export_dir):
    d = _copy(export_dir, tmp_path)
    cpath = os.path.join(d, "config.json")
    config = json.load(open(cpath))
    config["format_version"] = 2
    json.dump(config, open(cpath, "w"))
    _rehash(d, "config.json")  # hashes fine, but a version this code does not read
    with pytest.raises(ExportError, match=r"config.json: unsupported format_version 2"):
        load_export(d)

    d2 = _copy(export_dir, tmp_path / "b")
    mpath = os.path.join(d2, "manifest.json")
    m = json.load(open(mpath))
    m["format_version"] = 99
    json.dump(m, open(mpath, "w"))
    with pytest.raises(ExportError, match=r"manifest.json: unsupported format_version 99"):
        load_export(d2)

    d3 = _copy(export_dir, tmp_path / "c")
    os.remove(os.path.join(d3, "encoder.stablehlo"))
    with pytest.raises(ExportError, match=r"encoder.stablehlo: listed in the manifest but missing"):
        load_export(d3)
    with pytest.raises(ExportError, match=r"export directory not found"):
        load_export(str(tmp_path / "nope"))
    with pytest.raises(FileExistsError, match=r"exists"):
        export_embedder(Embedder.from_export(export_dir), export_dir)


def test_cli_export_and_embed_agree(tmp_path, cfg, params, images):
    from cosmic_jax.cli import main

    w = save_checkpoint(tmp_path / "run", params, step=2)
    out = str(tmp_path / "exp")
    assert main(["export", "--checkpoint", w, "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "mae.safetensors"))
    crops = write_crops(tmp_path / "crops", images, [f"k{i}" for i in range(len(images))])
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    main(["embed", "--checkpoint", w, "--input", crops, "--output", a, "--config.batch_size=4"])
    main(["embed", "--export", out, "--input", crops, "--output", b, "--config.batch_size=5"])
    ref = Embedder(cfg, params, batch_size=8).embed(images)
    np.testing.assert_allclose(np.load(a), ref, atol=ATOL)
    np.testing.assert_allclose(np.load(b), ref, atol=ATOL)
    assert load_export(out).config["training_step"] == 2
    # the default read-out (two blocks, mean_std, dihedral) through the exported program
    via_export = Embedder.from_export(out, batch_size=4)
    assert via_export.program is not None and via_export.readout() == Embedder.from_checkpoint(w).readout()
    assert via_export.readout()["layer_index"] == [0, 1] and via_export.dihedral
    np.testing.assert_allclose(via_export.embed(images), Embedder.from_checkpoint(w, batch_size=4).embed(images),
                               atol=ATOL)


def test_program_without_readout_label_refused(export_dir):
    """A program written before the read-out label existed cannot be checked against config.json."""
    import types

    from cosmic_jax.embed.artifact import check_program

    b = load_export(export_dir)
    old = types.SimpleNamespace(fun_name="forward")
    with pytest.raises(ExportError, match=r"encoder.stablehlo: program 'forward' carries no read-out label.*re-export"):
        check_program(export_dir, b.config, b.model_cfg, flatten_params(b.params), old)
