"""``cosmic pretrain --config NAME --data DIR --workdir W --steps N [key=value ...]``.

Running the same command again resumes from the newest checkpoint in W.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the ViT MAE on a crop dataset (resumes from --workdir)",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "overrides: model.<MAEConfig field>, optim.<field>, loader.<field>, loader.augment.<field>,\n"
            "mesh.data / mesh.fsdp / mesh.cpu_devices, distributed.coordinator_address / num_processes / process_id,\n"
            "and top-level fields (seed, log_every, ckpt_every, recon_every, probe_every, ...).\n"
            "example: cosmic pretrain --config test --data crops --workdir runs/a --steps 200 optim.lr=5e-4"
        ),
    )
    p.add_argument("--config", default="test", help="named config (configs/pretrain.py CONFIGS)")
    p.add_argument("--data", required=True, help="crop dataset directory")
    p.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (overrides the config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import logging

    from cosmic_jax.configs.pretrain import get_config

    from absl import logging as absl_logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # orbax logs every save phase at INFO through absl; keep warnings only
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    cfg = get_config(args.config, overrides)
    _split_cpu_host(cfg)

    from cosmic_jax.train.pretrain import train_and_evaluate

    out = train_and_evaluate(cfg, args.data, args.workdir)
    print(f"pretrain: finished at step {out['step']} (started at {out['start_step']}); workdir {args.workdir}")
    return 0


def _split_cpu_host(cfg) -> None:
    """Apply ``mesh.cpu_devices`` before JAX starts (a no-op on GPU/TPU hosts; see runtime.py)."""
    import logging
    import os

    from cosmic_jax.runtime import apply_cpu_devices

    # Each process splits its own host by its share of the batch (known before jax.distributed starts
    # only when the process count is given; auto-detected clusters count as one process here).
    procs = cfg.distributed.num_processes or int(os.environ.get("COSMIC_NUM_PROCESSES", "0") or 0) or 1
    n = apply_cpu_devices(cfg.mesh.cpu_devices, cfg.loader.global_batch // procs)
    if n:
        logging.getLogger(__name__).info("CPU host split into %d XLA devices (mesh.cpu_devices=0 turns this off)", n)
