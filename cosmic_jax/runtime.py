"""Process-level settings that must be in place before the interpreter's allocator starts.

XLA:CPU mallocs a fresh temp buffer for every executable run (~1.2 GB per vit_s8_64 train step);
glibc serves such sizes with mmap, so every step page-faults the whole buffer in 4 KiB pages
(~290k faults, ~8 % of step CPU measured in notes/mae_speed.md). ``glibc.malloc.hugetlb=1`` makes
glibc advise transparent huge pages for that memory (~900 faults per step). glibc reads
GLIBC_TUNABLES only at start-up, hence the re-exec. Unknown tunables are ignored by older glibc,
and without THP support the advice is a no-op.
"""

from __future__ import annotations

import os
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_ENV = "COSMIC_NO_HUGEPAGES"


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
    os.execve(sys.executable, [sys.executable, os.path.abspath(argv[0])] + argv[1:], env)
