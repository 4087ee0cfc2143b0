"""Robustness of tests/test_pretrain.py::test_probe_rises_with_training over model and data seeds.

Runs the test's probe run (same config) for each (model seed, data seed) and prints the step-0 and
final kNN / linear probe accuracies and their rise.

usage: python experiments/probe_rise_seeds.py --seeds 3 4 5 --data-seeds 11 21 [--steps 150]
"""

import argparse
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..", "tests"), os.path.join(here, "..")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[11])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("extra", nargs="*", help="more key=value overrides")
    args = ap.parse_args()

    from _train_helpers import enable_compile_cache, write_chromatin_dataset
    from cosmic_jax.configs.pretrain import get_config
    from cosmic_jax.train.pretrain import train_and_evaluate

    enable_compile_cache()
    tmp = tempfile.mkdtemp(prefix="probe_rise_")
    for ds in args.data_seeds:
        train = write_chromatin_dataset(os.path.join(tmp, f"train{ds}"), 192, seed=ds, mixed=True)
        probe = write_chromatin_dataset(os.path.join(tmp, f"probe{ds}"), 256, seed=ds + 1)
        for seed in args.seeds:
            s = args.steps
            cfg = get_config("test", [
                f"steps={s}", f"probe_every={s}", f"probe_data={probe}", "probe_at_start=true",
                "recon_every=0", f"ckpt_every={s}", "log_every=10", "progress=false", f"seed={seed}",
                "mesh.num_devices=1", "loader.global_batch=32", "loader.read_threads=1",
                "optim.lr=2e-3", "optim.warmup_steps=20",
            ] + args.extra)
            w = os.path.join(tmp, f"w{ds}_{seed}")
            train_and_evaluate(cfg, train, w)
            rows = {r["step"]: r for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
                    if "probe/knn_acc" in r}
            a, b = rows[0], rows[s]
            loss = [r["loss"] for r in map(json.loads, open(os.path.join(w, "metrics.jsonl"))) if "loss" in r]
            print(f"data {ds} seed {seed}: knn {a['probe/knn_acc']:.3f} -> {b['probe/knn_acc']:.3f} "
                  f"(+{b['probe/knn_acc'] - a['probe/knn_acc']:.3f})  linear {a['probe/linear_acc']:.3f} -> "
                  f"{b['probe/linear_acc']:.3f} (+{b['probe/linear_acc'] - a['probe/linear_acc']:.3f})  "
                  f"chance {a['probe/chance']:.3f}  loss {' '.join(f'{x:.3f}' for x in loss[::3])}", flush=True)


if __name__ == "__main__":
    main()
