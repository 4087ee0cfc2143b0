"""The one way to pick and override a config, on every command and in Python.

A config module ``cosmic_jax/configs/<name>.py`` has ``get_config(arg) -> ml_collections.ConfigDict``
(``arg`` names a variant, big_vision style). Overrides are absl/ml_collections config flags:

    cosmic pretrain --config vit_s8_64 --config.optim.lr=3e-4 --config.model.mask_ratio=0.6
    load_config(pretrain, "vit_s8_64", ["--config.optim.lr=3e-4"])

Values are parsed by the type of the field they replace (ml_collections' parsers: ``1e3`` is not an
int, ``true``/``false`` are bools, tuples as ``(1,2)`` or ``1,2``); unknown keys are errors. Saved
configs (``save``/``load``) are JSON of the resolved ConfigDict, written atomically.
"""

from __future__ import annotations

import difflib
import json
import os
import types
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(ValueError):
    """A config name, override or saved config is wrong; the message names it."""


def load_config(module: types.ModuleType, name: str | None = None,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``module.get_config(name)`` with ``--config.a.b=value`` overrides applied.

    Args:
      module: a config module of this package (has ``get_config`` and ``VARIANTS``).
      name: variant name (None = the module's default).
      overrides: command-line style items, ``--config.key=value`` (or ``--config.key value``).

    Returns:
      the locked ConfigDict (assigning an unknown key raises).
    """
    variants = getattr(module, "VARIANTS", ())
    if name is not None and variants and name not in variants:
        raise ConfigError(f"unknown {module.__name__.rsplit('.', 1)[-1]} config {name!r}; "
                          f"choose from {', '.join(variants)}")
    cfg = module.get_config(name) if name is not None else module.get_config()
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``--config.key=value`` items to ``cfg`` (in place, also returned)."""
    items = list(overrides)
    known = flatten(cfg)
    for item in items:
        if not item.startswith("-"):
            continue  # the value of a preceding "--config.key value"
        if not item.lstrip("-").startswith("config."):
            raise ConfigError(f"unrecognised argument {item!r} (config overrides look like --config.key=value)")
        key = item.lstrip("-").split("=", 1)[0][len("config."):]
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"config override {item!r}: unknown key {key!r}{hint}")
    if not items:
        cfg.lock()
        return cfg
    fv = flags.FlagValues()
    argv = ["cosmic"] + items
    config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, sys_argv=argv)
    try:
        rest = fv(argv, known_only=False)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config override {' '.join(items)}: {text}") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument(s) {rest[1:]} among the config overrides")
    out = fv["config"].value
    out.lock()
    return out


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{"a.b": value} of every leaf (used in messages and to diff two configs)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """Dotted keys whose values differ between two configs (or exist in one only)."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if _norm(fa.get(k)) != _norm(fb.get(k)))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Plain nested dict (tuples as lists): the JSON form of a config."""
    return json.loads(cfg.to_json_best_effort())


def save(cfg: ml_collections.ConfigDict, path: str) -> str:
    """Write the resolved config as JSON, atomically (a crash never leaves half a file)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(cfg.to_json_best_effort(indent=1, sort_keys=True))
        f.write("\n")
    os.replace(tmp, path)
    return path


def load(path: str, template: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Read a config written by ``save``.

    Args:
      path: the JSON file.
      template: a config of the same kind (e.g. ``get_config()``); the saved values are written
        into a copy of it, so field types (tuples, optional fields) come back as defined. Keys the
        template lacks are an error naming the file; keys the file lacks keep the template's value
        (a config written by an older version).

    Returns:
      the locked ConfigDict.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no saved config") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: corrupt config JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a config (expected a JSON object)")
    if template is None:
        cfg = ml_collections.ConfigDict(data)
    else:
        cfg = ml_collections.ConfigDict(template.to_dict())
        try:
            _merge(cfg, data, "")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None
    cfg.lock()
    return cfg


def _merge(cfg: ml_collections.ConfigDict, data: dict, prefix: str) -> None:
    for k, v in data.items():
        if k not in cfg:
            raise KeyError(f"unknown key {prefix}{k!r}")
        cur = cfg[k]
        if isinstance(cur, ml_collections.ConfigDict):
            if not isinstance(v, dict):
                raise TypeError(f"{prefix}{k} must be a group, got {v!r}")
            _merge(cur, v, f"{prefix}{k}.")
            continue
        if isinstance(v, list):
            v = tuple(v)
        cfg[k] = v


def frozen(cfg) -> ml_collections.FrozenConfigDict:
    """Immutable, hashable copy (static jit arguments, flax module attributes, cache keys).

    Built from the plain values, locked: two configs with equal values give equal, equally hashed
    frozen copies whatever their lock state or history.
    """
    c = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    c.lock()
    return ml_collections.FrozenConfigDict(c)
