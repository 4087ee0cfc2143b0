"""The export directory format: names, hashes, verified reading, and the program's read-out label.

Reading is a lower layer than the :class:`~cosmic_jax.embed.embedder.Embedder` (which runs a loaded
export) and writing (``export.py``, which exports an Embedder) is a higher one, so the layers point
one way: ``artifact`` <- ``embedder`` <- ``export``.

The StableHLO program is what an export *is*: ``load_export`` deserialises it and refuses an export
whose ``config.json`` disagrees with the program (read-out, input shape, output width, weights), so
an edited config can never relabel what the program computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from cosmic_jax.models.mae import model_config

FORMAT = "cosmic-embed-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_HLO = "encoder.stablehlo"
FULL_WEIGHTS = "mae.safetensors"

# The exported function's name, serialised inside encoder.stablehlo: the read-out it computes.
_LABEL = re.compile(r"cosmic_readout__layer_(?P<layer>[0-9_]+)__pool_(?P<pool>[a-z_]+?)__dihedral_(?P<dihedral>[01])")


class ExportError(ValueError):
    """An export directory is missing, tampered with, or of another format; names the file."""


@dataclasses.dataclass
class ExportBundle:
    """A verified export: ``config`` (config.json), ``model_cfg`` (MAEConfig), ``params`` (nested
    encoder weights), ``program`` (the deserialised ``jax.export.Exported`` forward)."""

    path: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    model_cfg: Any
    params: dict[str, Any]
    full_params: dict[str, Any] | None
    program: jax.export.Exported


# ---------------------------------------------------------------------- flat <-> nested params
def flat_items(tree: Any, path: tuple[str, ...] = ()):
    """(key, leaf) pairs of a nested mapping, key = '/'.join(path)."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        for k, v in tree.items():
            if "/" in str(k):
                raise ValueError(f"param name {'/'.join(path + (str(k),))!r} contains '/'")
            yield from flat_items(v, path + (str(k),))
    else:
        yield "/".join(path), tree


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """Nested param dict -> {'a/b/kernel': np.ndarray}; names must not contain '/'."""
    return {k: np.asarray(v) for k, v in flat_items(params)}


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params` (works on numpy and on traced jax arrays)."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- read-out label
def readout_label(layer_index: int | list[int], pool: str, dihedral: bool) -> str:
    """Name of the exported function for a read-out (block indices 0..depth-1), e.g.
    ``cosmic_readout__layer_3_5__pool_mean_std__dihedral_1``."""
    layers = [layer_index] if isinstance(layer_index, int) else list(layer_index)
    return f"cosmic_readout__layer_{'_'.join(str(int(li)) for li in layers)}__pool_{pool}__dihedral_{int(bool(dihedral))}"


def _parse_label(name: str) -> dict[str, Any] | None:
    m = _LABEL.fullmatch(name)
    if m is None:
        return None
    return {"layer_index": [int(li) for li in m["layer"].split("_")], "pool": m["pool"],
            "dihedral": m["dihedral"] == "1"}


# ---------------------------------------------------------------------- reading
def _read_json(path: str, data: bytes) -> dict[str, Any]:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e


def check_format(path: str, d: dict[str, Any]) -> None:
    if d.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file (format={d.get('format')!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: unsupported format_version {d.get('format_version')!r}; this "
                          f"cosmic_jax reads version {FORMAT_VERSION}")


def read_verified(path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read an export's manifest and every file it lists, checking format version and sha256.

    Args:
      path: export directory.

    Returns:
      (manifest dict, {file name: verified bytes}).
    """
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        if not os.path.isdir(path):
            raise ExportError(f"export directory not found: {path}")
        raise ExportError(f"{mpath}: missing; is {path} a cosmic export?")
    with open(mpath, "rb") as f:
        manifest = _read_json(mpath, f.read())
    check_format(mpath, manifest)
    listed = manifest.get("files") or {}
    for required in (CONFIG, ENCODER_WEIGHTS, ENCODER_HLO):
        if required not in listed:
            raise ExportError(f"{mpath}: does not list required file {required}")
    data: dict[str, bytes] = {}
    for name, info in listed.items():
        fpath = os.path.join(path, name)
        if os.path.basename(name) != name:
            raise ExportError(f"{mpath}: file name {name!r} is not a plain file name")
        if not os.path.isfile(fpath):
            raise ExportError(f"{fpath}: listed in the manifest but missing")
        with open(fpath, "rb") as f:
            blob = f.read()
        digest = sha256(blob)
        if digest != info.get("sha256"):
            raise ExportError(f"{fpath}: sha256 {digest[:12]}... does not match the manifest "
                              f"({str(info.get('sha256'))[:12]}...): file changed or corrupted")
        data[name] = blob
    return manifest, data


def check_program(path: str, config: dict[str, Any], model_cfg: Any, weights: dict[str, np.ndarray],
                  program: jax.export.Exported) -> None:
    """Refuse an export whose config.json or weights disagree with its StableHLO program.

    Checked: the read-out (layer, pool, dihedral) against the program's label, the image shape
    and output width against the program's signature, and every weight's name/shape/dtype
    against the program's arguments.

    Raises:
      ExportError naming the export directory and the field that disagrees.
    """
    def refuse(field: str, said: Any, program_has: Any) -> ExportError:
        return ExportError(f"{path}: {CONFIG} {field} = {said!r} but {ENCODER_HLO} computes {program_has!r} "
                           f"(config and program disagree; edited {CONFIG}?)")

    label = _parse_label(program.fun_name)
    if label is None:
        raise ExportError(f"{os.path.join(path, ENCODER_HLO)}: program {program.fun_name!r} carries no read-out "
                          "label (written by an older cosmic_jax?); re-export it with `cosmic export`")
    emb = config.get("embedding") or {}
    depth = int(model_cfg.depth)
    if emb.get("depth") != depth:
        raise refuse("embedding.depth", emb.get("depth"), depth)
    layer = emb.get("layer")
    try:
        said_index = [int(li) % depth for li in (layer if isinstance(layer, list) else [layer])]
    except (TypeError, ValueError):
        raise ExportError(f"{path}: {CONFIG} embedding.layer = {layer!r} is not an int or a list of ints") from None
    if said_index != label["layer_index"]:
        raise refuse("embedding.layer", layer, label["layer_index"])
    for field in ("pool", "dihedral"):
        if emb.get(field) != label[field]:
            raise refuse(f"embedding.{field}", emb.get(field), label[field])

    try:
        (w_avals, x_aval), kw = jax.tree_util.tree_unflatten(program.in_tree, program.in_avals)
    except ValueError:
        raise ExportError(f"{os.path.join(path, ENCODER_HLO)}: not a (weights, images) program") from None
    said_shape = list(config["input"]["shape"])
    if kw or not isinstance(w_avals, dict) or list(x_aval.shape[1:]) != said_shape:
        raise refuse("input.shape", said_shape, [str(d) for d in x_aval.shape[1:]])
    (out,) = program.out_avals
    said_dim = config.get("output", {}).get("shape", [None, None])[-1]
    if out.shape[-1] != said_dim:
        raise refuse("output.shape", config.get("output", {}).get("shape"), ["b", int(out.shape[-1])])
    wpath = os.path.join(path, ENCODER_WEIGHTS)
    for key in sorted(set(w_avals) | set(weights)):
        want, got = w_avals.get(key), weights.get(key)
        if want is None or got is None or tuple(want.shape) != got.shape or want.dtype != got.dtype:
            raise ExportError(f"{wpath}: weight {key!r} is {None if got is None else (got.shape, str(got.dtype))} "
                              f"but {ENCODER_HLO} takes {None if want is None else (want.shape, str(want.dtype))}")


def load_export(path: str) -> ExportBundle:
    """Verify and load an export directory.

    Args:
      path: export directory written by :func:`cosmic_jax.embed.export.export_embedder`.

    Returns:
      An :class:`ExportBundle` with nested numpy params (encoder; full MAE if exported) and the
      deserialised program, after :func:`check_program`.
    """
    manifest, data = read_verified(path)
    cpath = os.path.join(path, CONFIG)
    config = _read_json(cpath, data[CONFIG])
    check_format(cpath, config)
    try:
        model_cfg = model_config(config["model_config"])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{cpath}: model_config does not fit this cosmic_jax ({e})") from e
    if list(config["input"]["shape"]) != [model_cfg.image_size, model_cfg.image_size, model_cfg.channels]:
        raise ExportError(f"{cpath}: input shape {config['input']['shape']} disagrees with model_config")

    def weights(name: str) -> dict[str, np.ndarray]:
        try:
            return safetensors.numpy.load(data[name])
        except Exception as e:  # safetensors raises its own error types
            raise ExportError(f"{os.path.join(path, name)}: unreadable safetensors ({e})") from e

    try:
        program = jax.export.deserialize(bytearray(data[ENCODER_HLO]))
    except Exception as e:  # flatbuffers / jax raise assorted types on a bad blob
        raise ExportError(f"{os.path.join(path, ENCODER_HLO)}: not a jax.export program ({e})") from e
    enc = weights(ENCODER_WEIGHTS)
    check_program(path, config, model_cfg, enc, program)
    full = unflatten_params(weights(FULL_WEIGHTS)) if FULL_WEIGHTS in data else None
    return ExportBundle(path=path, manifest=manifest, config=config, model_cfg=model_cfg,
                        params=unflatten_params(enc), full_params=full, program=program)
