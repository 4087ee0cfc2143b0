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


def test_opt_out(tmp_path):
    assert _run(tmp_path, COSMIC_NO_HUGEPAGES="1")["tunables"] == ""
