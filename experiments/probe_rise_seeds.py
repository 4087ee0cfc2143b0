"""Robustness of tests/test_pretrain.py::test_probe_rises_with_training over model and data seeds.

Runs the test's probe run (same config) for each (model seed, data seed) and prints the step-0 and
final kNN / linear probe accuracies and their rise.

usage: python experiments/probe_rise_seeds.py --seeds 3 4 5 --data-seeds 11 21 [--steps 250] [--config.KEY=VALUE ...]
smoke: python experiments/probe_rise_seeds.py --seeds 3 --steps 20
"""

import argparse
import os
import tempfile

from absl import flags

from cosmic_jax.configs import pretrain
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.testing.runs import enable_compile_cache, read_jsonl
from cosmic_jax.train.pretrain import train_and_evaluate
from data_builders.probe_crops import write_chromatin_dataset

flags.FLAGS.mark_as_parsed()


def run_config(steps: int, probe_dir: str, seed: int, extra: list[str]):
    """The config of test_probe_rises_with_training (warmup 8% of the run) with ``extra`` overrides."""
    items = [f"steps={steps}", f"probe_every={steps}", f"probe_data={probe_dir}", "probe_at_start=true",
             "recon_every=0", f"ckpt_every={steps}", "log_every=10", "progress=false", f"seed={seed}",
             "mesh.num_devices=1", "loader.global_batch=32", "loader.read_threads=1",
             "optim.lr=2e-3", "optim.warmup_fraction=0.08"]
    return load_config(pretrain, "test", [f"--config.{x}" for x in items] + extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--data-seeds", type=int, nargs="+", default=[11])
    ap.add_argument("--steps", type=int, default=250)
    args, extra = ap.parse_known_args()
    try:
        run_config(args.steps, "", 0, extra)
    except ConfigError as err:
        ap.error(str(err))

    enable_compile_cache()
    with tempfile.TemporaryDirectory(prefix="probe_rise_") as tmp:
        for ds in args.data_seeds:
            train = write_chromatin_dataset(os.path.join(tmp, f"train{ds}"), 192, seed=ds, mixed=True)
            probe = write_chromatin_dataset(os.path.join(tmp, f"probe{ds}"), 256, seed=ds + 1)
            for seed in args.seeds:
                s = args.steps
                w = os.path.join(tmp, f"w{ds}_{seed}")
                train_and_evaluate(run_config(s, probe, seed, extra), train, w)
                metrics = read_jsonl(os.path.join(w, "metrics.jsonl"))
                rows = {r["step"]: r for r in metrics if "probe/knn_acc" in r}
                a, b = rows[0], rows[s]
                loss = [r["loss"] for r in metrics if "loss" in r]
                print(f"data {ds} seed {seed}: knn {a['probe/knn_acc']:.3f} -> {b['probe/knn_acc']:.3f} "
                      f"(+{b['probe/knn_acc'] - a['probe/knn_acc']:.3f})  linear {a['probe/linear_acc']:.3f} -> "
                      f"{b['probe/linear_acc']:.3f} (+{b['probe/linear_acc'] - a['probe/linear_acc']:.3f})  "
                      f"chance {a['probe/chance']:.3f}  loss {' '.join(f'{x:.3f}' for x in loss[::3])}", flush=True)


if __name__ == "__main__":
    main()
