"""Replace a folder or a file with a finished one so that no instant holds neither.

The new folder is built beside the old one (same filesystem, so ``rename`` is atomic). The old
folder is renamed aside, the new one renamed in, and only then is the old one deleted. An error in
the second rename puts the old folder back; a crash between the two renames leaves the old data
intact as ``.<name>.old-*`` beside the output. A file is written beside its target and renamed
over it in one ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
import tempfile


def swap_in(new_dir: str, out_dir: str) -> None:
    """Put the finished folder ``new_dir`` at ``out_dir``; the old ``out_dir`` goes only afterwards."""
    if not os.path.exists(out_dir):
        os.rename(new_dir, out_dir)
        return
    parent, name = os.path.split(os.path.abspath(out_dir))
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(old)  # only the unique name is wanted; rename needs it free
    os.rename(out_dir, old)
    try:
        os.rename(new_dir, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # the old data back where it was; the caller still holds new_dir
        raise
    shutil.rmtree(old)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
