"""Flow-matching benchmark: cosmic_jax p(e | m) vs the CellFlow peer (../shared/bench/peer_cellflow_fm.py).

Same problem and protocol as the peer: a 64-d target e generated from N(0, I) noise conditioned on the
cell's own 64-d m; m ~ N(0, I), e = tanh(m W) + 0.3 noise; batch 1024; float32; XLA CPU defaults;
3 warm-up steps (the first holds the compile) then timed steps, each ended by block_until_ready.
Network: `VelocityMLP` sized like CellFlow's mlp3x256 (0.92M params): width 256, 3 residual trunk
blocks, a 6-layer condition encoder, 256 sinusoidal time features (0.907M; the ``bench`` joint config).

Parts (``--parts``, comma list):
  train    jitted loss + grad + Adam step (params/opt donated), one step per call ("step") and
           10 steps per call in a lax.scan ("scan10"); median / min / max cells/s.
  vf_eval  one velocity evaluation on 10,000 cells with per-cell t and m (= CellFlow's vf_eval), and
           the trunk only (what one NFE of our sampler costs: time/condition embeddings are hoisted).
  sample   trains the net for --train-steps, then samples 100,000 cells through the public
           `JointModel.sample_expr_given_morph` with the default solver (midpoint, 6 steps on the
           grid (i/6)^0.7, 12 NFE),
           and compares solvers on 2,000 cells against a Dopri8 solve at rtol = atol = 1e-7.
Every timed region records the CPU used by other processes (machine busy - this process) per second.

    python experiments/bench_fm.py --json notes/bench_fm.jsonl
    python experiments/bench_fm.py --parts train --config.model.compute_dtype=bfloat16
    python experiments/bench_fm.py --tiny          # smoke: small sizes, ~1 min

The network, batch and learning rate are the ``bench`` joint config's (``configs/joint.py``);
``--config.KEY=VALUE`` overrides them (``model.flow_width``, ``model.flow_depth``, ``model.cond_depth``,
``model.time_embed_dim``, ``model.compute_dtype``, ``batch_size``, ``optim.lr``).

The peer side runs in its own venv (``bash ../shared/bench/run_fm.sh``, or ``experiments/final_bench.sh``
which alternates both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.joint import JointModel
from cosmic_jax.joint.sampling import diffrax_solve, fixed_step_solve, flow_velocity_fn, nfe_per_solve
from cosmic_jax.models.flow import flow_matching_loss
from cosmic_jax.models.joint import build_nets, init_params
from cosmic_jax.testing.toys import TanhToy

D = 64


def _busy_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4]


class Probe:
    """CPU used outside this process during a timed region, in cores (0 = we had the machine)."""

    def __enter__(self):
        self.w, self.m, self.own = time.perf_counter(), _busy_ticks(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w
        hz = os.sysconf("SC_CLK_TCK")
        other = (_busy_ticks() - self.m) / hz - (sum(os.times()[:2]) - self.own)
        self.other_cores = max(0.0, other) / self.wall


def make_data(n, seed=0):
    return TanhToy(D, 0.3, seed).draw(n)


def build(cfg):
    """The p(e | m) velocity net of joint config ``cfg``, its init, Adam, and jitted train steps."""
    net = build_nets(cfg.model, D, D).flow_e
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((2, D)), jnp.zeros(2), jnp.zeros((2, D)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = optax.adam(cfg.optim.lr)

    def step(state, m, e, key):
        params, opt = state
        loss, g = jax.value_and_grad(flow_matching_loss)(params, net.apply, e, m, key)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    def scan_steps(state, ms, es, key):  # ms, es: (K, B, D)
        def body(st, xs):
            i, mb, eb = xs
            return step(st, mb, eb, jax.random.fold_in(key, i))

        return jax.lax.scan(body, state, (jnp.arange(ms.shape[0]), ms, es))

    return net, params, n_params, tx, jax.jit(step, donate_argnums=(0,)), jax.jit(scan_steps, donate_argnums=(0,))


def bench_train(args, cfg, out):
    batch = cfg.batch_size
    net, params, n_params, tx, step, scan10 = build(cfg)
    m, e = make_data(4 * batch)
    batches = [(jax.device_put(m[i::4]), jax.device_put(e[i::4])) for i in range(4)]  # 4 batches cycled
    state = (params, tx.init(params))
    key = jax.random.key(1)
    times, others = [], []
    t0 = time.perf_counter()
    for i in range(args.warmup + args.steps):
        mb, eb = batches[i % 4]
        with Probe() as p:
            state, loss = step(state, mb, eb, jax.random.fold_in(key, i))
            jax.block_until_ready((state, loss))
        if i == 0:
            first = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(p.wall)
            others.append(p.other_cores)
    rec = dict(part="train", mode="step", n_params=n_params, first_step_s=first, **_rates(times, batch, others))
    out(rec)
    ms = np.stack([b[0] for b in batches] * 3)[:10]
    es = np.stack([b[1] for b in batches] * 3)[:10]
    ms, es = jax.device_put(ms), jax.device_put(es)
    times, others = [], []
    for i in range(2 + max(3, args.steps // 5)):
        with Probe() as p:
            state, losses = scan10(state, ms, es, jax.random.fold_in(key, 1000 + i))
            jax.block_until_ready((state, losses))
        if i >= 2:
            times.append(p.wall / 10)
            others.append(p.other_cores)
    out(dict(part="train", mode="scan10", n_params=n_params, **_rates(times, batch, others)))


def _rates(times, cells, others):
    rates = [cells / t for t in times]
    return dict(ms_median=1e3 * statistics.median(times), cells_s_median=statistics.median(rates),
                cells_s_min=min(rates), cells_s_max=max(rates), n_timed=len(times),
                other_cores_mean=float(np.mean(others)))


def bench_vf_eval(args, cfg, out):
    net, params, *_ = build(cfg)
    n = args.vf_cells
    rng = np.random.default_rng(0)
    x, c = jnp.asarray(rng.normal(size=(n, D)), jnp.float32), jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=n), jnp.float32)
    full = jax.jit(net.apply)
    c_emb = jax.jit(lambda p, c: net.apply(p, c, method=net.embed_condition))(params, c)
    t_emb = jax.jit(lambda p: net.apply(p, jnp.float32(0.5), method=net.embed_time))(params)
    trunk = jax.jit(lambda p, x, te, ce: net.apply(p, x, te, ce, method=net.trunk))
    for name, fn, a in [("full_percell_t", full, (params, x, t, c)), ("trunk_only", trunk, (params, x, t_emb, c_emb))]:
        jax.block_until_ready(fn(*a))
        times, others = [], []
        for _ in range(args.vf_reps):
            with Probe() as p:
                jax.block_until_ready(fn(*a))
            times.append(p.wall)
            others.append(p.other_cores)
        out(dict(part="vf_eval", mode=name, cells=n, s_median=statistics.median(times), s_min=min(times),
                 other_cores_mean=float(np.mean(others))))


def bench_sample(args, cfg, out):
    batch = cfg.batch_size
    net, params, n_params, tx, step, scan10 = build(cfg)
    m, e = make_data(50_000, seed=1)
    state = (params, tx.init(params))
    key = jax.random.key(2)
    rng = np.random.default_rng(3)
    t0 = time.perf_counter()
    losses = []
    for i in range(args.train_steps // 10):
        idx = rng.integers(0, len(m), size=(10, batch))
        state, loss = scan10(state, jnp.asarray(m[idx]), jnp.asarray(e[idx]), jax.random.fold_in(key, i))
        losses.append(float(loss.mean()))
    params = state[0]
    out(dict(part="sample", mode="train_for_sampling", steps=args.train_steps, seconds=time.perf_counter() - t0,
             loss_first=losses[0], loss_last=float(np.mean(losses[-5:]))))

    # the public sampler: a JointModel whose p(e|m) flow is the trained net (identity standardisation)
    cfg = cfg.copy_and_resolve_references()
    mcfg = cfg.model
    mcfg.update(dict(latent_dim=8, enc_width=16, enc_depth=1))  # encoders unused here: keep them tiny
    nets = build_nets(mcfg, D, D)
    full = jax.device_get(init_params(nets, mcfg, D, D, jax.random.key(0)))
    full["flow_e"] = jax.device_get(params)
    ident = {"mean": np.zeros(D, np.float32), "std": np.ones(D, np.float32)}
    model = JointModel(cfg, full, {"m": ident, "e": ident})
    s = cfg.sampling
    m_test, e_test = make_data(args.sample_cells, seed=4)
    model.sample_expr_given_morph(m_test, 1, seed=0)  # compile
    times, others = [], []
    for r in range(args.sample_reps):
        with Probe() as p:
            model.sample_expr_given_morph(m_test, 1, seed=r)
        times.append(p.wall)
        others.append(p.other_cores)
    out(dict(part="sample", mode=f"{s.solver}{s.steps}_p{s.time_power}", cells=args.sample_cells,
             nfe=nfe_per_solve(s.solver, s.steps), s_median=statistics.median(times), s_min=min(times),
             s_max=max(times), cells_s_median=args.sample_cells / statistics.median(times),
             other_cores_mean=float(np.mean(others))))

    # solver accuracy against a tight Dopri8 solve (same noise for all solvers)
    nc = min(2000, args.sample_cells)
    cond = jnp.asarray(m_test[:nc])
    x0 = jax.random.normal(jax.random.key(7), (nc, D))
    vel = flow_velocity_fn(net, params, cond)
    ref, n_ref = jax.jit(lambda x: diffrax_solve(vel, x, "dopri8", rtol=1e-7, atol=1e-7))(x0)
    _, n_tsit = jax.jit(lambda x: diffrax_solve(vel, x, "tsit5", rtol=1e-5, atol=1e-5))(x0)
    spread = float(np.sqrt(np.mean(np.var(np.asarray(ref), 0))))  # marginal std of the samples
    out(dict(part="solver_ref", mode="dopri8_1e-7", cells=nc, accepted_steps=int(n_ref),
             tsit5_tol1e5_steps=int(n_tsit), sample_std=spread))
    # (method, steps, grid power): power 1 = uniform; the shipped default is midpoint 6 at power 0.7
    for meth, steps, power in [("euler", 16, 1.0), ("euler", 32, 1.0), ("midpoint", 4, 1.0), ("midpoint", 4, 0.7),
                               ("midpoint", 5, 0.7), ("midpoint", 6, 1.0), ("midpoint", 6, 0.7),
                               ("midpoint", 8, 1.0), ("midpoint", 8, 0.7), ("midpoint", 16, 1.0),
                               ("heun", 8, 1.0), ("rk4", 2, 1.0), ("rk4", 4, 1.0)]:
        x1 = jax.jit(lambda x: fixed_step_solve(vel, x, steps, meth, time_power=power))(x0)
        d = np.abs(np.asarray(x1 - ref))
        out(dict(part="solver_acc", mode=f"{meth}{steps}" + ("" if power == 1.0 else f"_p{power}"),
                 nfe=nfe_per_solve(meth, steps), max_abs=float(d.max()),
                 rms=float(np.sqrt(np.mean(d**2))), rms_over_std=float(np.sqrt(np.mean(d**2))) / spread))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train,vf_eval,sample")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vf-cells", type=int, default=10_000)
    ap.add_argument("--vf-reps", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--sample-cells", type=int, default=100_000)
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true",
                    help="smoke: batch 128, width 64, 3 timed steps, 1,000 cells, 50 training steps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tag", default="")
    args, overrides = ap.parse_known_args()
    print(f"# bench_fm: joint config 'bench' {' '.join(overrides)}", flush=True)
    if args.tiny:
        overrides = ["--config.batch_size=128", "--config.model.flow_width=64", *overrides]
        args.steps, args.vf_cells, args.vf_reps, args.train_steps, args.sample_cells, args.sample_reps = 3, 1000, 2, 50, 1000, 1
    try:
        cfg = load_config(joint_configs, "bench", overrides)
    except ConfigError as err:
        ap.error(str(err))
    mc = cfg.model
    base = dict(peer="cosmic_jax", dtype=mc.compute_dtype, batch=cfg.batch_size, width=mc.flow_width,
                depth=mc.flow_depth, cond_depth=mc.cond_depth, time_dim=mc.time_embed_dim, overrides=overrides,
                tag=args.tag, jax=jax.__version__, host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                loadavg=os.getloadavg()[0])

    def out(rec):
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
        rec = {**base, **rec}
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    parts = args.parts.split(",")
    if "train" in parts:
        bench_train(args, cfg, out)
    if "vf_eval" in parts:
        bench_vf_eval(args, cfg, out)
    if "sample" in parts:
        bench_sample(args, cfg, out)


if __name__ == "__main__":
    main()
