"""Where the peer benchmarks and their venvs are, for the experiments that compare against them.

The peers live in ``<repo>/../shared/bench`` (scripts, analytic FLOP counts, CPU-load probe) with
their venvs beside them (``.venv-peer-torch``, ``.venv-peer-flax``, ``.venv-peer-cellflow``, made by
``setup_peers.sh`` there). ``--bench-dir`` (or ``$COSMIC_BENCH_DIR``) and ``--peer-python`` point
elsewhere. Imported by sibling scripts (``python experiments/<script>.py`` puts this folder on the
import path).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCH_DIR = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))


def add_arguments(parser: argparse.ArgumentParser, peer_python: bool = False) -> None:
    parser.add_argument("--bench-dir", default=os.environ.get("COSMIC_BENCH_DIR", DEFAULT_BENCH_DIR),
                        help="the peers' bench folder (default: $COSMIC_BENCH_DIR or <repo>/../shared/bench)")
    if peer_python:
        parser.add_argument("--peer-python", default=None,
                            help="python of the peer's venv (default: <bench-dir>/.venv-peer-torch/bin/python)")


def bench_dir(path: str) -> str:
    """The bench folder, checked; exits with what to do when it is missing."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "setup_peers.sh")):
        raise SystemExit(f"{path}: not the peers' bench folder (no setup_peers.sh); "
                         "pass --bench-dir DIR or set COSMIC_BENCH_DIR")
    return path


def load_module(directory: str, name: str) -> types.ModuleType:
    """Import ``directory/name.py`` (a peer-side helper such as mae_flops or cpu_probe) by path."""
    path = os.path.join(bench_dir(directory), f"{name}.py")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: missing from the bench folder")
    spec = importlib.util.spec_from_file_location(f"peer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_python(directory: str, venv: str, override: str | None = None) -> str:
    """The python of peer venv ``venv`` (e.g. ".venv-peer-torch"); exits with how to make it if missing."""
    directory = bench_dir(directory)
    path = override or os.path.join(directory, venv, "bin", "python")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{path}: peer venv missing; create it with `bash {os.path.join(directory, 'setup_peers.sh')}` "
                         "(or pass --peer-python PATH)")
    return path
