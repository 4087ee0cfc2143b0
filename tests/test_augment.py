"""On-device augmentation: exact dihedral symmetries, bounded jitter, keys from (seed, step) only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmic_jax.data.augment import AugmentConfig, augment_batch
from cosmic_jax.train.mae import augment_key, create_train_state, train_step

IMG = np.random.default_rng(0).random((8, 8, 2), dtype=np.float32)  # no symmetry of its own


def dihedral(img):
    """The 8 symmetries as numpy writes them: {(k, mirrored): np.rot90(img, k) [then mirrored]}."""
    return {(k, m): (np.rot90(img, k, axes=(0, 1))[:, ::-1] if m else np.rot90(img, k, axes=(0, 1)))
            for k in range(4) for m in (False, True)}


def which(out, img):
    hits = [g for g, t in dihedral(img).items() if np.array_equal(out, t)]
    assert len(hits) == 1, "output is not exactly one rot90/flip of its input"
    return hits[0]


AUG = jax.jit(augment_batch, static_argnums=2)


@pytest.mark.parametrize("rot90,flip,group", [
    (True, True, {(k, m) for k in range(4) for m in (False, True)}),
    (True, False, {(k, False) for k in range(4)}),
    (False, True, {(0, False), (0, True)}),
])
def test_outputs_are_exact_dihedral_transforms(rot90, flip, group):
    cfg = AugmentConfig(rot90=rot90, flip=flip, intensity_jitter=0.0)
    out = np.asarray(AUG(jnp.asarray(np.repeat(IMG[None], 400, 0)), jax.random.key(1), cfg))
    used = [which(o, IMG) for o in out]
    assert set(used) == group
    counts = np.array([used.count(g) for g in group])
    assert counts.min() > 0.5 * 400 / len(group)  # roughly uniform over the group


def test_intensity_jitter_and_shift_per_channel():
    x = jnp.asarray(np.repeat(IMG[None], 300, 0))
    out = np.asarray(AUG(x, jax.random.key(2), AugmentConfig(rot90=False, flip=False, intensity_jitter=0.1)))
    ratio = out / IMG
    factor = ratio[:, :1, :1, :]  # (300, 1, 1, 2): one factor per crop and channel ...
    np.testing.assert_allclose(ratio, np.broadcast_to(factor, ratio.shape), rtol=1e-5)
    assert factor.min() >= 0.9 - 1e-6 and factor.max() <= 1.1 + 1e-6 and np.ptp(factor) > 0.15
    assert not np.allclose(factor[..., 0], factor[..., 1])  # ... drawn per channel
    shared = np.asarray(AUG(x, jax.random.key(2), AugmentConfig(rot90=False, flip=False, per_channel=False)))
    f = shared / IMG
    np.testing.assert_allclose(f[..., 0], f[..., 1], rtol=1e-5)
    shifted = np.asarray(AUG(x, jax.random.key(3), AugmentConfig(rot90=False, flip=False, intensity_jitter=0.0,
                                                                 intensity_shift=0.5)))
    d = shifted - IMG
    np.testing.assert_allclose(d, np.broadcast_to(d[:, :1, :1, :], d.shape), atol=1e-6)
    assert np.abs(d).max() <= 0.5 and np.ptp(d) > 0.8
    np.testing.assert_array_equal(AUG(x, jax.random.key(2), AugmentConfig(enabled=False)), x)


def test_keys_depend_only_on_seed_and_step_and_not_on_sharding():
    from cosmic_jax.train import sharding as shd

    x = jnp.asarray(np.random.default_rng(1).random((16, 8, 8, 1), dtype=np.float32))
    cfg = AugmentConfig(intensity_shift=0.1)
    base = jax.random.key(7)
    a = AUG(x, augment_key(base, 5), cfg)
    np.testing.assert_array_equal(a, AUG(x, augment_key(jax.random.key(7), jnp.int32(5)), cfg))
    assert not np.array_equal(a, AUG(x, augment_key(base, 6), cfg))
    assert not np.array_equal(a, AUG(x, augment_key(jax.random.key(8), 5), cfg))
    mesh = shd.make_mesh(-1, 1)  # the batch split over the 8 test devices
    sharded = jax.jit(augment_batch, static_argnums=2, out_shardings=shd.batch_sharding(mesh))(
        shd.shard_batch({"image": np.asarray(x)}, mesh)["image"], augment_key(base, 5), cfg)
    np.testing.assert_array_equal(np.asarray(sharded), a)


def test_train_step_augments_with_the_step_key():
    from cosmic_jax.configs import mae as mae_configs
    from cosmic_jax.configs import optim as optim_configs
    from cosmic_jax.configs import pretrain as pretrain_configs
    from cosmic_jax.configs.overrides import frozen
    from cosmic_jax.models.mae import model_config
    from cosmic_jax.train.optim import resolve

    mc = mae_configs.get_config("vit_test")
    mc.update(depth=1, image_size=16)
    aug_cfg = pretrain_configs.augment_config()  # the run config's form of the settings
    aug_cfg.intensity_shift = 0.05
    cfg = frozen(aug_cfg)
    state = create_train_state(model_config(mc), resolve(optim_configs.get_config(lr=1e-3), 10), jax.random.key(0))
    state = state.replace(step=jnp.int32(3))
    x = jnp.asarray(np.random.default_rng(2).random((4, 16, 16, 1), dtype=np.float32))
    rng = jax.random.key(1)
    plain = jax.jit(train_step)
    aug = jax.jit(functools.partial(train_step, augment=cfg))
    _, m = aug(state, {"image": x}, rng)
    # The augmented step is the plain step on augment_batch(x, augment_key(rng, state.step)) ...
    _, want = plain(state, {"image": AUG(x, augment_key(rng, 3), cfg)}, rng)
    assert float(m["loss"]) == float(want["loss"])
    # ... and not the plain step on x.
    _, raw = plain(state, {"image": x}, rng)
    assert float(m["loss"]) != float(raw["loss"])


def test_train_step_decodes_stored_crops_on_the_device():
    """A batch as stored (uint16 + per-crop scale / offset) trains like its float32 values."""
    from cosmic_jax.configs import mae as mae_configs
    from cosmic_jax.configs import optim as optim_configs
    from cosmic_jax.models.mae import model_config
    from cosmic_jax.train.optim import resolve

    mc = mae_configs.get_config("vit_test")
    mc.update(depth=1, image_size=16)
    state = create_train_state(model_config(mc), resolve(optim_configs.get_config(lr=1e-3), 10), jax.random.key(0))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 65535, (4, 16, 16, 1)).astype(np.uint16)
    scale, offset = rng.uniform(1e-5, 2e-5, (4, 1)).astype(np.float32), rng.uniform(0, 0.1, (4, 1)).astype(np.float32)
    step = jax.jit(train_step)
    _, stored = step(state, {"pixels": pixels, "scale": scale, "offset": offset}, jax.random.key(1))
    _, values = step(state, {"image": pixels * scale[:, None, None] + offset[:, None, None]}, jax.random.key(1))
    assert float(stored["loss"]) == pytest.approx(float(values["loss"]), rel=1e-5)
    assert float(stored["loss"]) != pytest.approx(float(step(state, {"pixels": pixels}, jax.random.key(1))[1]["loss"]))
    with pytest.raises(KeyError, match="neither 'image' nor 'pixels'"):
        step(state, {"index": np.arange(4)}, jax.random.key(1))


def test_non_square_crops_refused_for_rot90():
    with pytest.raises(ValueError, match=r"rot90 augmentation needs square crops, got shape \(4, 6, 1\)"):
        augment_batch(jnp.zeros((2, 4, 6, 1)), jax.random.key(0), AugmentConfig())
    out = augment_batch(jnp.ones((2, 4, 6, 1)), jax.random.key(0), AugmentConfig(rot90=False))
    assert out.shape == (2, 4, 6, 1)
