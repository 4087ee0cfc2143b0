"""Fresh-process consumer of a cosmic export, using ONLY jax + numpy + safetensors + json.

It stands for a user who has the export directory but not cosmic_jax (no model code, no flax):

    python tests/_export_consumer.py EXPORT_DIR IMAGES.npy OUT.npy

It checks every file's sha256 against manifest.json, loads the encoder weights, deserialises the
StableHLO forward and embeds IMAGES (N, H, W, C) float32 into OUT (N, D). It exits non-zero if any
cosmic_jax / flax module got imported along the way.
"""

import hashlib
import json
import os
import sys

import jax
import numpy as np
import safetensors.numpy


def main(export_dir: str, images_path: str, out_path: str) -> None:
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    for name, info in manifest["files"].items():
        with open(os.path.join(export_dir, name), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != info["sha256"]:
                raise SystemExit(f"{name}: sha256 mismatch")
    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    weights = safetensors.numpy.load_file(os.path.join(export_dir, "encoder.safetensors"))
    with open(os.path.join(export_dir, config["stablehlo"]["file"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    images = np.load(images_path).astype(np.float32)
    assert list(images.shape[1:]) == config["input"]["shape"], (images.shape, config["input"]["shape"])
    # Two different batch sizes through the same artifact: the batch dimension is symbolic.
    half = max(1, len(images) // 2)
    out = np.concatenate([np.asarray(exported.call(weights, images[:half])),
                          np.asarray(exported.call(weights, images[half:]))])
    np.save(out_path, out)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("cosmic_jax", "flax"))
    if leaked:
        raise SystemExit(f"consumer imported project/model code: {leaked[:5]}")
    print(json.dumps({"shape": list(out.shape), "platforms": exported.platforms,
                      "in_shapes": [str(a.shape) for a in exported.in_avals[-1:]]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
