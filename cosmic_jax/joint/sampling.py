"""ODE sampling of a flow: fixed-step Runge-Kutta (default) and diffrax adaptive (reference).

Default: explicit midpoint (RK2) with 6 steps on the grid t_i = (i/6)^0.7 = 12 velocity
evaluations (NFE). Why: a flow-matching velocity field on the linear path is smooth in t but not
constant (it bends where the conditional is narrow or multi-modal, i.e. near t = 1), so Euler's
O(dt) error needs ~50-100 steps, while a 2nd-order scheme reaches the error of the network itself
at 6-8 steps; steps that shrink towards t = 1 give the accuracy of 8 uniform steps with 6
(notes/joint.md has the measured error vs NFE of each scheme and grid against a tight Dopri8 solve). All cells share the time grid, so the time embedding is computed once per stage for
the whole batch and the condition embedding once per solve: an NFE costs only the trunk.

Why the fixed-step loop is hand-written and not diffrax's Euler/Midpoint/Heun with
``StepTo(ts=grid)`` (the same numbers: tests/test_flow.py): measured side by side on the
sampler's 1,024-row chunks, diffrax took 1-9 % more CPU (one chunk: +6 %) with the
``analysis``-size flow (within noise with the ``bench``-size one) and about twice the compile time,
which every fitted model pays (experiments/bench_sampling.py, notes/experiments.md). diffrax runs
the RK stages of each step in an inner while loop with stage buffers; this loop is straight-line
code per step.

diffrax (Tsit5 / Dopri5 / Dopri8 with a PID controller) integrates the whole batch as one ODE state
with a max-norm error, i.e. every cell is held to the tolerance; it is the reference, not the default
(~100-1500 NFE).
"""

from __future__ import annotations

from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # (x (B, D), t scalar) -> (B, D)

FIXED_METHODS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # NFE per step
ADAPTIVE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}


def nfe_per_solve(method: str, steps: int) -> int:
    """Velocity evaluations of one fixed-step solve (adaptive methods: unknown, returns -1)."""
    return FIXED_METHODS[method] * steps if method in FIXED_METHODS else -1


def time_grid(num_steps: int, power: float = 1.0, t0: float = 0.0, t1: float = 1.0) -> Array:
    """Step boundaries t0 + (t1 - t0) (i / n)^power, i = 0..n: power < 1 takes smaller steps near t1.

    Why: on the linear path the velocity bends most near t = 1, where each sample settles into its
    (narrow) conditional; the large early steps are cheap because v is nearly constant there.
    """
    if num_steps <= 0 or power <= 0:
        raise ValueError(f"time_grid needs num_steps > 0 and power > 0, got {num_steps}, {power}")
    u = jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
    return t0 + (t1 - t0) * u**power


def fixed_step_solve(vel: VelocityFn, x0: Array, num_steps: int, method: str = "midpoint",
                     t0: float = 0.0, t1: float = 1.0, time_power: float = 1.0) -> Array:
    """Integrate dx/dt = vel(x, t) from t0 to t1 on the grid `time_grid(num_steps, time_power)`.

    Args:
      vel: velocity function of (x (B, D), scalar t).
      x0: (B, D) start points.
      num_steps: number of steps.
      method: euler | midpoint | heun | rk4.
      time_power: 1 = uniform steps; < 1 = finer near t1 (see `time_grid`).
    Returns:
      (B, D) end points.
    """
    if method not in FIXED_METHODS:
        raise ValueError(f"unknown fixed-step method {method!r}; choose from {sorted(FIXED_METHODS)}")
    grid = time_grid(num_steps, time_power, t0, t1)

    def step(i, x):
        t = grid[i]
        dt = grid[i + 1] - t
        if method == "euler":
            return x + dt * vel(x, t)
        if method == "midpoint":
            return x + dt * vel(x + 0.5 * dt * vel(x, t), t + 0.5 * dt)
        if method == "heun":
            k1 = vel(x, t)
            k2 = vel(x + dt * k1, t + dt)
            return x + 0.5 * dt * (k1 + k2)
        k1 = vel(x, t)
        k2 = vel(x + 0.5 * dt * k1, t + 0.5 * dt)
        k3 = vel(x + 0.5 * dt * k2, t + 0.5 * dt)
        k4 = vel(x + dt * k3, t + dt)
        return x + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)

    return jax.lax.fori_loop(0, num_steps, step, x0)


