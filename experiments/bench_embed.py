"""Embedding inference throughput: ``Embedder.embed`` vs the HF ViTMAE torch-eager peer.

Protocol (same as ../shared/bench/peer_torch_embed.py): vit_s8_64, all 64 patches (no mask),
mean of patch tokens after the final LayerNorm, float32, batch 256, synthetic N(0, 1) single-channel
64x64 images (4 batches cycled), 3 warm-up batches, 10 timed batches, median images/s. One timed
batch = one ``Embedder.embed(numpy (256, 64, 64, 1))`` call: host->device copy, the jitted
forward, device->host copy of the (256, 384) result: the public API's whole cost.

  # one JAX run (prints one JSON line); smoke: --config vit_test --batch 64 --warmup 1 --steps 2
  python experiments/bench_embed.py --mode jax
  # REPS x (jax, torch peer) alternating, each in a fresh subprocess; appends to --json
  python experiments/bench_embed.py --compare --reps 3 --json bench_out/embed.jsonl

``--config`` names the model variant (``configs/mae.py``); ``--config.KEY=VALUE`` overrides its fields
(JAX side only: timings so made are not the peer comparison). The peer script and its venv are found in
``<repo>/../shared/bench`` (``--bench-dir``, ``--peer-python``); ``bash ../shared/bench/setup_peers.sh``
makes the venv.

Shared-machine accounting: the 2 cores are also used by other sandboxes (invisible) and by
other engineers' processes in ours (visible), so per run we record ``others_cores`` = machine-wide
busy CPU (/proc/stat) minus the benchmark child's own CPU (wait4 rusage), per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

import peers
from cosmic_jax.configs import mae as mae_configs
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.embed import Embedder
from cosmic_jax.models.mae import abstract_params, model_config
from cosmic_jax.runtime import HUGEPAGE_TUNABLE, apply_cpu_devices

_HZ = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _HZ  # all but idle + iowait


def run_jax(args, overrides: list[str]) -> dict:
    cfg = model_config(load_config(mae_configs, args.config, overrides))
    rng = np.random.default_rng(0)
    # Random weights of the right tree, built in numpy: speed does not depend on their values.
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), abstract_params(cfg))
    # The peer embeds one mean token of the last block; compare like with like (the package's default
    # read-out averages 8 dihedral views of two blocks: 8x the forward work).
    emb = Embedder(cfg, params, layer=-1, pool="mean", dihedral=False, batch_size=args.batch, progress=False)
    batches = [rng.normal(size=(args.batch, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
               for _ in range(4)]
    t0 = time.perf_counter()
    emb.embed(batches[0])
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        emb.embed(batches[i % 4])
    times, cpu = [], []
    for i in range(args.steps):
        c0, m0, t0 = time.process_time(), _machine_busy_s(), time.perf_counter()
        out = emb.embed(batches[i % 4])
        dt = time.perf_counter() - t0
        own, machine = time.process_time() - c0, _machine_busy_s() - m0
        times.append(dt)
        cpu.append({"own_cores": own / dt, "others_cores": max(0.0, machine - own) / dt})
    assert out.shape == (args.batch, cfg.hidden) and np.isfinite(out).all()
    ips = [args.batch / t for t in times]
    return {
        "kind": "embed", "peer": "cosmic_jax-Embedder", "mode": "jit-inference", "config": args.config,
        "overrides": overrides, "dtype": cfg.dtype, "batch": args.batch, "num_devices": emb.num_devices, "micro_batch": emb.micro_batch, "step_s": times, "img_s_median": statistics.median(ips),
        "img_s_min": min(ips), "img_s_max": max(ips), "first_call_s": first,
        "others_cores_per_step": [c["others_cores"] for c in cpu],
        "own_cores_mean": statistics.mean(c["own_cores"] for c in cpu),
        "versions": {"jax": jax.__version__}, "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _child(cmd: list[str], env: dict) -> dict:
    """Run one benchmark process to completion; returns its stdout, wall time and machine CPU."""
    m0, t0 = _machine_busy_s(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd[1]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"stdout": proc.stdout, "wall_s": wall, "machine_busy_s": _machine_busy_s() - m0}


def compare(args, overrides: list[str]) -> list[dict]:
    peer_py = peers.peer_python(args.bench_dir, ".venv-peer-torch", args.peer_python)
    peer = os.path.join(peers.bench_dir(args.bench_dir), "peer_torch_embed.py")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the child splits the CPU host per --cpu-devices
    env["JAX_PLATFORMS"] = "cpu"
    # what `cosmic embed` runs with (cosmic_jax/runtime.py); the torch peer gets it too, for fairness
    env["GLIBC_TUNABLES"] = HUGEPAGE_TUNABLE
    results = []
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else "/tmp", ".peer_embed.jsonl")
    for rep in range(args.reps):
        order = ("jax", "torch") if rep % 2 == 0 else ("torch", "jax")  # alternate who goes first
        for who in order:
            if who == "jax":
                cmd = [sys.executable, os.path.abspath(__file__), "--mode", "jax", "--config", args.config,
                       "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--cpu-devices", str(args.cpu_devices), *overrides]
            else:
                if os.path.exists(tmp):
                    os.remove(tmp)
                cmd = [peer_py, peer, "--config", args.config, "--batch", str(args.batch), "--warmup",
                       str(args.warmup), "--steps", str(args.steps), "--json", tmp]
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            info = _child(cmd, env)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            child_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            if who == "jax":
                res = json.loads(info["stdout"].strip().splitlines()[-1])
            elif not os.path.exists(tmp):
                raise SystemExit(f"{peer} ({peer_py}) wrote no result to {tmp}; its output: {info['stdout'][-500:]!r}")
            else:
                with open(tmp) as f:
                    res = json.loads(f.read().strip().splitlines()[-1])
            res["rep"] = rep
            res["process_wall_s"] = info["wall_s"]
            res["others_cores_process"] = max(0.0, info["machine_busy_s"] - child_cpu) / info["wall_s"]
            results.append(res)
            print(f"[rep {rep}] {res['peer']:<24} median {res['img_s_median']:7.1f} img/s "
                  f"(min {res['img_s_min']:.1f} max {res['img_s_max']:.1f}) | other load "
                  f"{res['others_cores_process']:.2f} cores", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
    jx = [r["img_s_median"] for r in results if r["peer"].startswith("cosmic")]
    th = [r["img_s_median"] for r in results if not r["peer"].startswith("cosmic")]
    print(f"jax median of medians {statistics.median(jx):.1f} img/s; torch {statistics.median(th):.1f} img/s; "
          f"ratio {statistics.median(jx) / statistics.median(th):.2f}x")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("jax",), default="jax")
    ap.add_argument("--compare", action="store_true", help="alternate jax and the torch peer")
    ap.add_argument("--config", default="vit_s8_64", choices=mae_configs.VARIANTS,
                    help="model variant; --config.KEY=VALUE overrides its fields")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None, help="append results (JSONL)")
    ap.add_argument("--cpu-devices", type=int, default=-1,
                    help="split a CPU host into N XLA devices for the Embedder (-1 = auto, as "
                         "`cosmic embed`; 1 = one device)")
    peers.add_arguments(ap, peer_python=True)
    args, overrides = ap.parse_known_args(argv)
    try:
        load_config(mae_configs, args.config, overrides)  # bad keys fail here, before any child runs
    except ConfigError as err:
        ap.error(str(err))
    if args.compare:
        compare(args, overrides)
        return
    apply_cpu_devices(args.cpu_devices, args.batch)
    res = run_jax(args, overrides)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
