"""Flow matching pieces: the regression target, the velocity net's split, OT coupling, ODE solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cosmic_jax.models.flow import (
    VelocityMLP,
    flow_matching_loss,
    linear_path,
    ot_coupling_index,
    sample_path,
)
from cosmic_jax.joint.sampling import diffrax_solve, fixed_step_solve, nfe_per_solve


def test_target_velocity_is_exactly_x1_minus_x0():
    """Pins the regression target: a flow trained on e.g. x0 - x1 or x_t-dependent targets runs silently."""
    k0, k1, kt = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k0, (64, 5))
    x1 = 3.0 + jax.random.normal(k1, (64, 5))
    t = jax.random.uniform(kt, (64,))
    xt, u = linear_path(x0, x1, t)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(x1 - x0))
    np.testing.assert_allclose(np.asarray(xt), np.asarray((1 - t)[:, None] * x0 + t[:, None] * x1), rtol=1e-6)
    xt0, _ = linear_path(x0, x1, jnp.zeros(64))
    xt1, _ = linear_path(x0, x1, jnp.ones(64))
    np.testing.assert_array_equal(np.asarray(xt0), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(xt1), np.asarray(x1))

    # the sampled path used by the loss has the same target, with x0 ~ N(0, I)
    path = sample_path(jax.random.key(1), x1)
    np.testing.assert_array_equal(np.asarray(path["u"]), np.asarray(x1 - path["x0"]))
    assert abs(float(path["x0"].mean())) < 0.2 and abs(float(path["x0"].std()) - 1) < 0.15


def test_loss_regresses_onto_x1_minus_x0():
    x1 = jnp.full((256, 3), 2.0)  # a Dirac target: the true velocity is (x1 - x_t) / (1 - t) = x1 - x0
    cond = jnp.zeros((256, 1))
    key = jax.random.key(3)
    oracle = lambda p, xt, t, c, nm: (x1 - xt) / (1.0 - t)[:, None]  # noqa: E731
    assert float(flow_matching_loss(None, oracle, x1, cond, key)) < 1e-8
    flipped = lambda p, xt, t, c, nm: -oracle(p, xt, t, c, nm)  # noqa: E731
    assert float(flow_matching_loss(None, flipped, x1, cond, key)) > 1.0
    # the loss is the plain per-dimension MSE against x1 - x0 of the path drawn from the same key
    kp, _ = jax.random.split(key)
    path = sample_path(kp, x1, cond)
    pred = lambda p, xt, t, c, nm: xt  # noqa: E731
    want = float(jnp.mean((path["xt"] - (x1 - path["x0"])) ** 2))
    np.testing.assert_allclose(float(flow_matching_loss(None, pred, x1, cond, key)), want, rtol=1e-6)


def test_velocity_mlp_split_matches_call_and_starts_at_zero():
    net = VelocityMLP(out_dim=4, width=32, depth=2, time_embed_dim=16, use_null=True)
    x, c = jnp.ones((6, 4)), jnp.arange(18.0).reshape(6, 3) / 10
    t = jnp.full((6,), 0.3)
    mask = jnp.array([True, False, True, False, False, False])

    @jax.jit  # one compile instead of one per eager op
    def run(key):
        params = net.init(key, x, t, c)
        at_init = net.apply(params, x, t, c)
        params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
        full = net.apply(params, x, t, c)
        t_emb = net.apply(params, jnp.float32(0.3), method=net.embed_time)  # (1, W) shared time
        c_emb = net.apply(params, c, method=net.embed_condition)
        split = net.apply(params, x, t_emb, c_emb, method=net.trunk)
        dropped = net.apply(params, x, t, c, mask)
        null = net.apply(params, x, t_emb, net.apply(params, 6, method=net.null_condition), method=net.trunk)
        return at_init, full, split, dropped, null

    at_init, full, split, dropped, null = map(np.asarray, run(jax.random.key(0)))
    assert np.abs(at_init).max() == 0.0  # zero-init head: the flow starts as the identity map
    np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-6)
    # condition dropout swaps in the learned null embedding for the masked rows only
    np.testing.assert_allclose(dropped[1], full[1], rtol=1e-6)
    assert not np.allclose(dropped[0], full[0])
    np.testing.assert_allclose(dropped[0], null[0], rtol=1e-5, atol=1e-6)


def test_ot_coupling_reassigns_noise_only_and_respects_conditions():
    k0, k1 = jax.random.split(jax.random.key(0))
    b = 128
    x0 = jax.random.normal(k0, (b, 2))
    x1 = 1.0 + 0.5 * jax.random.normal(k1, (b, 2))
    cond = jnp.repeat(jnp.array([[0.0], [1.0]]), b // 2, axis=0)  # two condition groups
    couple = jax.jit(lambda k, w: ot_coupling_index(k, x0, x1, cond, epsilon=0.01, cond_weight=w))
    # weight 0 = plain x-space OT: cheaper transport than the independent coupling
    idx = couple(jax.random.key(2), 0.0)
    cost_ind = float(jnp.mean(jnp.sum((x0 - x1) ** 2, -1)))
    cost_ot = float(jnp.mean(jnp.sum((x0[idx] - x1) ** 2, -1)))
    assert cost_ot < 0.8 * cost_ind, (cost_ot, cost_ind)
    # conditional OT: noise is only drawn from source rows of the target's own condition group
    idx = np.asarray(couple(jax.random.key(3), 50.0))
    assert np.mean(np.asarray(cond)[idx, 0] == np.asarray(cond)[:, 0]) > 0.99
    assert len(set(idx.tolist())) > b // 4  # a resampling of noise rows, not a collapse onto a few
    # the training path keeps the given (x1, cond) rows: u + x0 reproduces x1 row by row
    path = jax.jit(lambda k: sample_path(k, x1, cond, ot=True, ot_epsilon=0.01))(jax.random.key(4))
    np.testing.assert_allclose(np.asarray(path["u"] + path["x0"]), np.asarray(x1), rtol=1e-6, atol=1e-6)


def _gaussian_velocity(mu, s):
    """Exact marginal velocity of the linear path from N(0, I) to N(mu, s^2 I): maps x0 -> mu + s x0."""

    def vel(x, t):
        var = (1 - t) ** 2 + (t * s) ** 2
        dlog = (-(1 - t) + t * s * s) / var
        return mu + dlog * (x - t * mu)

    return vel


@pytest.mark.parametrize("method,steps,tol", [("euler", 8, None), ("midpoint", 8, 2e-3), ("rk4", 4, 5e-3)])
def test_fixed_step_solvers_on_exact_flow(method, steps, tol):
    mu, s = jnp.array([1.0, -2.0, 0.5]), 0.3
    x0 = jax.random.normal(jax.random.key(0), (500, 3))
    exact = mu + s * x0
    vel = _gaussian_velocity(mu, s)
    err = float(jnp.max(jnp.abs(jax.jit(lambda x: fixed_step_solve(vel, x, steps, method))(x0) - exact)))
    err_ref = float(jnp.max(jnp.abs(diffrax_solve(vel, x0, "dopri8", rtol=1e-9, atol=1e-9)[0] - exact)))
    assert err_ref < 1e-5
    if tol is None:  # Euler at 8 steps is visibly worse: the reason it is not the default
        assert err > 0.02
    else:
        assert err < tol
    assert nfe_per_solve(method, steps) == {"euler": 8, "midpoint": 16, "rk4": 16}[method]


def test_time_grid_finer_near_t1_beats_uniform_on_narrow_target():
    """The default grid (i/n)^0.7 spends steps where the path bends: near t=1 for a narrow target."""
    from cosmic_jax.joint.sampling import time_grid

    grid = np.asarray(time_grid(6, 0.7))
    assert grid[0] == 0.0 and grid[-1] == 1.0 and np.all(np.diff(np.diff(grid)) < 0)
    mu, s = jnp.array([1.0, -2.0, 0.5]), 0.1
    x0 = jax.random.normal(jax.random.key(0), (500, 3))
    vel = _gaussian_velocity(mu, s)
    err = {p: float(jnp.max(jnp.abs(fixed_step_solve(vel, x0, 6, "midpoint", time_power=p) - (mu + s * x0))))
           for p in (1.0, 0.7)}
    assert err[0.7] < 0.5 * err[1.0] and err[0.7] < 0.012, err
    with pytest.raises(ValueError, match="power"):
        time_grid(6, 0.0)


@pytest.mark.parametrize("method,solver", [("euler", "Euler"), ("midpoint", "Midpoint"), ("heun", "Heun")])
def test_fixed_step_solver_is_diffrax_scheme_on_the_grid(method, solver):
    """The hand-written loop (kept for speed, notes/experiments.md) is the textbook scheme: it matches
    diffrax's solver stepping to the same grid points to float32 round-off, non-uniform grid included."""
    import diffrax

    from cosmic_jax.joint.sampling import time_grid

    mu, s = jnp.array([1.0, -2.0, 0.5]), 0.1
    x0 = jax.random.normal(jax.random.key(4), (200, 3))
    vel = _gaussian_velocity(mu, s)

    @jax.jit
    def both(x):
        ref = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: vel(y, t)), getattr(diffrax, solver)(), t0=0.0,
                                  t1=1.0, dt0=None, y0=x, stepsize_controller=diffrax.StepTo(ts=time_grid(5, 0.7)),
                                  saveat=diffrax.SaveAt(t1=True), max_steps=5).ys[0]
        return fixed_step_solve(vel, x, 5, method, time_power=0.7), ref

    ours, ref = map(np.asarray, both(x0))
    assert np.abs(ours - x0).max() > 0.5  # the flow moved the points
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
