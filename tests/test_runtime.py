"""The huge-page malloc re-exec: the restarted process sees the tunable, keeps its arguments,
and the opt-out works."""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys
from cosmic_jax.runtime import reexec_with_hugepage_malloc
reexec_with_hugepage_malloc()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:]}))
"""


def _run(tmp_path, **env):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    full = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "COSMIC_NO_HUGEPAGES")}
    full.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full["PYTHONPATH"] = root + os.pathsep + full.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(script), "a b", "--x=1"], env=full, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_reexec_sets_tunable_and_keeps_other_tunables_and_args(tmp_path):
    got = _run(tmp_path)
    assert got == {"tunables": "glibc.malloc.hugetlb=1", "argv": ["a b", "--x=1"]}
    got = _run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert got["tunables"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_reexec_of_python_dash_m_restarts_the_module(tmp_path):
    """`python -m pkg.mod` restarts as `-m pkg.mod`, not as the file: run as a file, the module's
    own folder leads sys.path (cosmic_jax/testing would hide the `testing` namespace anndata needs)."""
    pkg = tmp_path / "probepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(SCRIPT + "print(json.dumps({'main_spec': __spec__ and __spec__.name, "
                                          "'path0': sys.path[0]}))\n")
    full = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "COSMIC_NO_HUGEPAGES")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full["PYTHONPATH"] = root + os.pathsep + str(tmp_path)
    lines = subprocess.run([sys.executable, "-m", "probepkg.main", "x"], env=full, capture_output=True, text=True,
                           check=True, cwd=tmp_path).stdout.strip().splitlines()
    first, last = json.loads(lines[-2]), json.loads(lines[-1])
    assert first == {"tunables": "glibc.malloc.hugetlb=1", "argv": ["x"]}
    assert last["main_spec"] == "probepkg.main" and last["path0"] != str(pkg)


def test_opt_out(tmp_path):
    assert _run(tmp_path, COSMIC_NO_HUGEPAGES="1")["tunables"] == ""


def test_auto_cpu_devices_keeps_64_images_per_device():
    from cosmic_jax.runtime import auto_cpu_devices

    assert auto_cpu_devices(128, cores=2) == 2
    assert auto_cpu_devices(128, cores=8) == 2  # 4 devices would get 32 images each
    assert auto_cpu_devices(512, cores=8) == 8
    assert auto_cpu_devices(96, cores=2) == 1  # 48 per device: too few
    assert auto_cpu_devices(192, cores=4) == 3
    assert auto_cpu_devices(1000, cores=1) == 1


SPLIT = """
import json, os, sys
from cosmic_jax.runtime import split_cpu_devices
import jax
first = split_cpu_devices(int(sys.argv[1]))
n = jax.local_device_count()
try:
    late = split_cpu_devices(3)
except RuntimeError as e:
    late = str(e)
print(json.dumps({"set": first, "devices": n, "late": late}))
"""


def _split(tmp_path, n, xla_flags=None):
    script = tmp_path / "split.py"
    script.write_text(SPLIT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, str(script), str(n)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_split_cpu_devices_before_jax_starts(tmp_path):
    got = _split(tmp_path, 2)
    assert got == {"set": True, "devices": 2, "late": False}  # later calls: the flag is there
    got = _split(tmp_path, 1)
    assert got["set"] is False and got["devices"] == 1
    assert "after JAX started" in got["late"]  # too late: refused, not silently ignored
    # an explicit device-count flag wins
    got = _split(tmp_path, 2, xla_flags="--xla_force_host_platform_device_count=4")
    assert got == {"set": False, "devices": 4, "late": False}


def test_resolve_microbatch_auto():
    from cosmic_jax.configs import optim as optim_configs
    from cosmic_jax.train.optim import resolve

    auto = optim_configs.get_config(microbatch=-1)
    assert resolve(auto, 10, 128, 2, "cpu").microbatch == 64  # 32 per device, 2 chunks
    assert resolve(auto, 10, 128, 1, "cpu").microbatch == 32
    assert resolve(auto, 10, 64, 2, "cpu").microbatch == 0  # one chunk per device: off
    assert resolve(auto, 10, 128, 1, "gpu").microbatch == 0
    assert resolve(optim_configs.get_config(microbatch=16), 10, 128, 1, "gpu").microbatch == 16


def test_apply_cpu_devices_auto_is_quiet_once_jax_started(monkeypatch):
    import jax
    import pytest

    from cosmic_jax.runtime import apply_cpu_devices

    jax.devices()  # this test process: backends exist
    assert apply_cpu_devices(2, 128) == 0  # the suite's explicit device-count flag wins
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert apply_cpu_devices(-1, 4096) == 0  # auto: skipped quietly, too late to split
    assert os.environ.get("XLA_FLAGS") is None
    with pytest.raises(RuntimeError, match="after JAX started"):
        apply_cpu_devices(2, 128)  # asked for explicitly: an error, not silently ignored


def test_compilation_cache_folder_opt_out_and_reuse(monkeypatch, tmp_path):
    from cosmic_jax.runtime import CACHE_ENV, JAX_CACHE_ENV, enable_compilation_cache

    monkeypatch.delenv(JAX_CACHE_ENV, raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "")  # restored after the test
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = str(tmp_path / "xdg" / "cosmic_jax" / "xla")
    assert enable_compilation_cache() == default and os.environ[JAX_CACHE_ENV] == default
    monkeypatch.delenv(JAX_CACHE_ENV)
    monkeypatch.setenv(CACHE_ENV, "off")
    assert enable_compilation_cache() is None and JAX_CACHE_ENV not in os.environ
    monkeypatch.setenv(JAX_CACHE_ENV, "/somewhere/else")  # the user's own JAX setting wins
    assert enable_compilation_cache() == "/somewhere/else"

    # a fresh process with the cache on writes even a quickly compiled program, a second one reuses it
    cache = tmp_path / "cache"
    prog = ("from cosmic_jax.runtime import enable_compilation_cache; enable_compilation_cache()\n"
            "import jax, jax.numpy as jnp\n"
            "print(float(jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((64, 64)))))")
    env = {k: v for k, v in os.environ.items()
           if k not in (JAX_CACHE_ENV, "XLA_FLAGS", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env[CACHE_ENV] = str(cache)
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append((r.stdout, sorted(p.name for p in cache.iterdir())))
    assert outs[0][1] and outs[0] == outs[1]  # written once, read (not rewritten) the second time
