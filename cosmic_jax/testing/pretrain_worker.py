"""Subprocess entry for the resume / multi-process tests: ``train_and_evaluate`` plus fault injection.

usage: python -m cosmic_jax.testing.pretrain_worker DATA WORKDIR [--config NAME] [--kill-at STEP]
       [--config.KEY=VALUE ...]
--kill-at N sends SIGKILL to this very process right after step N (no cleanup, no final save),
emulating a crashed or preempted job.
"""

import argparse
import os
import signal
import sys

from absl import flags

from cosmic_jax.configs import pretrain
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.train.loop import Hook
from cosmic_jax.train.pretrain import train_and_evaluate

flags.FLAGS.mark_as_parsed()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("workdir")
    ap.add_argument("--config", default="test")
    ap.add_argument("--kill-at", type=int, default=0)
    args, overrides = ap.parse_known_args()

    hooks = ()
    if args.kill_at:
        def die(step, state):
            if step == args.kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        hooks = (Hook(1, die, "kill", at_end=False),)
    out = train_and_evaluate(load_config(pretrain, args.config, overrides), args.data, args.workdir, extra_hooks=hooks)
    print(f"WORKER DONE step={out['step']} start={out['start_step']}", flush=True)


if __name__ == "__main__":
    main()
