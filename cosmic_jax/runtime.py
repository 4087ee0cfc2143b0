"""Process-level settings that must be in place before the allocator or JAX's backends start.

Huge-page malloc:

XLA:CPU mallocs a fresh temp buffer for every executable run (~1.2 GB per vit_s8_64 train step);
glibc serves such sizes with mmap, so every step page-faults the whole buffer in 4 KiB pages
(~290k faults, ~8 % of step CPU measured in notes/mae_speed.md). ``glibc.malloc.hugetlb=1`` makes
glibc advise transparent huge pages for that memory (~900 faults per step). glibc reads
GLIBC_TUNABLES only at start-up, hence the re-exec. Unknown tunables are ignored by older glibc,
and without THP support the advice is a no-op.

CPU devices: on a CPU host, XLA's one device runs most of a train step's small ops (LayerNorm,
softmax, GELU, the attention dots, the optimizer) on one thread while the other cores wait.
Splitting the host into one XLA device per core group, used data-parallel by the same sharded
step, keeps every core busy: vit_s8_64 on 2 cores went from ~42 to ~46 img/s (notes/mae_speed.md).

Compilation cache: every `cosmic` run compiles the same programs again (the MAE step, the
embedder, the joint fit and its ODE solves for data of one shape); JAX's persistent cache keeps
them on disk, which saves ~15 s of a 100 s `cosmic analyze --quick` on 3,000 cells when run again
(BUILD_NOTES, status of sessions 7-8).
"""

from __future__ import annotations

import os
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Fewer images per device than this and the per-device GEMMs get too small to gain from the split.
MIN_IMAGES_PER_CPU_DEVICE = 64

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "COSMIC_NO_HUGEPAGES"

CACHE_ENV = "COSMIC_XLA_CACHE"  # a folder, or "off"
JAX_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at a folder; call before JAX is imported.

    ``JAX_COMPILATION_CACHE_DIR`` set by the user wins; ``COSMIC_XLA_CACHE=off`` turns the cache
    off; ``COSMIC_XLA_CACHE=DIR`` picks the folder; the default is
    ``$XDG_CACHE_HOME/cosmic_jax/xla`` (``~/.cache/cosmic_jax/xla``). It grows by a few MB per
    distinct problem shape and may be deleted at any time (JAX's size cap needs ``filelock``, which
    the pinned stack does not have).

    Returns:
      the cache folder, or None when the cache stays off.
    """
    if os.environ.get(JAX_CACHE_ENV):
        return os.environ[JAX_CACHE_ENV]
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.abspath(setting) if setting else os.path.join(base, "cosmic_jax", "xla")
    os.environ[JAX_CACHE_ENV] = path
    # JAX skips programs that compile in under 1 s by default; a quick analysis compiles dozens
    # (ODE solves, probes) that add up to ~15 s
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return path


def reexec_with_hugepage_malloc(argv: list[str] | None = None) -> None:
    """Restart this process with ``GLIBC_TUNABLES`` including the THP tunable (no-op if set).

    Args:
      argv: the command line to restart with (default ``sys.argv``; argv[0] must be a script path).
    Does nothing when the tunable is already set, when ``COSMIC_NO_HUGEPAGES`` is set, or off Linux.
    """
    current = os.environ.get("GLIBC_TUNABLES", "")
    if HUGEPAGE_TUNABLE in current.split(":") or os.environ.get(OPT_OUT_ENV) or not sys.platform.startswith("linux"):
        return
    argv = list(sys.argv if argv is None else argv)
    if not argv or not os.path.exists(argv[0]):
        return  # e.g. `python -c`: nothing to re-run
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (current, HUGEPAGE_TUNABLE) if t))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *_how_started(argv[0])] + argv[1:], env)


def _how_started(script: str) -> list[str]:
    """``-m package.module`` when this process was started that way, else the script's path.

    Re-running ``python -m cosmic_jax.cli`` as ``python .../cosmic_jax/cli.py`` would put the
    package's own folder first on sys.path, where ``cosmic_jax/testing`` hides the top-level
    ``testing`` namespace that anndata imports from.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name]
    return [os.path.abspath(script)]


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_cpu_devices(global_batch: int, cores: int | None = None) -> int:
    """How many XLA CPU devices to split a host into for a batch: the most, up to one per core,
    that divide the batch into at least ``MIN_IMAGES_PER_CPU_DEVICE`` images each (1 = no split)."""
    cores = usable_cores() if cores is None else cores
    for n in range(max(1, cores), 1, -1):
        if global_batch % n == 0 and global_batch // n >= MIN_IMAGES_PER_CPU_DEVICE:
            return n
    return 1


def split_cpu_devices(n: int) -> bool:
    """Make the XLA CPU backend expose ``n`` devices; call before JAX creates its backends.

    Leaves an explicit ``--xla_force_host_platform_device_count`` in XLA_FLAGS alone (the user's
    or a test's choice wins) and does nothing for ``n <= 1``. Other backends (GPU, TPU) ignore it.

    Returns:
      True if the flag was set by this call.

    Raises:
      RuntimeError: if JAX's backends already exist (the flag would be silently ignored).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or DEVICE_COUNT_FLAG in flags:
        return False
    if _jax_started():
        raise RuntimeError(f"split_cpu_devices({n}) called after JAX started its backends; "
                           f"set XLA_FLAGS={DEVICE_COUNT_FLAG}={n} before the first JAX computation")
    # First in the list: XLA ignored flags that followed intra_op_parallelism_threads.
    os.environ["XLA_FLAGS"] = f"{DEVICE_COUNT_FLAG}={n} {flags}".strip()
    return True


def apply_cpu_devices(setting: int, global_batch: int) -> int:
    """The ``cpu_devices`` option of the commands: -1 = auto for this batch (skipped quietly when
    JAX has already started, e.g. a command run from a Python session), 0/1 = no split, N = split
    into N (an error once JAX has started). Returns the device count set, or 0 if none was."""
    if setting < 0 and _jax_started():
        return 0
    n = auto_cpu_devices(global_batch) if setting < 0 else setting
    return n if split_cpu_devices(n) else 0


def _jax_started() -> bool:
    """Whether JAX has created its backends (after which XLA_FLAGS changes are ignored)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()
