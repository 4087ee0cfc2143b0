"""Subprocess entry for the joint model's crash/resume test: ``fit_joint`` on saved arrays, optionally
killed with SIGKILL right after a step (no cleanup, no final save), as a preempted job would be.

usage: python -m cosmic_jax.testing.joint_worker DATA.npz WORKDIR [--kill-at STEP] [--config.KEY=VALUE ...]
"""

import argparse

import numpy as np

from cosmic_jax.configs import joint
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.joint.fit import fit_joint
from cosmic_jax.testing.runs import sigkill_hooks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("workdir")
    ap.add_argument("--config", default="quick")
    ap.add_argument("--kill-at", type=int, default=0)
    args, overrides = ap.parse_known_args()
    hooks = sigkill_hooks(args.kill_at)
    with np.load(args.data) as d:
        m, e = d["m"], d["e"]
    fit_joint(m, e, load_config(joint, args.config, overrides), workdir=args.workdir, hooks=hooks)
    print("JOINT WORKER DONE", flush=True)


if __name__ == "__main__":
    main()
