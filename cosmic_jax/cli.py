"""The ``cosmic`` console script: a thin dispatcher over the command modules.

Each module in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, adding its sub-commands
with ``set_defaults(func=...)``; heavy imports (jax, flax) stay inside the command functions so
``cosmic --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_COMMAND_MODULES = (
    "data_builders.cli",  # cosmic data nuclei | synthetic | tfds
    "cosmic_jax.train.cli",  # cosmic pretrain
    "cosmic_jax.embed.cli",  # cosmic embed | export
    "cosmic_jax.joint.cli",  # cosmic fit-joint
    "cosmic_jax.analysis.cli",  # cosmic analyze
)

# commands whose XLA runs allocate large per-call temp buffers (huge-page malloc helps them)
_XLA_HEAVY_COMMANDS = ("pretrain", "embed", "fit-joint", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmic", description="COSMIC in JAX: nuclei crops, MAE pretraining, embeddings, joint model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency, not a command not yet written
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    # grain workers read absl flags; mark them parsed since argparse owns the command line.
    flags.FLAGS.mark_as_parsed()
    args = build_parser().parse_args(argv)
    if argv is None and args.command in _XLA_HEAVY_COMMANDS:
        from cosmic_jax.runtime import reexec_with_hugepage_malloc

        reexec_with_hugepage_malloc()  # before jax starts; see cosmic_jax/runtime.py
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as e:
        # Input errors (and a diverged run's non-finite loss) already name the file/record/key/step
        # at fault; a traceback adds nothing.
        if os.environ.get("COSMIC_TRACEBACK"):
            raise
        print(f"cosmic {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
