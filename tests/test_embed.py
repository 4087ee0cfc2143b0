"""Embedder: batching, validation, layer/pool selection, crop datasets, AnnData, checkpoint, CLI."""

import os

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from cosmic_jax.configs import overrides as cfg_io  # noqa: E402
from cosmic_jax.configs import pretrain as pretrain_configs  # noqa: E402
from cosmic_jax.data.records import encode_record, write_shards  # noqa: E402
from cosmic_jax.embed import Embedder, EmbedInputError  # noqa: E402
from cosmic_jax.embed.embedder import DEFAULT_DIHEDRAL, DEFAULT_POOL, default_layers  # noqa: E402
from cosmic_jax.models.mae import MAE, abstract_params, model_config  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module")
def cfg():
    return model_config(pretrain_configs.get_config("test").model)


def random_params(cfg, seed=1):
    """Deterministic random weights with the MAE's exact tree (eval_shape: no slow eager init).

    Non-zero biases and LayerNorm params make every layer matter, unlike a fresh init.
    """
    rng = np.random.default_rng(seed)

    def leaf(s):
        scale = 1.0 / np.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.1
        return rng.normal(0.0, scale, s.shape).astype(np.float32)

    return jax.tree.map(leaf, abstract_params(cfg))


@pytest.fixture(scope="module")
def params(cfg):
    return random_params(cfg)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(11, 32, 32, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def emb4(cfg, params):
    return Embedder(cfg, params, batch_size=4, progress=False)


def reference(cfg, params, x, **kw):
    """Straight model.apply on the whole input at once, no Embedder involved (the Embedder's
    default read-out unless ``kw`` says otherwise)."""
    kw = {"layer": default_layers(cfg.depth), "pool": DEFAULT_POOL, "dihedral": DEFAULT_DIHEDRAL, **kw}
    return np.asarray(MAE(cfg).apply({"params": params}, x, method=MAE.encode, **kw))


def write_crops(out_dir, images, ids, per_shard=4):
    recs = (encode_record(img, cid, {"k": i}) for i, (img, cid) in enumerate(zip(images, ids)))
    write_shards(recs, str(out_dir), records_per_shard=per_shard, float_storage="float32")  # exact pixels
    return str(out_dir)


def save_checkpoint(workdir, params, step=3):
    from cosmic_jax.train.checkpoint import Checkpointer

    cfg_io.save(pretrain_configs.get_config("test"), os.path.join(str(workdir), "config.json"))
    ck = Checkpointer(str(workdir), save_every=1, async_save=False)
    ck.save(step, {"params": params})
    ck.close()
    return str(workdir)


def test_batch_size_independent_and_one_compile(cfg, params, images, emb4):
    ref = reference(cfg, params, images)
    a = emb4.embed(images)  # 11 = 2 full batches of 4 + 3 padded
    b = Embedder(cfg, params, batch_size=16).embed(images)  # one padded batch
    chunks = np.concatenate([emb4.embed(images[i:i + 3]) for i in range(0, 11, 3)])
    assert a.shape == (11, emb4.dim) and a.dtype == np.float32
    np.testing.assert_allclose(a, ref, atol=ATOL)
    np.testing.assert_allclose(b, ref, atol=ATOL)
    np.testing.assert_allclose(chunks, ref, atol=ATOL)
    assert np.abs(a).max() > 0.1 and np.std(a, axis=0).mean() > 1e-3  # not a constant output
    assert emb4._encode._cache_size() == 1  # every N above went through the same compiled batch


def test_micro_batched_pass_matches_reference(cfg, params, images):
    emb = Embedder(cfg, params, batch_size=8, micro_batch=2, devices=1)  # 4 passes per compiled call
    assert emb.micro_batch == 2
    np.testing.assert_allclose(emb.embed(images), reference(cfg, params, images), atol=ATOL)
    # not a divisor: one pass
    assert Embedder(cfg, params, batch_size=8, micro_batch=3, devices=1).micro_batch == 8


def test_batches_split_over_devices_with_micro_batches(cfg, params, images):
    """Data parallel over the 8 forced host devices, 2 passes per device: same embeddings, and the
    chunking keeps the batch sharding (no collectives in the compiled call)."""
    import jax

    emb = Embedder(cfg, params, batch_size=32, micro_batch=2)
    assert emb.num_devices == jax.local_device_count() == 8 and emb.micro_batch == 2
    np.testing.assert_allclose(emb.embed(images), reference(cfg, params, images), atol=ATOL)
    x = jax.device_put(np.zeros((32, 32, 32, 1), np.float32), emb._batch_sharding)
    hlo = emb._encode.lower(emb.params, x).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"))
    assert Embedder(cfg, params, batch_size=12).num_devices == 6  # largest count dividing the batch
    with pytest.raises(ValueError, match="devices must be"):
        Embedder(cfg, params, devices=0)


def test_n0_n1_dtypes_and_channel_axis(cfg, params, images, emb4):
    assert emb4.embed(images[:0]).shape == (0, emb4.dim)
    one = emb4.embed(images[:1])
    np.testing.assert_allclose(one, reference(cfg, params, images[:1]), atol=ATOL)
    np.testing.assert_allclose(emb4.embed(images[..., 0]), emb4.embed(images), atol=0)  # (N,H,W)
    u8 = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 1), dtype=np.uint8)
    # no rescaling: uint8 0..255 is embedded as float 0..255
    np.testing.assert_allclose(emb4.embed(u8), emb4.embed(u8.astype(np.float32)), atol=0)
    np.testing.assert_allclose(emb4.embed(u8.astype(np.float64)), emb4.embed(u8.astype(np.float32)), atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 28, 32, 1), np.float32), r"image size 28x32 != model input 32x32"),
        (np.zeros((2, 32, 32, 3), np.float32), r"3 channels != model input channels 1"),
        (np.zeros((32, 32), np.float32), r"ndim=2.*batch axis"),
        (np.zeros((1, 2, 32, 32, 1), np.float32), r"ndim=5"),
        (np.full((2, 32, 32, 1), "a"), r"not a real numeric type"),
        (np.zeros((0, 16, 16, 1), np.float32), r"image size 16x16"),
    ],
)
def test_bad_inputs_fail_clearly(emb4, bad, match):
    with pytest.raises(EmbedInputError, match=match):
        emb4.embed(bad)


