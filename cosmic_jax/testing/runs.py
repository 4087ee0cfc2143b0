"""Run helpers shared by the training tests and experiments: metric files, subprocess workers, XLA cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import jax

from cosmic_jax.train.loop import Hook
from cosmic_jax.train.metrics import read_metrics

# Shared by the in-process runs and their subprocesses (same programs, compiled once); the folder
# tests/conftest.py sets for the whole test session.
COMPILE_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                            "cosmic_jax_test_xla_cache")


def sigkill_hooks(kill_at: int) -> tuple[Hook, ...]:
    """Loop hooks that SIGKILL this very process after the first step >= ``kill_at`` (no cleanup, no
    final save: a crashed or preempted job); none for ``kill_at`` 0. ">=": a loop that runs several
    steps per call reports only every few step numbers."""
    if not kill_at:
        return ()

    def die(step, state):
        if step >= kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return (Hook(1, die, "kill", at_end=False),)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def subprocess_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def enable_compile_cache() -> None:
    """Persistent XLA cache shared by the in-process runs and the subprocesses (same programs)."""
    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_worker(data: str, workdir: str, overrides: list[str], devices: int, kill_at: int = 0,
               extra_env: dict | None = None, timeout: float = 300, wait: bool = True):
    cmd = [sys.executable, "-m", "cosmic_jax.testing.pretrain_worker", data, workdir]
    if kill_at:
        cmd += ["--kill-at", str(kill_at)]
    env = subprocess_env(devices)
    env.update(extra_env or {})
    p = subprocess.Popen(cmd + list(overrides), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return p
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out