def diffrax_solve(vel: VelocityFn, x0: Array, method: str = "tsit5", rtol: float = 1e-5,
                  atol: float = 1e-5, max_steps: int = 10_000) -> tuple[Array, Array]:
    """Adaptive solve with diffrax, the batch as one state held to a max-norm tolerance.

    Args:
      vel: velocity function of (x (B, D), scalar t).
      x0: (B, D).
      method: tsit5 | dopri5 | dopri8.
    Returns:
      (x1 (B, D), number of accepted steps (scalar int)).
    """
    if method not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {sorted(FIXED_METHODS) + sorted(ADAPTIVE_SOLVERS)}")
    term = diffrax.ODETerm(lambda t, y, args: vel(y, t))
    ctrl = diffrax.PIDController(rtol=rtol, atol=atol, norm=lambda y: jnp.max(jnp.abs(y)))
    sol = diffrax.diffeqsolve(term, ADAPTIVE_SOLVERS[method](), t0=0.0, t1=1.0, dt0=None, y0=x0,
                              stepsize_controller=ctrl, max_steps=max_steps,
                              saveat=diffrax.SaveAt(t1=True))
    return sol.ys[-1], sol.stats["num_accepted_steps"]


def flow_velocity_fn(module: Any, params: Any, cond: Array, guidance: float = 1.0, repeats: int = 1) -> VelocityFn:
    """Velocity closure for a `VelocityMLP` with the condition embedding precomputed.

    Args:
      module: a `VelocityMLP` (its embed_condition / embed_time / trunk methods are used).
      params: its variables ({"params": ...}).
      cond: (C, Dc) per-row conditions.
      guidance: classifier-free guidance weight w: v = v_null + w (v_cond - v_null); 1 = plain.
      repeats: x holds `repeats` draws per condition, sample-major (B = repeats * C rows: row
        r * C + i is draw r of condition i); the condition is embedded once, not once per draw.
    Returns:
      vel(x, t) -> (B, D).
    """
    c_emb = module.apply(params, cond, method=module.embed_condition)
    if repeats > 1:
        c_emb = jnp.tile(c_emb, (repeats, 1))
    if guidance != 1.0:
        n_emb = module.apply(params, c_emb.shape[0], method=module.null_condition)

    def vel(x, t):
        t_emb = module.apply(params, jnp.asarray(t, jnp.float32), method=module.embed_time)
        v = module.apply(params, x, t_emb, c_emb, method=module.trunk)
        if guidance != 1.0:
            v_null = module.apply(params, x, t_emb, n_emb, method=module.trunk)
            v = v_null + guidance * (v - v_null)
        return v

    return vel


def solve_flow(module: Any, params: Any, cond: Array, x0: Array, *, method: str = "midpoint",
               steps: int = 6, time_power: float = 0.7, guidance: float = 1.0, repeats: int = 1,
               rtol: float = 1e-5, atol: float = 1e-5) -> Array:
    """Push noise x0 (B, D) through the conditional flow given cond (C, Dc), B = repeats * C. Pure; jit it.

    Returns:
      (B, D) samples (adaptive methods use rtol/atol, fixed methods `steps` and `time_power`).
    """
    vel = flow_velocity_fn(module, params, cond, guidance, repeats)
    if method in FIXED_METHODS:
        return fixed_step_solve(vel, x0, steps, method, time_power=time_power)
    return diffrax_solve(vel, x0, method, rtol=rtol, atol=atol)[0]
