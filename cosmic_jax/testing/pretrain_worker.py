"""Subprocess entry for the resume / multi-process tests: ``train_and_evaluate`` plus fault injection.

usage: python -m cosmic_jax.testing.pretrain_worker DATA WORKDIR [--config NAME] [--kill-at STEP]
       [--config.KEY=VALUE ...]
--kill-at N sends SIGKILL to this very process right after step N (no cleanup, no final save),
emulating a crashed or preempted job.
"""

import argparse

from absl import flags

from cosmic_jax.configs import pretrain
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.testing.runs import sigkill_hooks
from cosmic_jax.train.pretrain import train_and_evaluate

flags.FLAGS.mark_as_parsed()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("workdir")
    ap.add_argument("--config", default="test")
    ap.add_argument("--kill-at", type=int, default=0)
    args, overrides = ap.parse_known_args()

    hooks = sigkill_hooks(args.kill_at)
    out = train_and_evaluate(load_config(pretrain, args.config, overrides), args.data, args.workdir, extra_hooks=hooks)
    print(f"WORKER DONE step={out['step']} start={out['start_step']}", flush=True)


if __name__ == "__main__":
    main()
