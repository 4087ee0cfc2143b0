"""``cosmic pretrain --config NAME --data DIR --workdir W --steps N [--config.KEY=VALUE ...]``.

Running the same command again resumes from the newest checkpoint in W; without --config a resumed
run reuses the config saved in W (W/config.json).
"""

from __future__ import annotations

import logging
import os

from cosmic_jax.commands import add_config, setup_logging
from cosmic_jax.configs import pretrain as pretrain_configs
from cosmic_jax.configs.overrides import apply_overrides
from cosmic_jax.runtime import apply_cpu_devices

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain the ViT MAE on a crop dataset (resumes from --workdir)",
        description=pretrain_configs.__doc__,
        epilog="example: cosmic pretrain --config test --data crops --workdir runs/a --steps 200 --config.optim.lr=5e-4")
    p.add_argument("--data", required=True, help="crop dataset directory (cosmic data nuclei|synthetic|paired)")
    p.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (same as --config.steps)")
    add_config(p, pretrain_configs, None)
    p.set_defaults(func=run)


def run(args) -> int:
    setup_logging()
    # jax loads here, not at `cosmic --help` time
    from cosmic_jax.train.pretrain import load_run_config, train_and_evaluate

    cfg = args.cfg
    if args.config is None and os.path.exists(os.path.join(args.workdir, "config.json")):
        # no --config: a resumed run keeps its saved config (overrides still apply on top)
        cfg = apply_overrides(load_run_config(args.workdir), args.config_overrides)
    split_cpu_host(cfg)
    out = train_and_evaluate(cfg, args.data, args.workdir)
    print(f"pretrain: finished at step {out['step']} (started at {out['start_step']}); workdir {args.workdir}")
    return 0


def split_cpu_host(cfg) -> None:
    """Apply ``mesh.cpu_devices`` before JAX starts (a no-op on GPU/TPU hosts; see runtime.py)."""
    # Each process splits its own host by its share of the batch (known before jax.distributed starts
    # only when the process count is given; auto-detected clusters count as one process here).
    procs = cfg.distributed.num_processes or int(os.environ.get("COSMIC_NUM_PROCESSES", "0") or 0) or 1
    n = apply_cpu_devices(cfg.mesh.cpu_devices, cfg.loader.global_batch // procs)
    if n:
        log.info("CPU host split into %d XLA devices (--config.mesh.cpu_devices=0 turns this off)", n)
