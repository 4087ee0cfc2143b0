"""Weak-scaling benchmark of the sharded MAE train step: img/s per device on 1..8 devices.

The per-device batch is fixed; the global batch grows with the device count. On a CPU host the
devices are forced host devices (``--xla_force_host_platform_device_count=8``) that share the
machine's cores, so per-device throughput is expected to fall once devices outnumber cores; on a
GPU/TPU node the same script measures real scaling.

usage: python experiments/bench_scaling.py [--config test] [--per-device-batch 16] [--steps 10]
           [--fsdp] [--devices 1,2,4,8] [--out bench.json] [--config.KEY=VALUE ...]
smoke: python experiments/bench_scaling.py --per-device-batch 4 --steps 2 --devices 1,2

``--config`` is a ``cosmic pretrain`` config (``configs/pretrain.py``); ``--config.KEY=VALUE`` overrides
its fields (e.g. ``--config.model.dtype=bfloat16``, ``--config.optim.lr=1e-4``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

from cosmic_jax.runtime import split_cpu_devices

split_cpu_devices(8)  # before jax starts its backends; an explicit XLA_FLAGS device count wins

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cosmic_jax.configs import pretrain  # noqa: E402
from cosmic_jax.configs.overrides import ConfigError, load_config  # noqa: E402
from cosmic_jax.models.mae import model_config, param_logical_specs  # noqa: E402
from cosmic_jax.train import optim  # noqa: E402
from cosmic_jax.train import sharding as shd  # noqa: E402
from cosmic_jax.train.mae import create_train_state, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="test", choices=pretrain.VARIANTS)
    ap.add_argument("--per-device-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fsdp", action="store_true", help="shard params over all devices of each mesh")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--out", default="")
    args, overrides = ap.parse_known_args()
    try:
        cfg = load_config(pretrain, args.config, overrides)
    except ConfigError as err:
        ap.error(str(err))

    mc = model_config(cfg.model)
    rows = []
    for n in [int(x) for x in args.devices.split(",")]:
        if n > len(jax.devices()):
            break
        gb = args.per_device_batch * n
        mesh = shd.make_mesh(-1, n if args.fsdp else 1, jax.devices()[:n])
        ocfg = optim.resolve(cfg.optim, args.steps + 1, gb, n, jax.devices()[0].platform)
        init = functools.partial(create_train_state, mc, ocfg)
        state, shardings = shd.create_sharded_state(init, mesh, jax.random.key(0), param_specs=param_logical_specs(mc))
        step = shd.jit_step(train_step, mesh, shardings)
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
        row = {"devices": n, "global_batch": gb, "microbatch": ocfg.microbatch, "step_s": dt, "img_s": gb / dt,
               "img_s_per_device": gb / dt / n, "compile_s": compile_s, "fsdp": args.fsdp, "config": args.config,
               "overrides": overrides}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
