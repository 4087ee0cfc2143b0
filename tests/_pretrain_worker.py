"""Subprocess entry for the resume / multi-process tests: ``train_and_evaluate`` plus fault injection.

usage: python tests/_pretrain_worker.py DATA WORKDIR [--kill-at STEP] [key=value ...]
--kill-at N sends SIGKILL to this very process right after step N (no cleanup, no final save),
emulating a crashed or preempted job.
"""

import argparse
import os
import signal
import sys

from absl import flags

flags.FLAGS.mark_as_parsed()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("workdir")
    ap.add_argument("--config", default="test")
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()

    from cosmic_jax.configs.pretrain import get_config
    from cosmic_jax.train.loop import Hook
    from cosmic_jax.train.pretrain import train_and_evaluate

    hooks = ()
    if args.kill_at:
        def die(step, state):
            if step == args.kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        hooks = (Hook(1, die, "kill", at_end=False),)
    cfg = get_config(args.config, args.overrides)
    out = train_and_evaluate(cfg, args.data, args.workdir, extra_hooks=hooks)
    print(f"WORKER DONE step={out['step']} start={out['start_step']}", flush=True)


if __name__ == "__main__":
    main()
