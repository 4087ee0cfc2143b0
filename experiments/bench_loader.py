"""Throughput of the training input pipeline: decode + augment + batch, crops per second.

Writes a synthetic crop dataset (default 4096 crops of 64x64x1 float32, ArrayRecord shards of
1024), then for each worker count times ``--batches`` batches of ``--batch`` after
``--warmup`` batches (worker start-up and first reads excluded), ``--reps`` times on fresh
iterators, and prints the median and spread.

    .venv/bin/python experiments/bench_loader.py                # 0 and 2 workers
    .venv/bin/python experiments/bench_loader.py --workers 0 4 --reps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def make_dataset(out_dir: str, n: int, size: int, channels: int, seed: int = 0) -> None:
    from cosmic_jax.data import records

    rng = np.random.default_rng(seed)
    recs = (
        records.encode_record(rng.random((size, size, channels), dtype=np.float32), f"bench{i:06d}")
        for i in range(n)
    )
    records.write_shards(recs, out_dir, records_per_shard=1024)


def time_pipeline(
    data_dir: str, workers: int, batch: int, batches: int, warmup: int, threads: int, seed: int
) -> tuple[float, float]:
    """(wall-clock crops/s, crops per CPU-second of this process) over ``batches`` batches
    after ``warmup`` batches on a fresh iterator. The CPU rate is only meaningful with 0
    workers (worker CPU is not counted) and is robust to a machine shared with other jobs."""
    from cosmic_jax.data.loader import LoaderConfig, make_train_iterator

    cfg = LoaderConfig(global_batch=batch, seed=seed, worker_count=workers, read_threads=threads)
    it = make_train_iterator(data_dir, cfg, process_index=0, process_count=1)
    try:
        for _ in range(warmup):
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(batches):
            n += next(it)["image"].shape[0]
        return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)
    finally:
        it.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="existing crop dataset (default: build a synthetic one)")
    p.add_argument("--num-crops", type=int, default=4096)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="read threads per reading process")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "crops")
            t0 = time.perf_counter()
            make_dataset(data_dir, args.num_crops, args.size, args.channels)
            print(f"wrote {args.num_crops} crops {args.size}x{args.size}x{args.channels} in {time.perf_counter() - t0:.1f}s")
        results = {
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "batch": args.batch,
            "size": args.size,
            "channels": args.channels,
        }
        print(f"{os.cpu_count()} CPUs, 1-min load average {results['load_avg_1min']:.1f}")
        for w in args.workers:
            runs = [
                time_pipeline(data_dir, w, args.batch, args.batches, args.warmup, args.threads, seed=r)
                for r in range(args.reps)
            ]
            rates = [r[0] for r in runs]
            med = float(np.median(rates))
            res = {"median": med, "min": min(rates), "max": max(rates), "reps": rates}
            line = f"workers={w}: median {med:,.0f} crops/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.reps} reps)"
            if w == 0:
                res["per_cpu_second"] = float(np.median([r[1] for r in runs]))
                line += f"; {res['per_cpu_second']:,.0f} crops per CPU-second"
            results[f"workers={w}"] = res
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