def test_nan_names_the_image(emb4, images):
    x = images.copy()
    x[6, 3, 4, 0] = np.nan
    x[9, 0, 0, 0] = np.inf
    with pytest.raises(EmbedInputError, match=r"2 image\(s\) contain NaN or Inf, e.g. index \[6, 9\]"):
        emb4.embed(x)
    with pytest.raises(EmbedInputError, match=r"index \[1\]"):
        emb4.embed(x[8:])


def test_layer_and_pool(cfg, params, images):
    def emb(**kw):
        return Embedder(cfg, params, batch_size=8, dihedral=False, **kw).embed(images)

    last = emb(layer=-1, pool="mean")
    explicit = emb(layer=cfg.depth - 1, pool="mean")
    first = emb(layer=0, pool="mean")
    cls = emb(layer=-1, pool="cls")
    np.testing.assert_array_equal(last, explicit)
    np.testing.assert_allclose(first, reference(cfg, params, images, layer=0, pool="mean", dihedral=False), atol=ATOL)
    np.testing.assert_allclose(cls, reference(cfg, params, images, layer=-1, pool="cls", dihedral=False), atol=ATOL)
    assert np.abs(first - last).max() > 0.1
    assert np.abs(cls - last).max() > 0.1
    # mean_std: [mean, std] of the patch tokens; several blocks: their pooled outputs side by side.
    tokens = reference(cfg, params, images, layer=0, pool="none", dihedral=False)[:, 1:]
    both = emb(layer=(0, -1), pool="mean_std")
    d = cfg.hidden
    assert both.shape == (len(images), 4 * d)
    np.testing.assert_allclose(both[:, :d], first, atol=ATOL)
    np.testing.assert_allclose(both[:, d:2 * d], tokens.std(axis=1), atol=ATOL)
    np.testing.assert_allclose(both[:, 2 * d:3 * d], last, atol=ATOL)
    with pytest.raises(ValueError, match=r"layer=2 out of range for a 2-block encoder"):
        Embedder(cfg, params, layer=2)
    with pytest.raises(ValueError, match=r"pool must be one of"):
        Embedder(cfg, params, pool="max")
    with pytest.raises(ValueError, match=r"layer must be an int or a non-empty sequence"):
        Embedder(cfg, params, layer=())


