"""Mesh / sharding rules and the 1-device vs 8-device DP vs 8-device FSDP equivalence of a step."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cosmic_jax.configs import mae, optim as optim_configs
from cosmic_jax.models.mae import model_config, param_logical_specs
from cosmic_jax.train import optim
from cosmic_jax.train import sharding as shd
from cosmic_jax.train.mae import create_train_state, train_step


def _tiny_model_and_optim(microbatch: int):
    model = mae.get_config("vit_test")
    model.depth = 1
    # eps=1e-3: Adam's first update is ~sign(g); a larger eps keeps it smooth in g so float
    # reduction-order noise in near-zero gradients cannot flip it
    oc = optim_configs.get_config(lr=1e-2, warmup_fraction=0.0, eps=1e-3, microbatch=microbatch)
    return model_config(model), optim.resolve(oc, 10)


def test_make_mesh_shapes_and_errors():
    m = shd.make_mesh()
    assert m.axis_names == ("data", "fsdp") and m.devices.shape == (8, 1)
    assert shd.make_mesh(fsdp=4).devices.shape == (2, 4)
    assert shd.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4]).devices.shape == (2, 2)
    with pytest.raises(ValueError, match="fsdp=3"):
        shd.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="!= 8 devices"):
        shd.make_mesh(data=2, fsdp=2)


def test_logical_rules_drive_the_layout():
    """Params carry logical names; the rules map them to mesh axes (a dim the axis does not divide
    stays whole); optimizer leaves get their parameter's layout by tree path."""
    import jax.numpy as jnp

    mesh = shd.make_mesh(fsdp=8)
    params = {"dense": {"kernel": jnp.zeros((64, 128)), "bias": jnp.zeros((128,))},
              "odd": {"kernel": jnp.zeros((12, 64))}, "free": jnp.zeros((5, 5))}
    specs = {"dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")}, "odd": {"kernel": P("embed", "mlp")}}
    state = {"params": params, "opt": ({"mu": params}, jnp.zeros(()))}
    sh = shd.state_shardings(state, mesh, specs)
    assert sh["params"]["dense"]["kernel"].spec == P("fsdp", None)
    assert sh["params"]["dense"]["bias"].spec == P(None)
    assert sh["params"]["odd"]["kernel"].spec == P(None, None)  # 12 is not divisible by 8
    assert sh["params"]["free"].spec == P()  # no logical names: replicated
    assert sh["opt"][0]["mu"]["dense"]["kernel"].spec == P("fsdp", None)
    assert sh["opt"][1].spec == P()
    dp = shd.state_shardings(state, shd.make_mesh(), specs)  # fsdp axis of size 1: data parallel
    assert all(all(a is None for a in s.spec) for s in jax.tree.leaves(dp))


def test_shard_batch_spans_all_devices():
    mesh = shd.make_mesh(fsdp=2)
    b = shd.shard_batch({"image": np.ones((16, 4, 4, 1), np.float32), "index": np.arange(16),
                         "cell_id": np.array(["x"] * 16)}, mesh)
    assert set(b) == {"image", "index"}  # strings are not device data
    assert b["image"].sharding.spec == P(("data", "fsdp"))
    assert len({s.device for s in b["image"].addressable_shards}) == 8
    np.testing.assert_array_equal(np.asarray(b["index"]), np.arange(16))
    with pytest.raises(ValueError, match="not divisible"):
        shd.shard_batch({"image": np.ones((12, 2))}, mesh)


@pytest.fixture(scope="module")
def one_step_results():
    """Run the same MAE step from the same init on 1 device, 8 devices DP and 8 devices FSDP."""
    mc, oc = _tiny_model_and_optim(microbatch=0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 1)).astype(np.float32), "index": np.arange(16)}
    init = functools.partial(create_train_state, mc, oc)
    out = {}
    for name, devices, fsdp in (("single", jax.devices()[:1], 1), ("dp", None, 1), ("fsdp", None, 8)):
        mesh = shd.make_mesh(-1, fsdp, devices)
        state, shardings = shd.create_sharded_state(init, mesh, jax.random.key(0), param_specs=param_logical_specs(mc))
        step = shd.jit_step(train_step, mesh, shardings)
        new, metrics = step(state, shd.shard_batch(batch, mesh), jax.random.key(1))
        out[name] = (new, jax.device_get(metrics))
    return out


