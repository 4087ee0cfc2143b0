"""Throughput of the training input pipeline (read + decode + batch) and of the end-to-end step.

Loader mode (default): writes a synthetic crop dataset (default 8192 nucleus-like 64x64x1
float crops in [0, 1] with a zero background, stored by the checkout's ``records.write_shards``
defaults), then for each worker count and decode place times ``--batches`` batches of ``--batch``
after ``--warmup`` batches on a fresh iterator, ``--reps`` times (the settings alternating within
each rep), and reports crops per second (wall) and crops per CPU-second of the reading processes
(this process plus its grain workers) and of this process alone, median and spread, and the bytes
per crop on disk. ``--decode device`` (the key ``workers=N``) is what ``cosmic pretrain`` uses:
batches as stored, made float32 in the train step; ``host`` (``workers=N,host_decode``): float32
made by the reading processes.

    .venv/bin/python experiments/bench_loader.py --workers 0 --json out.json
    .venv/bin/python experiments/bench_loader.py --workers 0 2 --reps 5

Step mode (``--step-reps R``): the MAE train step of ``--train-config`` on one batch without
(before this change) and with on-device augmentation (after), alternating in one process.

Train mode (``--train-steps K``): runs ``cosmic_jax.train.pretrain.train_and_evaluate`` for K
steps of ``--train-config`` on that dataset and reports CPU-seconds (all threads and children)
and wall seconds per step after ``--warmup`` steps, so two checkouts can be compared by
alternating runs with ``PYTHONPATH`` pointing at each (the script only uses APIs both have).

    PYTHONPATH=/work/main .venv/bin/python experiments/bench_loader.py --train-steps 12 --json a.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import psutil


def nucleus_crops(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """Nucleus-like float32 crops in [0, 1]: a textured ellipse on a zero background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    out = np.empty((n, size, size, channels), np.float32)
    for i in range(n):
        a, b = rng.uniform(0.2, 0.4, 2) * size
        inside = (yy / a) ** 2 + (xx / b) ** 2 < 1
        out[i] = (inside * rng.uniform(0.3, 1.0, (size, size)))[..., None]
    return out


