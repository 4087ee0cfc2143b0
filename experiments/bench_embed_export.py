"""Embedding throughput through an export's StableHLO program vs the model itself, in one process.

``Embedder.from_export`` runs the exported program (``jax.export`` deserialise + call, its symbolic
batch set per micro-batch pass); the checkpoint path runs ``MAE.encode`` built from params (the
in-memory Embedder here: ``from_checkpoint`` only loads the params, its hot path is the same).
Both see the same random vit weights, the same batches and the same batch/micro-batch/device split;
timed batches alternate between the two, and we report median img/s and process CPU-s per image.

  python experiments/bench_embed_export.py --config vit_s8_64 --batch 64 --steps 4 --json out.jsonl
  python experiments/bench_embed_export.py --config vit_test --batch 16 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from cosmic_jax.runtime import apply_cpu_devices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vit_s8_64", help="model variant (configs/mae.py)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed batches per side")
    ap.add_argument("--no-dihedral", action="store_true", help="read-out without the 8-view average")
    ap.add_argument("--cpu-devices", type=int, default=-1, help="as `cosmic embed` (-1 = auto)")
    ap.add_argument("--json", default=None, help="append the result line here")
    args = ap.parse_args()
    apply_cpu_devices(args.cpu_devices, args.batch)  # before jax loads

    import jax
    import numpy as np

    from cosmic_jax.configs import mae as mae_configs
    from cosmic_jax.configs.overrides import load_config
    from cosmic_jax.embed import Embedder, export_embedder
    from cosmic_jax.models.mae import abstract_params, model_config

    cfg = model_config(load_config(mae_configs, args.config, []))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), abstract_params(cfg))
    kw = dict(batch_size=args.batch, progress=False, dihedral=not args.no_dihedral)
    model = Embedder(cfg, params, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_embedder(model, f"{tmp}/export")
        export_s = time.perf_counter() - t0
        program = Embedder.from_export(f"{tmp}/export", batch_size=args.batch, progress=False)
    batches = [rng.normal(size=(args.batch, *model.input_shape)).astype(np.float32) for _ in range(2)]
    sides = {"model": model, "export": program}
    first, times, cpu = {}, {k: [] for k in sides}, {k: [] for k in sides}
    for name, e in sides.items():
        t0 = time.perf_counter()
        e.embed(batches[0])
        first[name] = time.perf_counter() - t0
    for i in range(args.steps):
        for name, e in (sides.items() if i % 2 == 0 else reversed(sides.items())):
            c0, t0 = time.process_time(), time.perf_counter()
            e.embed(batches[i % 2])
            times[name].append(time.perf_counter() - t0)
            cpu[name].append((time.process_time() - c0) / args.batch)
    diff = float(np.abs(model.embed(batches[0]) - program.embed(batches[0])).max())
    rec = {
        "kind": "embed_export", "config": args.config, "batch": args.batch, "readout": model.readout(),
        "num_devices": model.num_devices, "micro_batch": model.micro_batch, "dim": model.dim,
        "export_s": export_s, "first_call_s": first, "max_abs_diff": diff,
        **{f"{k}_img_s": [args.batch / t for t in v] for k, v in times.items()},
        **{f"{k}_img_s_median": statistics.median(args.batch / t for t in v) for k, v in times.items()},
        **{f"{k}_cpu_ms_per_img_median": 1e3 * statistics.median(v) for k, v in cpu.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "jax": jax.__version__,
    }
    print(json.dumps(rec))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