def test_dp_and_fsdp_match_single_device(one_step_results):
    ref_state, ref_m = one_step_results["single"]
    ref_params = jax.device_get(ref_state.params)
    for name in ("dp", "fsdp"):
        state, m = one_step_results[name]
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(m["grad_norm"], ref_m["grad_norm"], rtol=1e-4, err_msg=name)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=name),
            jax.device_get(state.params), ref_params,
        )
    # the update is real: params moved away from the init
    init_kernel = ref_params["decoder_pred"]["kernel"]
    assert np.abs(init_kernel).sum() > 0


def test_param_shardings_follow_config(one_step_results):
    dp, _ = one_step_results["dp"]
    fs, _ = one_step_results["fsdp"]
    mlp_dp = dp.params["encoder"]["block_0"]
    # find one 2-D kernel of the encoder MLP without depending on exact sub-module names
    kernels = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(dp.params)[0] if x.ndim == 2]
    assert kernels and mlp_dp
    for path, x in kernels:
        assert x.sharding.spec == P() or all(a is None for a in x.sharding.spec), path
    fs_leaves = dict(jax.tree_util.tree_flatten_with_path(fs.params)[0])
    names = dict(jax.tree_util.tree_flatten_with_path(param_logical_specs(_tiny_model_and_optim(0)[0]),
                                                      is_leaf=lambda x: isinstance(x, P))[0])
    sharded = 0
    for path, x in kernels:
        y = fs_leaves[path]
        embed_dims = [i for i, n in enumerate(names[path]) if n in ("embed", "dec_embed") and x.shape[i] % 8 == 0]
        want = P(*["fsdp" if i == embed_dims[0] else None for i in range(x.ndim)]) if embed_dims else P(None, None)
        assert y.sharding.spec == want, (jax.tree_util.keystr(path), y.sharding.spec, want)
        sharded += bool(embed_dims)
        if embed_dims:  # each device holds 1/8 of a sharded kernel
            assert y.addressable_shards[0].data.size * 8 == y.size
    assert sharded >= 4
    # optimizer moments are sharded like their params
    mu = [x for x in jax.tree.leaves(fs.opt_state) if getattr(x, "ndim", 0) == 2]
    assert sum(x.sharding.spec != P(None, None) for x in mu) >= 2 * sharded


def test_microbatch_chunks_keep_the_batch_sharding():
    """A microbatched step under 8-device DP equals the 1-device one and moves no batch data.

    Chunks are strided rows, so each device's shard splits locally into its part of every chunk:
    the compiled step must hold no all-to-all / all-gather / collective-permute (only the gradient
    and loss reductions).
    """
    mc, oc = _tiny_model_and_optim(microbatch=8)  # 32 images: 4 chunks, 1 row per device
    batch = {"image": np.random.default_rng(1).normal(size=(32, 32, 32, 1)).astype(np.float32)}
    init = functools.partial(create_train_state, mc, oc)
    losses, texts = {}, {}
    for name, devices in (("single", jax.devices()[:1]), ("dp", None)):
        mesh = shd.make_mesh(-1, 1, devices)
        state, shardings = shd.create_sharded_state(init, mesh, jax.random.key(0), param_specs=param_logical_specs(mc))
        step = shd.jit_step(train_step, mesh, shardings)
        sharded = shd.shard_batch(batch, mesh)
        texts[name] = step.lower(state, sharded, jax.random.key(1)).compile().as_text()
        losses[name] = float(step(state, sharded, jax.random.key(1))[1]["loss"])
    assert losses["dp"] == pytest.approx(losses["single"], rel=1e-5)
    for op in ("all-to-all", "all-gather", "collective-permute"):
        assert op not in texts["dp"], op
    assert "all-reduce" in texts["dp"] or "reduce-scatter" in texts["dp"]
