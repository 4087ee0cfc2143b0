"""Portable, self-contained export of a trained MAE encoder.

An export directory holds::

    manifest.json        format name + version, what each file is, sha256 + size of every file
    config.json          model name, full MAEConfig, input shape (H, W, C) + dtype + normalisation
                         rule + pose, embedding read-out (layer/pool/dihedral), training step,
                         calling convention
    encoder.safetensors  encoder weights, a flat dict keyed by '/'.join(param path)
    encoder.stablehlo    the encoder forward serialised with ``jax.export``: takes
                         (flat weights dict, float32 images (b, H, W, C)) -> float32 (b, D),
                         with a symbolic batch dimension b
    mae.safetensors      (optional, ``with_decoder``) the full MAE weights incl. the decoder

A consumer needs only jax + numpy + safetensors (``tests/_export_consumer.py`` is one):
``jax.export.deserialize(blob).call(weights, images)``; so does ``Embedder.from_export``, which runs
that program. Reading (``artifact.py``: format version, every file's sha256, config.json against
the program's read-out label and signature) is re-exported here. This module writes; it imports
the Embedder, which never imports it. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import flax.errors
import jax
import numpy as np
import safetensors.numpy
from jax.extend.core import Var

import cosmic_jax
from cosmic_jax.data.swap import swap_in
from cosmic_jax.embed.artifact import (  # noqa: F401  (reading is part of this module's API)
    CONFIG,
    ENCODER_HLO,
    ENCODER_WEIGHTS,
    FORMAT,
    FORMAT_VERSION,
    FULL_WEIGHTS,
    MANIFEST,
    ExportBundle,
    ExportError,
    flat_items,
    flatten_params,
    load_export,
    read_verified,
    readout_label,
    sha256,
    unflatten_params,
)
from cosmic_jax.embed.embedder import DEFAULT_DIHEDRAL, DEFAULT_POOL, Embedder
from cosmic_jax.models.mae import MAE

# Lowered for both so one artifact runs on a CPU box and on an NVIDIA GPU.
DEFAULT_PLATFORMS = ("cpu", "cuda")

_WHAT = {
    CONFIG: "model + input/output contract (JSON)",
    ENCODER_WEIGHTS: "encoder weights, safetensors, flat dict keyed by '/'.join(param path)",
    ENCODER_HLO: "encoder forward, jax.export serialised StableHLO; call(weights, images (b,H,W,C) f32) -> (b,D) f32",
    FULL_WEIGHTS: "full MAE weights incl. decoder, safetensors, flat dict keyed by '/'.join(param path)",
}


# ---------------------------------------------------------------------- writing
def encoder_params(embedder: Any) -> dict[str, Any]:
    """The subset of ``embedder.params`` that the encoder forward reads (any layer, any pool).

    Found by tracing ``MAE.encode`` (layer=-1, the deepest) to a jaxpr and keeping the weights
    that reach the output (a backwards liveness pass), so decoder weights and params that
    ``setup`` creates but ``encode`` never touches (``mask_token``) stay out of the export.
    """
    flat = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype)
            for k, v in flat_items(embedder.params)}
    x = jax.ShapeDtypeStruct((1, *embedder.input_shape), np.float32)
    model = embedder.model

    def deepest(flat_w, images):
        return model.apply({"params": unflatten_params(flat_w)}, images, method=MAE.encode, layer=-1,
                           pool=embedder.pool)

    jaxpr = jax.make_jaxpr(deepest)(flat, x).jaxpr
    live = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if isinstance(v, Var))
    paths = jax.tree_util.tree_flatten_with_path((flat, x))[0]
    assert len(paths) == len(jaxpr.invars)
    used = {path[1].key for (path, _), var in zip(paths, jaxpr.invars) if path[0].idx == 0 and var in live}
    if not used:
        raise ValueError("the encoder forward uses no params; is this an MAE param tree?")
    # flax creates ``self.param`` leaves of a ``setup`` eagerly, so apply() insists on them even
    # when encode never reads them (MAE's mask_token): add back exactly those apply() asks for.
    for _ in range(len(flat)):
        try:
            jax.eval_shape(deepest, {k: flat[k] for k in used}, x)
            break
        except flax.errors.ScopeParamNotFoundError as e:
            m = re.search(r'named "([^"]+)" in scope "([^"]*)"', str(e))  # flax keeps no attributes
            scope = m.group(2).strip("/") if m else ""
            key = (f"{scope}/{m.group(1)}" if scope else m.group(1)) if m else None
            if key not in flat or key in used:
                raise
            used.add(key)
    return unflatten_params({k: v for k, v in flat_items(embedder.params) if k in used})


def export_embedder(
    embedder: Any,
    out_dir: str,
    *,
    full_params: Any | None = None,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write an export directory for ``embedder`` (its read-out is baked into the StableHLO).

    Args:
      embedder: a :class:`cosmic_jax.embed.Embedder`.
      out_dir: directory to create; written to a temporary sibling and renamed at the end, so a
        crash never leaves a half-written export behind.
      full_params: full MAE params (encoder + decoder) to include as ``mae.safetensors``.
      platforms: jax.export lowering platforms.
      overwrite: replace an existing ``out_dir``.

    Returns:
      The manifest dict.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if embedder.program is not None:
        raise ValueError(f"{embedder.source}: this Embedder runs an exported program; copy that export "
                         "directory instead of re-exporting it")
    enc = flatten_params(encoder_params(embedder))
    h, w, c = embedder.input_shape

    def forward(flat_weights, images):
        return embedder.forward(unflatten_params(flat_weights), images)

    # The function's name is serialised into the program: load_export checks config.json against it.
    readout = embedder.readout()
    forward.__name__ = readout_label(readout["layer_index"], readout["pool"], readout["dihedral"])

    b, = jax.export.symbolic_shape("b")
    w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in enc.items()}
    x_spec = jax.ShapeDtypeStruct((b, h, w, c), np.float32)
    exported = jax.export.export(jax.jit(forward), platforms=list(platforms))(w_spec, x_spec)
    blob = bytes(exported.serialize())

    cfg = embedder.model_cfg
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": embedder.model_name,
        "model_config": cfg.to_dict(),
        "input": {
            "shape": [h, w, c],
            "layout": "NHWC",
            "dtype": "float32",
            "normalisation": (
                "crops as stored in the crop dataset, cast to float32, no rescaling; "
                + ("the model then applies (x - pixel_mean) / pixel_std per channel (baked in)"
                   if cfg.pixel_mean is not None or cfg.pixel_std is not None
                   else "the model applies no further normalisation")
            ),
            "pixel_mean": cfg.pixel_mean,
            "pixel_std": cfg.pixel_std,
            # host-side, before the program: what the encoder was pretrained on (data/orient.py)
            "pose": embedder.pose,
            "pose_rule": (
                "rotate each crop about its nucleus's centroid onto the moments-ellipse major axis, move "
                f"it to the centre and magnify x{embedder.pose['scale']:.6g} about the centre "
                "(cosmic_jax.data.orient.orient_batch; Embedder.from_export does it)"
                if embedder.pose and embedder.pose["oriented"] else "crops as cut, no pose change"),
        },
        "output": {"shape": ["b", embedder.dim], "dtype": "float32"},
        # matmul dtype inside the forward (params and I/O are float32 either way)
        "compute_dtype": str(getattr(cfg, "dtype", "float32")),
        "embedding": {**embedder.readout(), "depth": embedder.depth},
        "training_step": None if embedder.step is None else int(embedder.step),
        "source": embedder.source or "in-memory",
        "stablehlo": {
            "file": ENCODER_HLO,
            "platforms": list(platforms),
            "args": [f"dict of {len(enc)} float32 arrays from {ENCODER_WEIGHTS} (keys as stored)",
                     "images float32 (b, H, W, C)"],
            "symbolic_dims": ["b"],
            "calling_convention_version": int(exported.calling_convention_version),
        },
        "versions": {"cosmic_jax": cosmic_jax.__version__, "jax": jax.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        files: dict[str, bytes] = {}
        files[CONFIG] = (json.dumps(config, indent=1) + "\n").encode()
        files[ENCODER_WEIGHTS] = safetensors.numpy.save(enc, metadata={"format": FORMAT, "what": "encoder"})
        files[ENCODER_HLO] = blob
        if full_params is not None:
            files[FULL_WEIGHTS] = safetensors.numpy.save(
                flatten_params(full_params), metadata={"format": FORMAT, "what": "full MAE"})
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {n: {"what": _WHAT[n], "sha256": sha256(d), "bytes": len(d)} for n, d in files.items()},
            "usage": ("exp = jax.export.deserialize(open('encoder.stablehlo','rb').read()); "
                      "emb = exp.call(safetensors.numpy.load_file('encoder.safetensors'), images_f32_bhwc)"),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export_checkpoint(
    workdir: str,
    out_dir: str,
    *,
    step: int | None = None,
    with_decoder: bool = False,
    layer: int | tuple[int, ...] | str | None = None,
    pool: str | None = None,
    dihedral: bool | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a ``cosmic pretrain`` workdir (latest step unless ``step``); see export_embedder.
    ``layer`` / ``pool`` / ``dihedral``: the read-out baked in (default: the Embedder's)."""
    emb = Embedder.from_checkpoint(workdir, step=step, layer=layer, pool=pool or DEFAULT_POOL,
                                   dihedral=DEFAULT_DIHEDRAL if dihedral is None else dihedral)
    return export_embedder(emb, out_dir, full_params=emb.params if with_decoder else None,
                           overwrite=overwrite)
