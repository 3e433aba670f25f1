"""Atomic writes for the lab's outputs: write beside the target, then rename over it.

``tempfile`` creates its files 0600 and its folders 0700 (private, whatever the umask says);
a report that a web server or a colleague should read needs the permissions any newly created
file gets, so they are set from the umask before the rename.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere by setting it and back (the only way
    to read it, which leaves it 0 for a moment: a file another thread creates then is public)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def as_created(path, directory: bool = False) -> None:
    """Give ``path`` the permissions of a newly created file (0666) or folder (0777) under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def replacing(path, suffix: str = ""):
    """Yield a temporary path beside ``path``; when the block ends without an exception, it
    replaces ``path`` (atomic rename) with the usual permissions. Otherwise it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        as_created(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
