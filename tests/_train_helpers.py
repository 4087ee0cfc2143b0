"""Tiny labelled crop datasets and run helpers for the training tests (no test functions here)."""

from __future__ import annotations

import json
import os

import numpy as np

from cosmic_jax.data.records import encode_record, write_shards


def blob_crops(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 1) float32 blurred ellipses of two classes: small (0) and large (1) nuclei.

    Position, aspect, angle, brightness and noise vary; only the radius range depends on the
    class, so a useful representation must encode size.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, size, size, 1), np.float32)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        r = rng.uniform(3.0, 5.0) if labels[i] == 0 else rng.uniform(7.0, 10.0)
        a = r * rng.uniform(0.75, 1.25)
        b = r * r / a
        th = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        img = rng.uniform(0.6, 1.0) / (1.0 + np.exp((d - 1.0) * 6.0))
        img += rng.normal(0, 0.03, img.shape)
        images[i, :, :, 0] = img
    return images, labels


def write_blob_dataset(out_dir: str, n: int, seed: int = 0, size: int = 32) -> str:
    """Crop dataset of ``n`` blob crops with meta {"cell_type": "small"|"large"}."""
    images, labels = blob_crops(n, size, seed)
    names = np.array(["small", "large"])
    recs = (
        encode_record(images[i], f"c{seed}_{i:05d}", {"cell_type": str(names[labels[i]])}) for i in range(n)
    )
    write_shards(recs, out_dir, records_per_shard=max(8, n // 3))
    return out_dir


def chromatin_params(rng: np.random.Generator, n: int, profile=None, mixed: bool = False) -> dict:
    """Per-nucleus ``data_builders.render`` parameters (n,) each, drawn in a fixed order.

    ``mixed``: every parameter over a wide range. Otherwise narrow ranges, with ``profile()`` (called
    in its place in the draw order, so the stream does not shift) or a near-flat profile.
    """
    if mixed:
        return {
            "radius": rng.uniform(5.0, 10.0, n),
            "elongation": rng.uniform(1.0, 2.6, n),
            "intensity": rng.uniform(0.3, 0.6, n),
            "texture_amplitude": rng.uniform(0.02, 0.5, n),
            "profile": rng.uniform(-1.0, 1.0, n),
            "texture_scale": rng.uniform(0.7, 2.0, n),
            "nucleoli_rate": rng.uniform(0.0, 5.0, n),
            "nucleoli_brightness": rng.uniform(0.2, 0.5, n),
        }
    return {
        "radius": rng.uniform(6.0, 9.0, n),
        "elongation": rng.uniform(1.0, 1.6, n),
        "intensity": rng.uniform(0.35, 0.55, n),
        "texture_amplitude": rng.uniform(0.05, 0.15, n),
        "profile": profile() if profile is not None else rng.uniform(-0.3, 0.3, n),
        "texture_scale": rng.uniform(0.8, 1.2, n),
        "nucleoli_rate": rng.uniform(0.5, 1.5, n),
        "nucleoli_brightness": rng.uniform(0.2, 0.4, n),
    }


def chromatin_crops(n: int, size: int = 32, seed: int = 0, mixed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 1) float32 rendered nuclei (``data_builders.render``), labels (n,) in {0, 1}.

    ``mixed=False``: two classes, ring (0) and dome (1) chromatin, i.e. bright periphery vs bright
    centre (peripheral heterochromatin vs a central chromatin mass). Only the radial profile
    depends on the class (it shifts the mean crop intensity by ~10%, well inside each class's
    brightness spread); size, elongation, angle, brightness, texture and nucleoli are drawn from
    the same ranges. A random-init ViT separates these only weakly (kNN ~0.67, notes/training.md),
    unlike the blob sizes, so a probe on them can show that pretraining helped.

    ``mixed=True``: unlabelled-style pretraining crops, every morphology parameter drawn over a
    wide range (label = sign of the profile, unused by training).

    Every nucleus is moved by up to 4 px (render_batch centres them; real crops are centred only
    approximately); the vacated border is zero-filled.
    """
    from data_builders.render import MORPH_PARAMS, render_batch

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    if mixed:
        params = chromatin_params(rng, n, mixed=True)
        labels = (params["profile"] > 0).astype(np.int64)
    else:
        params = chromatin_params(rng, n, profile=lambda: np.where(labels == 0, -1.0, 1.0) * rng.uniform(0.6, 1.0, n))
    rendered, _ = render_batch({k: params[k] for k in MORPH_PARAMS}, rng, image_size=size)
    images = np.zeros((n, size, size, 1), np.float32)
    for i, (dy, dx) in enumerate(rng.integers(-4, 5, (n, 2))):
        src = rendered[i, max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
        images[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1], 0] = src
    return images, labels


def write_chromatin_dataset(out_dir: str, n: int, seed: int = 0, size: int = 32, mixed: bool = False) -> str:
    """Crop dataset of ``n`` chromatin crops with meta {"cell_type": "ring"|"dome"} (see chromatin_crops)."""
    images, labels = chromatin_crops(n, size, seed, mixed)
    names = np.array(["ring", "dome"])
    recs = (
        encode_record(images[i], f"r{seed}_{i:05d}", {"cell_type": str(names[labels[i]])}) for i in range(n)
    )
    write_shards(recs, out_dir, records_per_shard=max(8, n // 3))
    return out_dir


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(workdir: str) -> dict[int, float]:
    from cosmic_jax.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONPATH", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


COMPILE_CACHE = "/tmp/cosmic_jax_test_xla_cache"


def enable_compile_cache() -> None:
    """Persistent XLA cache shared by the in-process runs and the subprocesses (same programs)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_worker(data: str, workdir: str, overrides: list[str], devices: int, kill_at: int = 0,
               extra_env: dict | None = None, timeout: float = 300, wait: bool = True):
    import subprocess
    import sys

    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "_pretrain_worker.py"), data, workdir]
    if kill_at:
        cmd += ["--kill-at", str(kill_at)]
    env = subprocess_env(devices)
    env.update(extra_env or {})
    p = subprocess.Popen(cmd + list(overrides), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return p
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out
