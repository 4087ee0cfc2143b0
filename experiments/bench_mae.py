"""Time cosmic_jax's MAE train step the way the peers in ../shared/bench are timed.

  python experiments/bench_mae.py --config vit_s8_64 --warmup 3 --steps 10 --json FILE
  python experiments/bench_mae.py --config test --warmup 1 --steps 2        # smoke (vit_test, seconds)

Synthetic random-normal input (4 batches cycled), float32, the full train step (masking, forward,
backward, AdamW update) as one ``jax.jit`` with the state donated. Each step is timed with
``time.perf_counter`` around the call plus ``loss.block_until_ready()``; the first warm-up step
holds the compile. One JSON record is appended to FILE in the runs.jsonl schema of the peers'
bench folder (``summarize.py`` reads it), FLOPs from the shared analytic count (``mae_flops.py``),
foreign CPU load from ``cpu_probe.py``. The bench folder is ``<repo>/../shared/bench`` unless
``--bench-dir`` (or ``$COSMIC_BENCH_DIR``) says otherwise.

The run config is ``cosmic pretrain``'s (``configs/pretrain.py``, variant ``--config``) with the
peers' protocol put in: global batch 128, AdamW lr 1.5e-4, wd 0.05, betas (0.9, 0.95), eps 1e-8,
no clipping, no warmup, constant lr. Override any field with the one syntax of every command, e.g.
``--config.model.dtype=bfloat16`` (not for the peer comparison, which is float32),
``--config.loader.global_batch=256``, ``--config.optim.microbatch=0``, ``--config.mesh.cpu_devices=1``.

Transparent huge pages for the heap (default; ``--no-hugepages`` turns it off): XLA:CPU mallocs a
fresh ~1.2 GB temp buffer per step (vit_s8_64, microbatch 64) and glibc serves it with mmap, so
every step took ~290k page faults (~0.55 s system CPU of ~7 s). ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`` makes glibc madvise(MADV_HUGEPAGE) that memory: ~900 faults/step. glibc
reads it at start-up only, so the script re-executes itself with it set (recorded in the result).

The step is the one ``cosmic pretrain`` runs: ``jit`` with the mesh's shardings, data parallel
over all devices. On a CPU host the script first splits the host into XLA devices
(``mesh.cpu_devices``, auto = one per core with >= 64 images each: 2 on a 2-core box) and chunks
each device's share into 32-image forward/backward passes (``optim.microbatch``, auto); see
cosmic_jax/runtime.py and notes/mae_speed.md. ``--config.mesh.cpu_devices=1
--config.optim.microbatch=0`` is the plain single-device step. XLA CPU flags go through the
XLA_FLAGS environment variable and are recorded in the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import flax
import jax
import numpy as np
import optax

import peers
from cosmic_jax.configs import pretrain
from cosmic_jax.configs.overrides import ConfigError, apply_overrides
from cosmic_jax.models.mae import count_params, model_config, param_logical_specs
from cosmic_jax.runtime import apply_cpu_devices, reexec_with_hugepage_malloc
from cosmic_jax.train import optim
from cosmic_jax.train import sharding as shd
from cosmic_jax.train.mae import create_train_state, train_step


def protocol_config(name: str, train: dict, overrides: list[str]):
    """``configs/pretrain.py`` variant ``name`` with the peers' batch and optimizer, then ``overrides``."""
    cfg = pretrain.get_config(name)
    cfg.loader.global_batch = train["batch_size"]
    cfg.optim.update(dict(lr=train["lr"], weight_decay=train["weight_decay"], b1=train["betas"][0],
                          b2=train["betas"][1], eps=train["eps"], clip_norm=0.0, warmup_fraction=0.0,
                          total_steps=0))  # constant lr, as the peers
    return apply_overrides(cfg, overrides)


