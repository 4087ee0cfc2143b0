"""The ``cosmic`` console script: one parser, one config system, one-line errors.

Commands come from ``cosmic_jax.commands`` and from the ``cosmic.commands`` entry points of other
installed packages (``data_builders`` registers ``cosmic data ...`` that way, so this package never
imports it). Each command module has ``register(subparsers)`` and sets ``func`` (and ``config_module``
when it takes ``--config NAME --config.key=value``). The command modules import only argparse and
the config modules at start-up; jax and friends load inside the command functions, which keeps
``cosmic --help`` fast (measured in BUILD_NOTES.md, "Layout").
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from cosmic_jax.commands import analyze, embed, fit_joint, pretrain, report
from cosmic_jax.configs.overrides import ConfigError, load_config
from cosmic_jax.runtime import enable_compilation_cache, reexec_with_hugepage_malloc

_COMMANDS = (pretrain, embed, fit_joint, analyze, report)
ENTRY_POINT_GROUP = "cosmic.commands"

# commands whose XLA runs allocate large per-call temp buffers (huge-page malloc helps them)
_XLA_HEAVY_COMMANDS = ("pretrain", "embed", "export", "fit-joint", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmic",
        description="COSMIC in JAX: nuclei crops, MAE pretraining, embeddings, joint model, analyses. "
                    "Every command takes --config NAME and --config.key=value overrides where it has settings.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    config_module = getattr(args, "config_module", None)
    try:
        if config_module is not None:
            if getattr(args, "steps", None) is not None:  # --steps N is --config.steps=N
                extra = extra + [f"--config.steps={args.steps}"]
            args.config_overrides = extra
            if getattr(args, "quick", False):
                if args.config not in (None, "quick"):
                    raise ConfigError(f"--quick and --config {args.config} contradict each other")
                args.config = "quick"
            args.cfg = load_config(config_module, args.config, extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command in _XLA_HEAVY_COMMANDS:
            enable_compilation_cache()  # before jax is imported; see cosmic_jax/runtime.py
            if argv is None:
                reexec_with_hugepage_malloc()
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, FloatingPointError, ConfigError) as e:
        # Input errors (and a diverged run's non-finite loss) already name the file/record/key/step
        # at fault; a traceback adds nothing.
        if os.environ.get("COSMIC_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cosmic {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
