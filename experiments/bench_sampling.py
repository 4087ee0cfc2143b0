"""Fixed-step flow sampling: diffrax (solver + ``StepTo`` on the time grid) vs a hand-written RK loop.

Both integrate the default solve of a fitted joint model's p(e | m) flow: explicit midpoint, 6
steps on the grid t_i = (i/6)^0.7 (12 velocity evaluations per cell), condition embedding once per
solve, time embedding once per stage. They run side by side in one process on the same jitted
chunks the public sampler uses (``sampling.chunk_rows`` rows per call, every chunk dispatched
before the first result is read), alternating which goes first, several repetitions; per pass we
record wall time and this process's CPU time (``time.process_time``, all threads: the robust
number on a shared machine). ``public`` times ``JointModel.sample_expr_given_morph`` itself (noise
drawn in the jitted call, standardisation, copy back), i.e. the package's solver in situ. A second part times one public-sized chunk (1,024 cells) many times
in short paired rounds (``--chunk-rounds``): the precise number for a per-step overhead of a few %.
Compile time (first call, wall and CPU) is recorded too: every ``JointModel`` compiles its own sampler.

Networks: the joint config variants ``analysis`` (what ``cosmic analyze --quick`` fits) and
``bench`` (CellFlow mlp3x256-sized), fitted for ``--fit-steps`` on the 64-d tanh toy
(``cosmic_jax.testing.toys.TanhToy``) so the velocity field is a trained one. Workloads: 100,000
cells x 1 sample and 10,000 cells x 16 samples.

    python experiments/bench_sampling.py --json notes/bench_sampling.jsonl      # ~40 min on 2 busy cores
    python experiments/bench_sampling.py --tiny                                 # smoke, ~1 min
    python experiments/bench_sampling.py --summarize notes/bench_sampling.jsonl # the tables

The two solutions must agree to float32 round-off: the script reports the max |difference|
relative to the samples' spread and fails if it exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import diffrax
import jax
import numpy as np

from cosmic_jax.configs import joint as joint_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.joint import fit_joint
from cosmic_jax.joint.sampling import fixed_step_solve, flow_velocity_fn, time_grid
from cosmic_jax.testing.toys import TanhToy

DIM = 64
AGREE_TOL = 1e-4  # max |diffrax - hand-written| / sample std


def diffrax_fixed_solve(vel, x0: jax.Array, num_steps: int, time_power: float) -> jax.Array:
    """diffrax Midpoint stepping exactly to the grid points ``time_grid(num_steps, time_power)``."""
    grid = time_grid(num_steps, time_power)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, y, args: vel(y, t)), diffrax.Midpoint(), t0=0.0, t1=1.0,
                              dt0=None, y0=x0, stepsize_controller=diffrax.StepTo(ts=grid),
                              saveat=diffrax.SaveAt(t1=True), max_steps=num_steps)
    return sol.ys[0]


def handwritten_solve(vel, x0: jax.Array, num_steps: int, time_power: float) -> jax.Array:
    return fixed_step_solve(vel, x0, num_steps, "midpoint", time_power=time_power)


SOLVERS = {"diffrax": diffrax_fixed_solve, "handwritten": handwritten_solve}


def chunk_fn(flow, solve, steps: int, power: float, repeats: int):
    """Jitted (params, cond (C, D), x0 (S*C, D)) -> (S*C, D): one chunk of the public sampler's work."""
    return jax.jit(lambda p, c, x: solve(flow_velocity_fn(flow, p, c, repeats=repeats), x, steps, power))


def run_chunks(fn, params, cond: np.ndarray, x0: np.ndarray, per: int, repeats: int) -> np.ndarray:
    """All chunks of ``per`` cells dispatched first, then copied back (as ``JointModel._sample``)."""
    n = cond.shape[0]
    pending = []
    for start in range(0, n, per):
        ids = np.arange(start, start + per) % n  # the last chunk is padded (wrapped): one shape
        x = x0[:, ids].reshape(repeats * per, DIM)
        pending.append(fn(params, cond[ids], x))
    out = np.empty_like(x0)
    for k, res in enumerate(pending):
        ids = np.arange(k * per, min((k + 1) * per, n))
        out[:, ids] = np.asarray(res).reshape(repeats, per, DIM)[:, :ids.size]
    return out


