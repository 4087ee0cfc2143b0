"""The pose an MAE was pretrained in travels with it: ``W/pose.json``, exports, and the Embedder, which
puts crops given as cut into that pose, so any path to an embedding gives the analysis's embedding."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cosmic_jax.analysis.variance import AnalysisInputError
from cosmic_jax.cli import main
from cosmic_jax.configs import analyze as analyze_configs
from cosmic_jax.configs import overrides as cfg_io
from cosmic_jax.configs import pretrain as pretrain_configs
from cosmic_jax.data.orient import AS_CUT, dataset_pose, scale_into, write_oriented, write_run_pose
from cosmic_jax.data.records import CropSource, encode_record, read_manifests, write_shards
from cosmic_jax.embed import Embedder, EmbedInputError
from cosmic_jax.embed.export import export_embedder, load_export
from cosmic_jax.models.mae import model_config
from cosmic_jax.train.checkpoint import Checkpointer
from cosmic_jax.workflows.analyze import ensure_mae, oriented_crops
from data_builders import render
from test_embed import random_params

ATOL = 2e-5


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """40 rendered 64 px nuclei at random angles (a crop dataset as cut) and its oriented copy."""
    rng = np.random.default_rng(0)
    images, _ = render.render_batch(render.params_from_latent(rng.standard_normal((40, len(render.MORPH_PARAMS)))), rng)
    root = tmp_path_factory.mktemp("pose")
    src, out = str(root / "crops"), str(root / "oriented")
    write_shards((encode_record(x[..., None].astype(np.float32), f"c{i:02d}", {}) for i, x in enumerate(images)), src,
                 records_per_shard=16, float_storage="float32")
    write_oriented(src, out, fill=0.85)
    return {"src": src, "oriented": out, "images": CropSource(src).read_images(np.arange(len(images)))}


@pytest.fixture(scope="module")
def run(crops, tmp_path_factory):
    """A pretraining workdir whose MAE was pretrained on the oriented copy (as ``cosmic analyze``'s)."""
    w = str(tmp_path_factory.mktemp("run") / "mae")
    cfg = pretrain_configs.get_config("small")
    cfg_io.save(cfg, os.path.join(w, "config.json"))
    ck = Checkpointer(w, save_every=1, async_save=False)
    ck.save(3, {"params": random_params(model_config(cfg.model), seed=5)})
    ck.close()
    write_run_pose(w, dataset_pose(crops["oriented"]))
    return w


def test_the_models_pose_is_applied_to_crops_as_cut(crops, run, tmp_path):
    emb = Embedder.from_checkpoint(run, batch_size=8, progress=False)
    pose = dataset_pose(crops["oriented"])
    assert emb.orient and emb.orient_scale == pytest.approx(pose["scale"]) and pose["scale"] > 1.2
    want, ids = emb.embed_dataset(crops["oriented"])  # an oriented copy: used as it is
    got, got_ids = emb.embed_dataset(crops["src"])  # crops as cut: oriented and magnified here, the same way
    assert got_ids == ids
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(emb.embed(crops["images"]), want, atol=ATOL)  # arrays: the pose's scale
    as_cut = Embedder.from_checkpoint(run, batch_size=8, orient=False, progress=False).embed(crops["images"])
    assert np.abs(as_cut - want).max() > 100 * ATOL
    assert emb.metadata()["orient"] is True and emb.metadata()["orient_scale"] == pytest.approx(pose["scale"])

    # the export carries the pose: a colleague's Embedder applies it too
    out = str(tmp_path / "export")
    export_embedder(emb, out)
    assert load_export(out).config["input"]["pose"] == pose
    via_export = Embedder.from_export(out, batch_size=8, progress=False)
    assert via_export.program is not None and via_export.orient
    np.testing.assert_allclose(via_export.embed_dataset(crops["src"])[0], want, atol=ATOL)

    # and the command line
    npy, off = str(tmp_path / "e.npy"), str(tmp_path / "off.npy")
    assert main(["embed", "--checkpoint", run, "--input", crops["src"], "--output", npy]) == 0
    np.testing.assert_allclose(np.load(npy), want, atol=ATOL)
    assert main(["embed", "--export", out, "--input", crops["src"], "--output", off, "--config.orient=no"]) == 0
    np.testing.assert_allclose(np.load(off), as_cut, atol=ATOL)


def test_bad_orient_setting_and_a_crop_without_a_nucleus_are_named(crops, run, tmp_path, capsys):
    assert main(["embed", "--checkpoint", run, "--input", crops["src"], "--output", str(tmp_path / "e.npy"),
                 "--config.orient=maybe"]) == 2
    assert "--config.orient=maybe" in capsys.readouterr().err
    blank = np.concatenate([crops["images"][:3], np.zeros_like(crops["images"][:1])])
    with pytest.raises(ValueError, match="images: index 3: no nucleus"):
        Embedder.from_checkpoint(run, batch_size=8, progress=False).embed(blank)


def test_runs_without_a_pose_record_and_as_cut_runs_feed_crops_as_they_are(crops, run, tmp_path):
    emb = Embedder.from_checkpoint(run, batch_size=8, progress=False, orient=False)
    os.remove(os.path.join(run, "pose.json"))
    try:
        old = Embedder.from_checkpoint(run, batch_size=8, progress=False)
        assert old.pose is None and not old.orient
        np.testing.assert_allclose(old.embed(crops["images"]), emb.embed(crops["images"]), atol=ATOL)
    finally:
        write_run_pose(run, dataset_pose(crops["oriented"]))


def test_analysis_refuses_an_mae_pretrained_in_another_pose(crops, run, tmp_path):
    cfg = analyze_configs.get_config("quick")
    assert ensure_mae(crops["oriented"], str(tmp_path / "w"), cfg, mae=run) == run
    cfg.orient = False
    with pytest.raises(AnalysisInputError, match="pretrained on oriented crops.*--config.orient=true"):
        ensure_mae(crops["src"], str(tmp_path / "w"), cfg, mae=run)


def test_data_orient_command_and_what_it_refuses(crops, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["data", "orient", "--crops", crops["src"], "--out", out]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["oriented"] and said["fill"] == analyze_configs.get_config().orient_fill
    assert said == {"out": out, **dataset_pose(crops["oriented"])}
    assert main(["data", "orient", "--crops", crops["src"], "--out", crops["src"]]) == 2
    assert "cannot replace its own source" in capsys.readouterr().err
    before = CropSource(crops["src"]).cell_ids()
    # another crop dataset (not an oriented copy) at --out is someone's data: refused, kept
    assert main(["data", "orient", "--crops", crops["oriented"], "--out", crops["src"], "--fill", "0"]) == 2
    assert "not an oriented crop dataset" in capsys.readouterr().err
    assert CropSource(crops["src"]).cell_ids() == before and dataset_pose(crops["src"]) == AS_CUT
    assert main(["data", "orient", "--crops", crops["src"], "--out", out, "--fill", "3"]) == 2


def test_several_crop_datasets_make_one_oriented_copy(crops, tmp_path, capsys):
    """One pretraining set from several sources: each source oriented and magnified by its own factor,
    one manifest each, in the order given; kept when asked again, refused when the shapes differ."""
    wide = str(tmp_path / "wide")  # the same nuclei cut at 80 px
    write_shards((encode_record(x, f"w{i:02d}", {}) for i, x in enumerate(np.pad(crops["images"], ((0, 0), (8, 8), (8, 8), (0, 0))))),
                 wide, records_per_shard=16, float_storage="float32")
    out = str(tmp_path / "both")
    assert main(["data", "orient", "--crops", crops["src"], wide, "--out", out, "--size", "64"]) == 0
    both = CropSource(out)
    one = CropSource(crops["oriented"]).read_images(np.arange(40))
    assert both.cell_ids() == [f"c{i:02d}" for i in range(40)] + [f"w{i:02d}" for i in range(40)]
    images = both.read_images(np.arange(80))
    np.testing.assert_allclose(images[:40], one, atol=1e-4)  # the first source as its own copy
    np.testing.assert_allclose(images[40:], one, atol=1e-4)  # its own factor: the wide cut lands the same
    scales = [m["scale"] for m in read_manifests(out)]
    assert len(scales) == 2 and scales[0] == pytest.approx(dataset_pose(crops["oriented"])["scale"])
    assert scales[1] == pytest.approx(scales[0], rel=1e-3) and dataset_pose(out)["oriented"]
    stamp = os.stat(os.path.join(out, "manifest-s001.json")).st_mtime_ns
    assert write_oriented([crops["src"], wide], out, fill=0.85, size=64) == os.path.abspath(out)
    assert os.stat(os.path.join(out, "manifest-s001.json")).st_mtime_ns == stamp  # the same sources: kept
    write_oriented([wide, crops["src"]], out, fill=0.85, size=64)  # another order: rebuilt
    assert CropSource(out).cell_ids()[0] == "w00"
    assert main(["data", "orient", "--crops", crops["src"], wide, "--out", str(tmp_path / "x")]) == 2
    assert "differ in shape" in capsys.readouterr().err and not os.path.exists(tmp_path / "x")
    assert main(["data", "orient", "--crops", wide, wide, "--out", str(tmp_path / "x")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_scale_into_a_pose(crops):
    """The magnification shared by the Embedder and the pretraining probe: the pose's fill measured on
    the dataset at hand, nothing for an oriented copy or a pose as cut."""
    pose = dataset_pose(crops["oriented"])
    assert scale_into(pose, crops["src"]) == pytest.approx(pose["scale"])  # the same crops: the same factor
    assert scale_into({**pose, "fill": None}, crops["src"]) == pose["scale"]
    assert scale_into(pose, crops["oriented"]) is None and scale_into(AS_CUT, crops["src"]) is None
    assert scale_into(None, crops["src"]) is None


def test_crops_of_another_size_are_oriented_into_the_models_size(crops, run, tmp_path):
    """A reused MAE embeds crop datasets of any size: the nuclei are oriented into its input size. The
    same nuclei cut with a wider margin give the same embedding."""
    wide = np.pad(crops["images"], ((0, 0), (8, 8), (8, 8), (0, 0)))  # 80 px, background 0 as the crops'
    src = str(tmp_path / "wide")
    write_shards((encode_record(x, f"c{i:02d}", {}) for i, x in enumerate(wide)), src, records_per_shard=16,
                 float_storage="float32")
    emb = Embedder.from_checkpoint(run, batch_size=8, progress=False)
    want = emb.embed_dataset(crops["oriented"])[0]
    np.testing.assert_allclose(emb.embed_dataset(src)[0], want, atol=1e-4)
    # the analysis's oriented copy for a reused MAE has the MAE's input size
    copy = oriented_crops(src, str(tmp_path / "w"), analyze_configs.get_config().orient_fill, mae=run)
    assert CropSource(copy).image_shape == (64, 64, 1)
    np.testing.assert_allclose(emb.embed_dataset(copy)[0], want, atol=1e-4)
    with pytest.raises(EmbedInputError, match="80x80 != model input 64x64"):
        Embedder.from_checkpoint(run, batch_size=8, progress=False, orient=False).embed_dataset(src)
    # arrays too: magnified by the pose's scale, so the wide cut matches the crops as cut
    np.testing.assert_allclose(emb.embed(wide), emb.embed(crops["images"]), atol=1e-4)
    with pytest.raises(EmbedInputError, match="80x72; orienting needs square crops"):
        emb.embed(wide[:, :, 4:-4])
    with pytest.raises(EmbedInputError, match="80x80 != model input 64x64"):
        Embedder.from_checkpoint(run, batch_size=8, progress=False, orient=False).embed(wide)
