"""Weak-scaling benchmark of the sharded MAE train step: img/s per device on 1..8 devices.

The per-device batch is fixed; the global batch grows with the device count. On a CPU host the
devices are forced host devices (``--xla_force_host_platform_device_count=8``) that share the
machine's cores, so per-device throughput is expected to fall once devices outnumber cores; on a
GPU/TPU node the same script measures real scaling.

usage: python experiments/bench_scaling.py [--model vit_test] [--per-device-batch 16]
           [--steps 10] [--fsdp] [--devices 1,2,4,8] [--out bench.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_test")
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fsdp", action="store_true", help="shard params over all devices of each mesh")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import jax
    import numpy as np

    from cosmic_jax.configs.mae import get_model_config
    from cosmic_jax.train import sharding as shd
    from cosmic_jax.train.optim import OptimConfig
    from cosmic_jax.train.step import create_train_state, train_step

    mc = get_model_config(args.model)
    init = functools.partial(create_train_state, mc, OptimConfig(lr=1e-4))
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        if n > len(jax.devices()):
            break
        mesh = shd.make_mesh(-1, n if args.fsdp else 1, jax.devices()[:n])
        state, shardings = shd.create_sharded_state(init, mesh, jax.random.key(0), min_size=1024)
        step = shd.jit_step(train_step, mesh, shardings)
        gb = args.per_device_batch * n
        rng = np.random.default_rng(0)
        host = {"image": rng.normal(size=(gb, mc.image_size, mc.image_size, mc.channels)).astype(np.float32)}
        t0 = time.perf_counter()
        state, m = step(state, shd.shard_batch(host, mesh), jax.random.key(1))
        float(m["loss"])
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, shd.shard_batch(host, mesh), jax.random.key(1))
        float(m["loss"])
        dt = (time.perf_counter() - t0) / args.steps
        row = {"devices": n, "global_batch": gb, "step_s": dt, "img_s": gb / dt, "img_s_per_device": gb / dt / n,
               "compile_s": compile_s, "fsdp": args.fsdp, "model": args.model}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