def test_dihedral_average_is_orientation_invariant(cfg, params, images):
    emb = Embedder(cfg, params, batch_size=8, dihedral=True, pool="mean", layer=-1)
    plain = Embedder(cfg, params, batch_size=8, dihedral=False, pool="mean", layer=-1).embed(images)
    a = emb.embed(images)
    views = [np.rot90(images, 1, axes=(1, 2)), images[:, :, ::-1], np.rot90(images[:, ::-1], 3, axes=(1, 2))]
    for v in views:
        np.testing.assert_allclose(emb.embed(np.ascontiguousarray(v)), a, atol=ATOL)
    # = the mean of the plain embeddings of the 8 views
    eight = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    eight += [np.rot90(images[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]
    mean = np.mean([Embedder(cfg, params, batch_size=8, dihedral=False, pool="mean", layer=-1)
                    .embed(np.ascontiguousarray(v)) for v in eight], axis=0)
    np.testing.assert_allclose(a, mean, atol=ATOL)
    assert np.abs(a - plain).max() > 1e-3


def test_crop_dataset_in_dataset_order(tmp_path, images, emb4):
    ids = [f"c{i:02d}" for i in range(len(images))]
    d = write_crops(tmp_path / "crops", images, ids, per_shard=4)  # 3 shards
    x, got_ids = emb4.embed_dataset(d)
    assert got_ids == ids
    np.testing.assert_allclose(x, emb4.embed(images), atol=ATOL)
    np.testing.assert_allclose(emb4.embed(d), x, atol=0)


def test_crop_dataset_wrong_size_named(tmp_path, cfg, params):
    d = write_crops(tmp_path / "crops16", np.zeros((3, 16, 16, 1), np.float32), ["a", "b", "c"])
    with pytest.raises(EmbedInputError, match=r"crop dataset .*crops16.*16x16"):
        Embedder(cfg, params, batch_size=4).embed(d)


def test_embed_anndata_matches_shuffled_crops(tmp_path, images, emb4):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    ids = [f"cell{i}" for i in range(len(images))]
    perm = np.random.default_rng(2).permutation(len(images))
    d = write_crops(tmp_path / "shuffled", images[perm], [ids[i] for i in perm])
    obs_order = np.random.default_rng(3).permutation(len(images))  # AnnData in a third order
    adata = ad.AnnData(np.zeros((len(images), 2), np.float32),
                       obs=pd.DataFrame(index=[ids[i] for i in obs_order]))
    want = emb4.embed(images)[obs_order]
    out = emb4.embed_anndata(adata, d, key="X_test")
    np.testing.assert_allclose(adata.obsm["X_test"], want, atol=ATOL)
    np.testing.assert_array_equal(out, adata.obsm["X_test"])
    meta = adata.uns["X_test_meta"]
    assert (meta["model"], list(meta["layer"]), meta["pool"], meta["dihedral"], meta["dim"]) == (
        "vit_test", [0, 1], "mean_std", True, 256)
    # an array with ids, via obs["cell_id"] (obs_names are something else here)
    adata2 = ad.AnnData(obs=pd.DataFrame({"cell_id": [ids[i] for i in obs_order]},
                                         index=[f"r{i}" for i in range(len(images))]))
    emb4.embed_anndata(adata2, (images[perm], [ids[i] for i in perm]))
    np.testing.assert_allclose(adata2.obsm["X_cosmic"], want, atol=ATOL)


def test_embed_anndata_id_errors(tmp_path, images, emb4):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    x = images[:4]
    adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match=r"1 AnnData cell_id\(s\) have no match in crops.*\['d'\].*not in the AnnData.*\['z'\]"):
        emb4.embed_anndata(adata, (x, ["a", "b", "c", "z"]))
    with pytest.raises(ValueError, match=r"1 duplicate cell_id\(s\) in crops, e.g. \['a'\]"):
        emb4.embed_anndata(adata, (x, ["a", "a", "c", "d"]))
    with pytest.raises(ValueError, match=r"4 images but 3 cell_ids"):
        emb4.embed_anndata(adata, x, cell_ids=["a", "b", "c"])
    d = write_crops(tmp_path / "c", x, ["a", "b", "c", "e"])
    with pytest.raises(ValueError, match=r"no match in crop dataset .*/c, e.g. \['d'\]"):
        emb4.embed_anndata(adata, d)
    assert "X_cosmic" not in adata.obsm  # nothing half-written


def test_checkpoint_cli_and_h5ad(tmp_path, cfg, params, images, emb4):
    ad = pytest.importorskip("anndata")
    import pandas as pd

    from cosmic_jax.cli import main

    w = save_checkpoint(tmp_path / "run", params, step=3)
    from_ck = Embedder.from_checkpoint(w, batch_size=4)
    assert from_ck.step == 3 and from_ck.model_name == "vit_test"
    want = emb4.embed(images)
    np.testing.assert_allclose(from_ck.embed(images), want, atol=ATOL)

    ids = [f"n{i}" for i in range(len(images))]
    perm = np.random.default_rng(4).permutation(len(images))
    crops = write_crops(tmp_path / "crops", images[perm], [ids[i] for i in perm])
    npy = str(tmp_path / "e.npy")
    assert main(["embed", "--checkpoint", w, "--input", crops, "--output", npy, "--config.batch_size=4"]) == 0
    np.testing.assert_allclose(np.load(npy), want[perm], atol=ATOL)  # crop-dataset order

    new = str(tmp_path / "new.h5ad")
    main(["embed", "--checkpoint", w, "--input", crops, "--output", new, "--config.layer=0"])
    a = ad.read_h5ad(new)
    assert list(a.obs_names) == [ids[i] for i in perm]
    np.testing.assert_allclose(a.obsm["X_cosmic"], reference(cfg, params, images[perm], layer=0), atol=ATOL)
    assert a.uns["X_cosmic_meta"]["layer"] == 0 and a.uns["X_cosmic_meta"]["step"] == 3

    existing = str(tmp_path / "cells.h5ad")
    order = np.random.default_rng(5).permutation(len(images))
    counts = np.arange(len(images) * 3, dtype=np.float32).reshape(-1, 3)
    ad.AnnData(counts, obs=pd.DataFrame(index=[ids[i] for i in order])).write_h5ad(existing)
    main(["embed", "--checkpoint", w, "--input", crops, "--output", existing, "--key", "X_m"])
    b = ad.read_h5ad(existing)
    assert list(b.obs_names) == [ids[i] for i in order]
    np.testing.assert_array_equal(b.X, counts)  # the user's data untouched
    np.testing.assert_allclose(b.obsm["X_m"], want[order], atol=ATOL)
