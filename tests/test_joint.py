"""Joint model on a linear-Gaussian toy with a known answer, in both directions.

    m ~ N(0, I_4),  e = m A + sigma * noise   (sigma = 0.5)
    p(e | m) = N(m A, sigma^2 I)
    p(m | e) = N(e A^T Sigma / sigma^2, Sigma),  Sigma = (I + A A^T / sigma^2)^-1

One model is fitted per module on one device (fast); the resume test trains data-parallel over the
8 forced host devices of conftest.
"""

import json
import os
import shutil

import jax

import numpy as np
import pytest

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.joint import JointModel, fit_joint, get_config

MODEL_KEYS = ("flow_width", "flow_depth", "enc_width", "enc_depth", "latent_dim")


def joint_cfg(variant: str, **kw):
    """A joint config with some fields changed (model fields and lr routed to their groups)."""
    cfg = get_config(variant)
    for k, v in kw.items():
        if k in MODEL_KEYS:
            cfg.model[k] = v
        elif k == "lr":
            cfg.optim.lr = v
        else:
            cfg[k] = v
    return cfg

DM, DE, SIGMA = 4, 3, 0.5
SCALE_M = np.array([1.0, 2.0, 0.5, 1.0], np.float32)  # non-unit scales: exercises standardisation
OFFSET_E = np.array([5.0, -3.0, 0.0], np.float32)


def _toy(n, seed):
    rng = np.random.default_rng(seed)
    a = np.random.default_rng(0).normal(size=(DM, DE)).astype(np.float32) * 0.8
    m = rng.normal(size=(n, DM)).astype(np.float32)
    e = m @ a + SIGMA * rng.normal(size=(n, DE)).astype(np.float32)
    return m * SCALE_M, e + OFFSET_E, m, a


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    m, e, _, _ = _toy(4000, seed=1)
    cfg = joint_cfg("quick", steps=800, batch_size=256, flow_width=64, flow_depth=2, enc_width=64,
                    latent_dim=16, lr=2e-3, num_devices=1, log_every=50, progress=False)
    model = fit_joint(m, e, cfg, seed=0, labels=(m[:, 0] > 0).astype(int))
    return model


@pytest.fixture(scope="module")
def heldout():
    m, e, m_raw, a = _toy(300, seed=2)
    return m, e, m_raw, a


def test_training_loss_falls(fitted):
    model = fitted
    h = model.loss_history
    assert h["step"] == list(range(50, 801, 50)) and model.info["devices"] == 1
    for k in ("loss", "fm_expr", "fm_morph", "contrastive"):
        first, last = h[k][0], np.mean(h[k][-2:])
        assert last < first - 0.05, (k, first, last)


def test_conditionals_recover_mean_and_variance_in_both_directions(fitted, heldout):
    model = fitted
    m, e, m_raw, a = heldout
    s = 200
    # p(e | m)
    draws = model.sample_expr_given_morph(m, num_samples=s, seed=0)
    assert draws.shape == (s, 300, DE)
    true_mean = m_raw @ a + OFFSET_E
    mean, var = draws.mean(0), draws.var(0, ddof=1)
    true_r2 = 1 - SIGMA**2 * DE / np.sum(np.var(e, 0))  # population R^2 of E[e|m] (approx., finite sample)
    r2 = 1 - np.sum((e - mean) ** 2) / np.sum((e - e.mean(0)) ** 2)
    assert abs(r2 - true_r2) < 0.06, (r2, true_r2)
    assert np.mean((mean - true_mean) ** 2) < 0.05 * SIGMA**2 * 4  # mean error << conditional spread
    assert abs(var.mean() / SIGMA**2 - 1) < 0.2, var.mean()

    # p(m | e), in standardised-m units then mapped back by the known scales
    cov = np.linalg.inv(np.eye(DM) + a @ a.T / SIGMA**2)
    true_mean_m = ((e - OFFSET_E) @ a.T / SIGMA**2) @ cov * SCALE_M
    draws_m = model.sample_morph_given_expr(e, num_samples=s, seed=1)
    assert draws_m.shape == (s, 300, DM)
    var_m = draws_m.var(0, ddof=1).mean(0)  # per dimension
    true_var_m = np.diag(cov) * SCALE_M**2
    np.testing.assert_allclose(var_m, true_var_m, rtol=0.2)
    err = np.mean((draws_m.mean(0) - true_mean_m) ** 2, 0)
    assert np.all(err < 0.1 * true_var_m), (err, true_var_m)


