"""Time cosmic_jax's MAE train step the way the peers in /work/shared/bench are timed.

  python experiments/bench_mae.py --config vit_s8_64 --batch 128 --warmup 3 --steps 10 --json FILE

Synthetic random-normal input (4 batches cycled), float32, the full train step (masking, forward,
backward, AdamW update) as one ``jax.jit`` with the state donated. Each step is timed with
``time.perf_counter`` around the call plus ``loss.block_until_ready()``; the first warm-up step
holds the compile. One JSON record is appended to FILE in the runs.jsonl schema of
/work/shared/bench (``summarize.py`` reads it), FLOPs from the shared analytic count
(``mae_flops.py``), foreign CPU load from ``cpu_probe.py``.

Transparent huge pages for the heap (default; ``--no-hugepages`` turns it off): XLA:CPU mallocs a
fresh ~1.2 GB temp buffer per step (vit_s8_64, microbatch 64) and glibc serves it with mmap, so
every step took ~290k page faults (~0.55 s system CPU of ~7 s). ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`` makes glibc madvise(MADV_HUGEPAGE) that memory: ~900 faults/step. glibc
reads it at start-up only, so the script re-executes itself with it set (recorded in the result).

The step is the one ``cosmic pretrain`` runs: ``jit`` with the mesh's shardings, data parallel
over all devices. On a CPU host the script first splits the host into XLA devices
(``--cpu-devices``, auto = one per core with >= 64 images each: 2 on a 2-core box) and chunks
each device's share into 32-image forward/backward passes (``--microbatch``, auto); see
cosmic_jax/runtime.py and notes/mae_speed.md. ``--cpu-devices 1 --microbatch 0`` is the plain
single-device step.

``--set key=value`` overrides MAEConfig fields (e.g. ``--set dtype=bfloat16``; not for the peer
comparison, which is float32). XLA CPU flags go through the XLA_FLAGS environment variable and are
recorded in the result.
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

BENCH_DIR = os.environ.get("COSMIC_BENCH_DIR", "/work/shared/bench")
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpu_probe import Probe, loadavg  # noqa: E402
from mae_flops import CONFIGS as PEER_CONFIGS, TRAIN, mae_flops_per_image  # noqa: E402


def _peer_cfg_from_model(cfg) -> dict:
    """mae_flops-style dict for any MAEConfig (so non-peer configs get a FLOP count too)."""
    return dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.channels,
                hidden_size=cfg.hidden, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                intermediate_size=cfg.mlp_dim, decoder_hidden_size=cfg.dec_hidden,
                decoder_num_hidden_layers=cfg.dec_depth, decoder_num_attention_heads=cfg.dec_heads,
                decoder_intermediate_size=cfg.dec_mlp_dim, mask_ratio=cfg.mask_ratio,
                norm_pix_loss=cfg.norm_pix_loss)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-hugepages", action="store_true",
                    help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the docstring)")
    ap.add_argument("--config", default="vit_s8_64")
    ap.add_argument("--batch", type=int, default=TRAIN["batch_size"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--microbatch", type=int, default=-1,
                    help="OptimConfig.microbatch: images of the global batch per forward/backward "
                         "chunk inside the step (0 = whole batch; -1 = auto: 32 per device on CPU)")
    ap.add_argument("--cpu-devices", type=int, default=-1,
                    help="split a CPU host into N XLA devices, data parallel (-1 = auto: one per "
                         "core while each gets >= 64 images; 0/1 = one device). See runtime.py")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="MAEConfig override (repeatable)")
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="machine matmul peak for MFU (default: median of --peak-json entries)")
    ap.add_argument("--peak-json", default=None, help="matmul_peak.py JSONL; best backend median")
    ap.add_argument("--json", default=None, help="append one JSON result line here")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not args.no_hugepages and argv is None:
        from cosmic_jax.runtime import reexec_with_hugepage_malloc

        reexec_with_hugepage_malloc()
    from cosmic_jax.runtime import apply_cpu_devices

    apply_cpu_devices(args.cpu_devices, args.batch)

    import numpy as np
    import jax
    import flax
    import optax

    from cosmic_jax.configs.mae import get_model_config, parse_overrides
    from cosmic_jax.models.mae import count_params
    from cosmic_jax.train import sharding as shd
    from cosmic_jax.train.optim import OptimConfig, resolve_microbatch
    from cosmic_jax.train.step import create_train_state, train_step

    cfg = get_model_config(args.config, **parse_overrides(args.set))
    mesh = shd.make_mesh()  # data parallel over every device (one unless the CPU host is split)
    n_dev = mesh.devices.size
    ocfg = resolve_microbatch(
        OptimConfig(lr=TRAIN["lr"], b1=TRAIN["betas"][0], b2=TRAIN["betas"][1], eps=TRAIN["eps"],
                    weight_decay=TRAIN["weight_decay"], microbatch=args.microbatch),
        args.batch, n_dev, jax.devices()[0].platform)  # chunking: same objective
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, cfg.image_size, cfg.image_size, cfg.channels)
    batches = [shd.shard_batch({"image": rng.standard_normal(shape, dtype=np.float32)}, mesh)
               for _ in range(4)]
    key = jax.random.key(args.seed)
    state, shardings = shd.create_sharded_state(
        functools.partial(create_train_state, cfg, ocfg, sample_shape=shape), mesh, key)
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
    probe = Probe()
    load_before = loadavg()
    for i in range(args.steps):
        batch = batches[i % 4]
        probe.start()
        t0 = time.perf_counter()
        state, m = step_fn(state, batch, key)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - t0)
        p = probe.stop()
        foreign.append(p["foreign_cores"] if p else None)
        losses.append(float(m["loss"]))

    flop_cfg = PEER_CONFIGS.get(args.config) if not args.set else None
    flops = mae_flops_per_image(flop_cfg or _peer_cfg_from_model(cfg))
    ips = [args.batch / t for t in times]
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
        "config": args.config, "batch": args.batch, "params": int(n_params),
        "overrides": args.set, "dtype": cfg.dtype, "microbatch": ocfg.microbatch,
        "num_devices": n_dev,
        "warmup_s": warm_times, "first_step_s": warm_times[0] if warm_times else None,
        "step_s": times, "median_step_s": statistics.median(times),
        "img_s_median": med_ips, "img_s_min": min(ips), "img_s_max": max(ips),
        "train_gflop_per_img": flops["train_flops"] / 1e9, "gflops": gflops,
        "peak_gflops": peak, "mfu": (gflops / peak) if peak else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        "foreign_cores_per_step": foreign,
        "foreign_cores_mean": (sum(foreign) / len(foreign)) if None not in foreign else None,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
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
    print(f"[cosmic_jax/jit] {args.config} bs{args.batch} params={n_params / 1e6:.2f}M "
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
