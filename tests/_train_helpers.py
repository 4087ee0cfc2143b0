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