def make_dataset(out_dir: str, n: int, size: int, channels: int, float_storage: str | None = None,
                 seed: int = 0) -> dict:
    from cosmic_jax.data import records

    crops = nucleus_crops(min(n, 1024), size, channels, seed)  # reused cyclically: cheap to build
    recs = (records.encode_record(crops[i % len(crops)], f"bench{i:06d}") for i in range(n))
    kw = {} if float_storage is None else {"float_storage": float_storage}  # None: the checkout's default
    return records.write_shards(recs, out_dir, records_per_shard=4096, **kw)


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process (all threads) and its live child processes (grain workers)."""
    total = time.process_time()  # ns resolution; psutil's per-process times tick at 10 ms
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def time_pipeline(data_dir: str, workers: int, batch: int, batches: int, warmup: int, threads: int,
                  seed: int, device_decode: bool = False) -> tuple[float, float, float]:
    """(wall-clock crops/s, crops per CPU-second of the reading processes, crops per CPU-second
    of this process alone) over ``batches`` batches after ``warmup`` batches on a fresh iterator."""
    from cosmic_jax.data.loader import LoaderConfig, make_train_iterator

    # setattr: checkouts from before device_decode existed are timed with the same script
    cfg = LoaderConfig(global_batch=batch, seed=seed, worker_count=workers, read_threads=threads)
    if device_decode:
        cfg.device_decode = True
    it = make_train_iterator(data_dir, cfg, process_index=0, process_count=1)
    proc = psutil.Process()
    try:
        for _ in range(warmup):
            next(it)
        t0, c0, m0 = time.perf_counter(), cpu_seconds(proc), time.process_time()
        n = 0
        for _ in range(batches):
            n += len(next(it)["index"])
        main = n / max(time.process_time() - m0, 1e-9)
        return n / (time.perf_counter() - t0), n / max(cpu_seconds(proc) - c0, 1e-9), main
    finally:
        it.close()


def time_training(data_dir: str, config: str, steps: int, warmup: int, batch: int, workdir: str) -> dict:
    """CPU and wall seconds per train step (loader + jitted step), after ``warmup`` steps."""
    import jax

    from cosmic_jax.configs import pretrain
    from cosmic_jax.configs.overrides import load_config
    from cosmic_jax.train.loop import Hook
    from cosmic_jax.train.pretrain import train_and_evaluate

    cfg = load_config(pretrain, config, [f"--config.{x}" for x in (
        f"steps={steps}", f"loader.global_batch={batch}", "loader.read_threads=1", "recon_every=0",
        "probe_every=0", "progress=false", f"log_every={steps}", f"ckpt_every={10 * steps}", "async_ckpt=false",
        "mesh.num_devices=1",
    )])
    proc, marks = psutil.Process(), []

    def mark(step, state):
        jax.block_until_ready(state.params)
        marks.append((step, cpu_seconds(proc), time.perf_counter()))

    train_and_evaluate(cfg, data_dir, workdir, extra_hooks=(Hook(1, mark, "bench", at_end=False),))
    marks = [m for m in marks if m[0] >= warmup]
    cpu = np.diff([m[1] for m in marks])
    wall = np.diff([m[2] for m in marks])
    return {"config": config, "batch": batch, "steps_timed": len(cpu),
            "cpu_s_per_step": {"median": float(np.median(cpu)), "min": float(cpu.min()), "max": float(cpu.max())},
            "wall_s_per_step": {"median": float(np.median(wall)), "min": float(wall.min()), "max": float(wall.max())}}


def compare_step(config: str, batch: int, reps: int) -> dict:
    """CPU-seconds per MAE train step without (the step before this change) and with on-device
    augmentation (after), alternating in one process on one fixed batch."""
    import functools

    import jax

    from cosmic_jax.configs import pretrain
    from cosmic_jax.configs.overrides import frozen, load_config
    from cosmic_jax.models.mae import model_config
    from cosmic_jax.train import optim
    from cosmic_jax.train.mae import create_train_state, train_step

    cfg = load_config(pretrain, config)
    mc = model_config(cfg.model)
    state = create_train_state(mc, optim.resolve(cfg.optim, 100, batch, 1, "cpu"), jax.random.key(0))
    x = nucleus_crops(batch, mc.image_size, mc.channels)
    steps = {"plain": jax.jit(train_step),
             "augmented": jax.jit(functools.partial(train_step, augment=frozen(cfg.loader.augment)))}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(reps + 1):
        for name, fn in (steps.items() if r % 2 else reversed(steps.items())):
            c0 = time.process_time()
            jax.block_until_ready(fn(state, {"image": x}, jax.random.key(1)))
            if r:  # the first round compiles
                times[name].append(time.process_time() - c0)
    return {"config": config, "batch": batch,
            **{k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in times.items()}}


def run_on_dataset(args, results: dict, tmp: str) -> None:
    """Loader or train mode on ``--data-dir`` or a synthetic dataset written under ``tmp``."""
    from cosmic_jax.data.records import CropSource

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = os.path.join(tmp, "crops")
        t0 = time.perf_counter()
        make_dataset(data_dir, args.num_crops, args.size, args.channels, args.float_storage)
        print(f"wrote {args.num_crops} crops {args.size}x{args.size}x{args.channels} in {time.perf_counter() - t0:.1f}s")
    shards = [os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".array_record")]
    n = len(CropSource(data_dir))
    results["bytes_per_crop"] = sum(map(os.path.getsize, shards)) / n
    print(f"{n} crops, {results['bytes_per_crop']:,.0f} bytes per crop on disk")
    if args.train_steps:
        res = results["train"] = time_training(data_dir, args.train_config, args.train_steps, args.warmup,
                                               args.batch, os.path.join(tmp, "work"))
        c, w = res["cpu_s_per_step"], res["wall_s_per_step"]
        print(f"{res['config']} batch {args.batch}: {c['median']:.3f} CPU-s/step (min {c['min']:.3f}, "
              f"max {c['max']:.3f}); wall {w['median']:.3f} s/step over {res['steps_timed']} steps")
        return
    settings = [(w, d) for w in args.workers for d in args.decode]
    runs: dict = {s: [] for s in settings}
    for r in range(args.reps):
        for w, d in (settings if r % 2 == 0 else settings[::-1]):
            runs[w, d].append(time_pipeline(data_dir, w, args.batch, args.batches, args.warmup, args.threads,
                                            seed=r, device_decode=d == "device"))
    for (w, d), got in runs.items():
        rates, cpu, main = [r[0] for r in got], [r[1] for r in got], [r[2] for r in got]
        key = f"workers={w}" + (",host_decode" if d == "host" else "")
        res = results[key] = {
            "median": float(np.median(rates)), "min": min(rates), "max": max(rates), "reps": rates,
            "per_cpu_second": float(np.median(cpu)), "per_cpu_second_min": min(cpu),
            "per_cpu_second_max": max(cpu), "per_cpu_second_reps": cpu,
            "main_per_cpu_second": float(np.median(main)), "main_per_cpu_second_reps": main}
        print(f"{key}: median {res['median']:,.0f} crops/s (min {min(rates):,.0f}, max {max(rates):,.0f}); "
              f"{res['per_cpu_second']:,.0f} crops per CPU-second (min {min(cpu):,.0f}, max {max(cpu):,.0f}), "
              f"main process alone {res['main_per_cpu_second']:,.0f}; {args.reps} reps")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="existing crop dataset (default: build a synthetic one)")
    p.add_argument("--num-crops", type=int, default=8192)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--float-storage", default=None, help="records.write_shards float_storage (default: its default)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=48)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="read threads per reading process")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--decode", nargs="+", choices=("device", "host"), default=["device", "host"],
                   help="where crops become float32: in the train step (cosmic pretrain) or the reading processes")
    p.add_argument("--train-steps", type=int, default=0, help="> 0: time train steps instead of the loader")
    p.add_argument("--train-config", default="vit_t8_64")
    p.add_argument("--step-reps", type=int, default=0,
                   help="> 0: compare the train step without / with on-device augmentation instead")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    results = {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "batch": args.batch,
               "size": args.size, "channels": args.channels}
    print(f"{os.cpu_count()} CPUs, 1-min load average {results['load_avg_1min']:.1f}")
    if args.step_reps:
        res = results["step"] = compare_step(args.train_config, args.batch, args.step_reps)
        print(" ".join(f"{k}: {res[k]['median']:.3f} CPU-s/step (min {res[k]['min']:.3f}, max {res[k]['max']:.3f})"
                       for k in ("plain", "augmented")) + f"; {args.train_config} batch {args.batch}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run_on_dataset(args, results, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