def test_default_solver_matches_fine_reference(fitted, heldout):
    model = fitted
    m = heldout[0][:100]
    fast = model.sample_expr_given_morph(m, num_samples=4, seed=3)  # midpoint, 8 steps (16 NFE)
    ref = model.sample_expr_given_morph(m, num_samples=4, seed=3, solver="dopri8")  # adaptive, tol 1e-5
    spread = np.sqrt(SIGMA**2)
    assert np.max(np.abs(fast - ref)) < 0.1 * spread
    assert np.sqrt(np.mean((fast - ref) ** 2)) < 0.02 * spread


def test_samples_do_not_depend_on_chunking_and_seed_matters(fitted, heldout):
    model = fitted
    m = heldout[0][:50]
    big = model.sample_expr_given_morph(m, num_samples=3, seed=5)
    small = model.sample_expr_given_morph(m, num_samples=3, seed=5, chunk_rows=12)
    np.testing.assert_allclose(big, small, rtol=1e-5, atol=1e-5)
    sub = model.sample_expr_given_morph(m[:7], num_samples=3, seed=5)  # a cell's draws: (seed, index) only
    np.testing.assert_allclose(sub, big[:, :7], rtol=1e-5, atol=1e-5)
    other = model.sample_expr_given_morph(m, num_samples=3, seed=6)
    assert np.abs(other - big).mean() > 0.1


def test_contrastive_retrieval_beats_chance(fitted, heldout):
    model = fitted
    m, e = heldout[0][:200], heldout[1][:200]
    acc = model.retrieval_accuracy(m, e, k=5)
    assert acc > 10 * 5 / 200, acc  # chance is 2.5 %
    z = model.joint_latent(m, e)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert model.encode_morph(m).shape == (200, 16) and model.encode_expr(e).shape == (200, 16)
    assert 0.0 <= model.info["label_match_top1_train_subset"] <= 1.0


