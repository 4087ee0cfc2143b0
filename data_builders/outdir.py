"""Output folders that never lose data: build in a staging folder, swap it in only on success.

A builder writes into a fresh staging folder beside its output (same filesystem, so renames are
atomic) and :func:`staged_dir` moves it into place only when the build finished:

- the output does not exist yet: one ``rename``;
- it holds an earlier dataset of the same kind: the old folder is renamed aside, the new one
  renamed in, and only then is the old one deleted (a crash between the two renames leaves the old
  dataset intact as ``.<name>.old-*`` beside the output);
- it holds anything else (files the builder would not write): :class:`OutputExistsError` before
  any work, and nothing is deleted.

A failed build removes its staging folder and leaves the output untouched. Sharded jobs that
share one output folder stage inside it (:func:`staging`) and use :func:`replace_job_files`
(their files carry a per-build id, and the job's manifest is replaced last with one atomic
``os.replace``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from typing import Iterator, Sequence

from cosmic_jax.data.swap import swap_in


class OutputExistsError(FileExistsError, ValueError):
    """The output path holds something the builder must not replace; the message names it.

    A ValueError too, so the CLI reports it in one line (exit 2) like every input error.
    """


def foreign_entries(out_dir: str, ours: Sequence[str]) -> list[str]:
    """Entries of ``out_dir`` whose names match none of the glob patterns ``ours`` (sorted)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if not any(fnmatch.fnmatchcase(n, p) for p in ours))


def check_out_dir(out_dir: str, ours: Sequence[str], what: str) -> None:
    """Refuse an output path that is a file, or a folder holding entries not matching ``ours``.

    Args:
      out_dir: the output folder.
      ours: glob patterns of the names this builder writes (anything else is someone's data).
      what: the kind of dataset, for the message.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExistsError(f"{out_dir}: exists and is not a folder; choose another output path")
    foreign = foreign_entries(out_dir, ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out_dir}: holds files that are not part of a {what} ({shown}); choose an empty or new "
            "output folder (nothing was changed)"
        )


@contextlib.contextmanager
def staging(parent: str, prefix: str) -> Iterator[str]:
    """A fresh folder ``parent/<prefix>XXXX`` for the block; removed afterwards unless moved away."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the swapped-in dataset gets normal modes
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out_dir: str, ours: Sequence[str], what: str) -> Iterator[str]:
    """Yield a staging folder; swap it in as ``out_dir`` if the block finishes, else delete it.

    Args:
      out_dir: final output folder (absent, empty, or an earlier dataset of this kind).
      ours: glob patterns of every name the builder writes into ``out_dir``.
      what: the kind of dataset, for errors.
    """
    out_dir = os.path.realpath(out_dir)  # a symlinked output: swap at its target, keep the link
    check_out_dir(out_dir, ours, what)
    parent, name = os.path.split(out_dir)
    with staging(parent, f".{name}.tmp-") as tmp:
        yield tmp
        check_out_dir(out_dir, ours, what)  # someone may have written there meanwhile
        swap_in(tmp, out_dir)


def move_files(staging_dir: str, out_dir: str) -> list[str]:
    """Move every file of ``staging_dir`` into ``out_dir`` (each by one atomic ``os.replace``)."""
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(staging_dir))
    for name in names:
        os.replace(os.path.join(staging_dir, name), os.path.join(out_dir, name))
    return names


def replace_job_files(staging: str, out_dir: str, last: str, job_globs: Sequence[str]) -> None:
    """Move a finished job's files from ``staging`` into ``out_dir`` and retire its old files.

    Every file but ``last`` (the job's manifest) must have a name no old file has (a per-build
    id), so moving them in changes nothing a reader sees; ``last`` then replaces the old manifest
    in one atomic ``os.replace``; finally the job's old files (names matching ``job_globs`` that
    the new build did not write) are deleted. Other jobs' files match none of ``job_globs``.
    """
    new = sorted(os.listdir(staging))
    if last not in new:
        raise RuntimeError(f"{staging}: the job wrote no {last}")
    for name in new:
        if name != last and os.path.exists(os.path.join(out_dir, name)):
            raise RuntimeError(f"{out_dir}: {name} already exists; job file names must be unique per build")
    for name in new:
        if name != last:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.replace(os.path.join(staging, last), os.path.join(out_dir, last))
    keep = set(new)
    for name in os.listdir(out_dir):
        if name not in keep and any(fnmatch.fnmatchcase(name, p) for p in job_globs):
            os.remove(os.path.join(out_dir, name))
