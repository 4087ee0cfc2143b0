"""The ``cosmic`` sub-commands: thin argument parsing over the workflows (``cosmic_jax.cli`` dispatches)."""

from __future__ import annotations

import argparse
import logging
import types

from absl import logging as absl_logging

CONFIG_HELP = "named config ({names}); override any field with --config.KEY=VALUE (see the epilog)"


def add_config(parser: argparse.ArgumentParser, module: types.ModuleType, default: str | None) -> None:
    """``--config NAME``: a variant of ``module``'s ``get_config``; the parsed config lands in ``args.cfg``."""
    names = ", ".join(module.VARIANTS)
    parser.add_argument("--config", default=default, metavar="NAME", help=CONFIG_HELP.format(names=names))
    parser.set_defaults(config_module=module)
    fields = _fields(module.get_config(default or module.VARIANTS[0]))
    parser.epilog = ((parser.epilog or "") + "\n\nconfig keys (--config.KEY=VALUE):\n  " + "\n  ".join(fields)).strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _fields(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out += _fields(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k} = {v!r}")
    return out


def setup_logging(verbose: bool = False) -> None:
    """INFO lines for our stages; third-party INFO chatter (orbax saves, absl) stays off."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    absl_logging.set_verbosity(absl_logging.DEBUG if verbose else absl_logging.ERROR)