def test_save_load_round_trip_gives_identical_samples(fitted, heldout, tmp_path):
    model = fitted
    m = heldout[0][:40]
    model.save(str(tmp_path / "saved"))
    loaded = JointModel.load(str(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.sample_expr_given_morph(m, 5, seed=9), model.sample_expr_given_morph(m, 5, seed=9))
    np.testing.assert_array_equal(loaded.encode_morph(m), model.encode_morph(m))
    assert loaded.config == model.config and loaded.loss_history == model.loss_history
    for root, _, files in os.walk(tmp_path):  # orbax + JSON only, no pickle
        assert not any(f.endswith((".pkl", ".pickle")) for f in files), root
    with open(tmp_path / "saved" / "joint_model.json") as f:
        assert json.load(f)["dim_expr"] == DE


def test_bad_inputs_raise_clear_errors(fitted, tmp_path):
    model = fitted
    m, e, _, _ = _toy(64, seed=3)
    cfg = joint_cfg("quick", steps=1)
    bad = m.copy()
    bad[[5, 9]] = np.nan
    with pytest.raises(ValueError, match=r"m \(morphology embeddings\): 2 row\(s\) contain NaN/inf \(first rows: \[5, 9\]\)"):
        fit_joint(bad, e, cfg)
    with pytest.raises(ValueError, match="m has 64 cells but e has 63"):
        fit_joint(m, e[:63], cfg)
    with pytest.raises(ValueError, match="too few cells"):
        fit_joint(m[:5], e[:5], cfg)
    with pytest.raises(ValueError, match=r"expected a 2-D .* got shape \(64,\)"):
        fit_joint(m[:, 0], e, cfg)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
        fit_joint(m, e, cfg, labels=[1, 2, 3])
    with pytest.raises(ValueError, match="expected 4 features"):
        model.sample_expr_given_morph(m[:, :3], 2)
    with pytest.raises(ValueError, match="guidance != 1 needs a model trained with cfg_dropout"):
        model.sample_expr_given_morph(m, 2, guidance=2.0)
    with pytest.raises(FileNotFoundError, match="joint_model.json: not found"):
        JointModel.load(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_config(joint_configs, "default", ["--config.stepz=3"])


def test_data_parallel_fit_resumes_exactly_from_checkpoint(tmp_path):
    m, e, _, _ = _toy(256, seed=4)
    cfg = joint_cfg("quick", steps=20, batch_size=64, flow_width=32, flow_depth=1, enc_width=32, enc_depth=1,
                    latent_dim=8, ckpt_every=10, steps_per_call=10, log_every=5, progress=False)
    cfg.optim.warmup_fraction = 0.25
    work = tmp_path / "run"
    full = fit_joint(m, e, cfg, workdir=str(work), seed=1)
    assert full.info["devices"] == 8 and full.info["batch_size"] == 64
    assert sorted(os.listdir(work / "checkpoints")) == ["10", "20"]
    # a crash between the checkpoints: the step-20 checkpoint and the final model never got written
    shutil.rmtree(work / "checkpoints" / "20")
    shutil.rmtree(work / "model")
    resumed = fit_joint(m, e, cfg, workdir=str(work), seed=1)
    assert resumed.loss_history == full.loss_history
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert JointModel.load(str(work / "model")).loss_history == full.loss_history
    assert os.path.exists(work / "metrics.jsonl") and any(f.startswith("events") for f in os.listdir(work / "tb"))
    other = joint_cfg("quick", steps=30)
    with pytest.raises(ValueError, match="different joint config"):
        fit_joint(m, e, other, workdir=str(work))


@pytest.mark.slow
def test_fit_resumes_bit_exactly_after_sigkill(tmp_path):
    """A fit killed by SIGKILL mid-run (no final save) and started again ends with the parameters and
    history of an uninterrupted fit; the run writes TensorBoard events and metrics.jsonl."""
    import subprocess
    import sys

    from cosmic_jax.testing.runs import subprocess_env

    m, e, _, _ = _toy(256, seed=5)
    data = str(tmp_path / "toy.npz")
    np.savez(data, m=m, e=e)
    over = [f"--config.{x}" for x in ("steps=40", "batch_size=64", "model.flow_width=32", "model.flow_depth=1",
                                       "model.enc_width=32", "model.latent_dim=8", "ckpt_every=10",
                                       "steps_per_call=5", "log_every=5", "progress=false")]

    def worker(workdir, kill_at=0):
        cmd = [sys.executable, "-m", "cosmic_jax.testing.joint_worker", data, workdir] + over
        cmd += ["--kill-at", str(kill_at)] if kill_at else []
        return subprocess.run(cmd, env=subprocess_env(8), capture_output=True, text=True, timeout=600)

    full = worker(str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = worker(str(tmp_path / "w"), kill_at=25)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["10", "20"]  # nothing after the kill
    resumed = worker(str(tmp_path / "w"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = JointModel.load(str(tmp_path / "full" / "model")), JointModel.load(str(tmp_path / "w" / "model"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.loss_history == b.loss_history and a.loss_history["step"] == list(range(5, 41, 5))
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "w" / "tb"))


def test_fits_on_subsets_share_one_compile():
    """pad_rows: the folds and half-size fits of a cross-fit share one compile."""
    from cosmic_jax.train import joint as joint_train

    m, e, _, _ = _toy(600, seed=3)
    cfg = joint_cfg("quick", steps=20, batch_size=64, flow_width=32, flow_depth=1, enc_width=32, latent_dim=8,
                    num_devices=1, log_every=10, progress=False)
    fit_joint(m[:400], e[:400], cfg, seed=0, pad_rows=600)
    before = joint_train._compiled.cache_info()
    model = fit_joint(m[:200], e[:200], cfg, seed=0, pad_rows=600)
    after = joint_train._compiled.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1
    assert model.info["n_cells"] == 200 and all(np.isfinite(v).all() for v in model.loss_history.values())