def _peer_cfg_from_model(cfg) -> dict:
    """mae_flops-style dict for any model config (so non-peer configs get a FLOP count too)."""
    return dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels,
                hidden_size=cfg.hidden, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, decoder_hidden_size=cfg.dec_hidden,
                decoder_num_hidden_layers=cfg.dec_depth, decoder_num_attention_heads=cfg.dec_heads,
                decoder_intermediate_size=cfg.dec_mlp_dim, mask_ratio=cfg.mask_ratio,
                norm_pix_loss=cfg.norm_pix_loss)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-hugepages", action="store_true",
                    help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see above)")
    ap.add_argument("--config", default="vit_s8_64", choices=pretrain.VARIANTS,
                    help="pretrain config variant; --config.KEY=VALUE overrides its fields")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="machine matmul peak for MFU (default: median of --peak-json entries)")
    ap.add_argument("--peak-json", default=None, help="matmul_peak.py JSONL; best backend median")
    ap.add_argument("--json", default=None, help="append one JSON result line here")
    ap.add_argument("--tag", default="")
    peers.add_arguments(ap)
    args, overrides = ap.parse_known_args(argv)
    if not args.no_hugepages and argv is None:
        reexec_with_hugepage_malloc()
    bench = args.bench_dir
    flops_mod, probe_mod = peers.load_module(bench, "mae_flops"), peers.load_module(bench, "cpu_probe")
    try:
        cfg = protocol_config(args.config, flops_mod.TRAIN, overrides)
    except ConfigError as err:
        ap.error(str(err))
    batch = cfg.loader.global_batch
    apply_cpu_devices(cfg.mesh.cpu_devices, batch)

    model_cfg = model_config(cfg.model)
    mesh = shd.mesh_from_config(cfg.mesh)  # data parallel over every device (one unless the CPU host is split)
    n_dev = mesh.devices.size
    ocfg = optim.resolve(cfg.optim, args.warmup + args.steps, batch, n_dev, jax.devices()[0].platform)
    rng = np.random.default_rng(args.seed)
    shape = (batch, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
    batches = [shd.shard_batch({"image": rng.standard_normal(shape, dtype=np.float32)}, mesh)
               for _ in range(4)]
    key = jax.random.key(args.seed)
    state, shardings = shd.create_sharded_state(
        functools.partial(create_train_state, model_cfg, ocfg, sample_shape=shape), mesh, key,
        param_specs=param_logical_specs(model_cfg))
    jax.block_until_ready(state)
    n_params = count_params(state.params)
    step_fn = shd.jit_step(train_step, mesh, shardings)

    warm_times = []
    for i in range(args.warmup):
        t0 = time.perf_counter()
        state, m = step_fn(state, batches[i % 4], key)
        m["loss"].block_until_ready()
        warm_times.append(time.perf_counter() - t0)

    times, losses, foreign = [], [], []
    probe = probe_mod.Probe()
    load_before = probe_mod.loadavg()
    for i in range(args.steps):
        images = batches[i % 4]
        probe.start()
        t0 = time.perf_counter()
        state, m = step_fn(state, images, key)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
        p = probe.stop()
        foreign.append(p["foreign_cores"] if p else None)
        losses.append(float(m["loss"]))

    flop_cfg = flops_mod.CONFIGS.get(args.config) if not overrides else None
    flops = flops_mod.mae_flops_per_image(flop_cfg or _peer_cfg_from_model(model_cfg))
    ips = [batch / t for t in times]
    med_ips = statistics.median(ips)
    gflops = med_ips * flops["train_flops"] / 1e9
    peak = args.peak_gflops
    if peak is None and args.peak_json and os.path.exists(args.peak_json):
        with open(args.peak_json) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        by_backend: dict[str, list] = {}
        for r in rows:
            if r.get("kind") == "matmul_peak":
                by_backend.setdefault(r["backend"], []).append(r["median_gflops"])
        peak = max((statistics.median(v) for v in by_backend.values()), default=None)
    res = {
        "kind": "peer", "peer": "cosmic_jax-mae", "mode": "jit",
        "config": args.config, "batch": batch, "params": int(n_params),
        "overrides": overrides, "dtype": model_cfg.dtype, "microbatch": ocfg.microbatch,
        "num_devices": n_dev,
        "warmup_s": warm_times, "first_step_s": warm_times[0] if warm_times else None,
        "step_s": times, "median_step_s": statistics.median(times),
        "img_s_median": med_ips, "img_s_min": min(ips), "img_s_max": max(ips),
        "train_gflop_per_img": flops["train_flops"] / 1e9, "gflops": gflops,
        "peak_gflops": peak, "mfu": (gflops / peak) if peak else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        "foreign_cores_per_step": foreign,
        "foreign_cores_mean": (sum(foreign) / len(foreign)) if None not in foreign else None,
        "loadavg_before": load_before, "loadavg_after": probe_mod.loadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "python": sys.version.split()[0]},
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "tag": args.tag,
    }
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] else "n/a"
    fm = res["foreign_cores_mean"]
    print(f"[cosmic_jax/jit] {args.config} bs{batch} params={n_params / 1e6:.2f}M "
          f"{n_dev} dev mb{ocfg.microbatch} first-step {res['first_step_s']:.1f}s | img/s median {med_ips:.1f} "
          f"(min {min(ips):.1f}, max {max(ips):.1f}) | {gflops:.1f} GFLOP/s | MFU {mfu} | "
          f"loss {losses[0]:.4f}->{losses[-1]:.4f} | foreign load "
          f"{'n/a' if fm is None else f'{fm:.2f}'} cores", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