def timed(f):
    c0, t0 = time.process_time(), time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0, time.process_time() - c0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def bench_one(model, size: str, cells: int, samples: int, reps: int, out) -> None:
    cfg = model.config.sampling
    flow, params = model.nets.flow_e, model.params["flow_e"]
    toy = TanhToy(DIM, seed=5)
    m, _ = toy.draw(cells)
    cond = (m - model.stats["m"]["mean"]) / model.stats["m"]["std"]
    x0 = np.asarray(jax.random.normal(jax.random.key(11), (samples, cells, DIM)), np.float32)
    per = max(1, cfg.chunk_rows // samples)
    fns = {k: chunk_fn(flow, s, cfg.steps, cfg.time_power, samples) for k, s in SOLVERS.items()}
    compile_s, results = {}, {}
    for k, fn in fns.items():  # first call: trace + compile + one chunk
        _, wall, cpu = timed(lambda: jax.block_until_ready(fn(params, cond[:per], x0[:, :per].reshape(samples * per, DIM))))
        compile_s[k] = {"wall": wall, "cpu": cpu}
    model.sample_expr_given_morph(m[:per], samples, seed=0)  # compiles the public path (same chunk shape)
    walls = {k: [] for k in [*fns, "public"]}
    cpus = {k: [] for k in walls}
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            results[k], wall, cpu = timed(lambda: run_chunks(fns[k], params, cond, x0, per, samples))
            walls[k].append(wall)
            cpus[k].append(cpu)
        _, wall, cpu = timed(lambda: model.sample_expr_given_morph(m, samples, seed=r))
        walls["public"].append(wall)
        cpus["public"].append(cpu)
    sd = float(np.std(results["handwritten"]))
    diff = np.abs(results["diffrax"] - results["handwritten"])
    # paired ratios (same repetition, adjacent in time): robust to load drifting between repetitions
    ratio_cpu = [a / b for a, b in zip(cpus["diffrax"], cpus["handwritten"])]
    ratio_wall = [a / b for a, b in zip(walls["diffrax"], walls["handwritten"])]
    rec = dict(size=size, cells=cells, samples=samples, rows=cells * samples, chunk_rows=per * samples,
               solve=f"{cfg.solver}{cfg.steps}_p{cfg.time_power}", compile_s=compile_s,
               cpu_s={k: spread(v) for k, v in cpus.items()}, wall_s={k: spread(v) for k, v in walls.items()},
               ratio_cpu_diffrax_over_hand=spread(ratio_cpu), ratio_wall_diffrax_over_hand=spread(ratio_wall),
               cpu_s_raw=cpus, wall_s_raw=walls,
               max_abs_diff=float(diff.max()), max_abs_diff_over_std=float(diff.max()) / sd, sample_std=sd)
    out(rec)
    if rec["max_abs_diff_over_std"] > AGREE_TOL:
        raise SystemExit(f"{size} {cells}x{samples}: diffrax and hand-written disagree "
                         f"(max |diff| / std = {rec['max_abs_diff_over_std']:.2e} > {AGREE_TOL})")


def bench_chunk(model, size: str, rounds: int, calls: int, out) -> None:
    """One public-sized chunk (``chunk_rows`` cells x 1 sample) solved ``calls`` times per solver per
    round, solvers alternating: many short paired measurements resolve a few % of per-step overhead."""
    cfg = model.config.sampling
    flow, params = model.nets.flow_e, model.params["flow_e"]
    n = cfg.chunk_rows
    cond = jax.random.normal(jax.random.key(12), (n, DIM))
    x0 = jax.random.normal(jax.random.key(13), (n, DIM))
    fns = {k: chunk_fn(flow, s, cfg.steps, cfg.time_power, 1) for k, s in SOLVERS.items()}
    for fn in fns.values():
        jax.block_until_ready(fn(params, cond, x0))
    cpus = {k: [] for k in fns}
    walls = {k: [] for k in fns}

    def calls_of(fn):
        for _ in range(calls):
            y = fn(params, cond, x0)
        return jax.block_until_ready(y)

    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            _, wall, cpu = timed(lambda: calls_of(fns[k]))
            cpus[k].append(cpu / calls)
            walls[k].append(wall / calls)
    ratio = [a / b for a, b in zip(cpus["diffrax"], cpus["handwritten"])]
    out(dict(size=size, part="chunk", rows=n, rounds=rounds, calls_per_round=calls,
             solve=f"{cfg.solver}{cfg.steps}_p{cfg.time_power}",
             cpu_s_per_call={k: spread(v) for k, v in cpus.items()},
             wall_s_per_call={k: spread(v) for k, v in walls.items()},
             ratio_cpu_diffrax_over_hand=spread(ratio),
             rounds_diffrax_slower=sum(x > 1 for x in ratio)))


def fitted_model(size: str, fit_steps: int, fit_cells: int):
    cfg = load_config(joint_configs, size, [f"--config.steps={fit_steps}", "--config.progress=false",
                                            f"--config.log_every={max(1, fit_steps // 4)}"])
    m, e = TanhToy(DIM, seed=0).draw(fit_cells)
    t0 = time.perf_counter()
    model = fit_joint(m, e, cfg, seed=0)
    return model, time.perf_counter() - t0


def _cell(d: dict, fmt: str = "{:.3g}") -> str:
    return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"


def summarize(path: str) -> str:
    """Markdown tables of a --json file: paired CPU ratios per workload and the one-chunk rounds."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    rows = ["| run | flow | cells x samples | CPU s diffrax | CPU s hand-written | CPU s public | CPU ratio diffrax/hand, "
            "median (min-max) of reps | wall ratio | compile s wall / CPU diffrax; hand-written | max diff / std | load |",
            "|---" * 11 + "|"]
    for r in recs:
        if r.get("part") == "chunk":
            continue
        c, comp = r["cpu_s"], r["compile_s"]
        rows.append(f"| {r['tag']} | {r['size']} | {r['cells']:,} x {r['samples']} | {_cell(c['diffrax'])} | "
                    f"{_cell(c['handwritten'])} | {_cell(c['public'])} | {_cell(r['ratio_cpu_diffrax_over_hand'])} | "
                    f"{_cell(r['ratio_wall_diffrax_over_hand'])} | {comp['diffrax']['wall']:.1f} / {comp['diffrax']['cpu']:.2f}; "
                    f"{comp['handwritten']['wall']:.1f} / {comp['handwritten']['cpu']:.2f} | "
                    f"{r['max_abs_diff_over_std']:.1e} | {r['loadavg']:.0f} |")
    rows += ["", "| run | flow | rows per call | ms CPU per call diffrax | ms CPU hand-written | ratio, median (min-max) "
             "of rounds | rounds diffrax slower | load |", "|---" * 8 + "|"]
    for r in recs:
        if r.get("part") != "chunk":
            continue
        c = {k: {kk: 1e3 * vv for kk, vv in v.items()} for k, v in r["cpu_s_per_call"].items()}
        rows.append(f"| {r['tag']} | {r['size']} | {r['rows']:,} | {_cell(c['diffrax'])} | {_cell(c['handwritten'])} | "
                    f"{_cell(r['ratio_cpu_diffrax_over_hand'])} | {r['rounds_diffrax_slower']} / {r['rounds']} | "
                    f"{r['loadavg']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="analysis,bench", help="joint config variants whose flow is timed")
    ap.add_argument("--workloads", default="100000x1,10000x16", help="CELLSxSAMPLES, comma separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-rounds", type=int, default=30, help="paired rounds of the one-chunk timing (0 = skip)")
    ap.add_argument("--fit-steps", type=int, default=400)
    ap.add_argument("--fit-cells", type=int, default=20_000)
    ap.add_argument("--tiny", action="store_true", help="smoke: analysis size, 2000x1 and 200x16, 2 reps, 50 fit steps")
    ap.add_argument("--json", default=None, help="append one JSON line per (size, workload)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--summarize", metavar="FILE", default=None, help="print the markdown tables of a --json file")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.tiny:
        args.sizes, args.workloads, args.reps, args.fit_steps, args.fit_cells = "analysis", "2000x1,200x16", 2, 50, 2000
        args.chunk_rounds = 4
    base = dict(bench="sampling", tag=args.tag, jax=jax.__version__, diffrax=diffrax.__version__,
                host=platform.node(), cpu_count=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def out(rec):
        rec = {**base, **rec, "loadavg": os.getloadavg()[0]}
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    for size in args.sizes.split(","):
        model, fit_s = fitted_model(size, args.fit_steps, args.fit_cells)
        print(f"# {size}: fitted {args.fit_steps} steps in {fit_s:.1f} s, loss "
              f"{model.loss_history['loss'][0]:.3f} -> {model.loss_history['loss'][-1]:.3f}", flush=True)
        if args.chunk_rounds:
            bench_chunk(model, size, args.chunk_rounds, 10, out)
        for w in args.workloads.split(","):
            cells, samples = (int(v) for v in w.split("x"))
            bench_one(model, size, cells, samples, args.reps, out)


if __name__ == "__main__":
    main()
