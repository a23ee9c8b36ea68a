"""Atomic outputs: write next to the destination, then `os.replace` it into place.

A failure (exception, full disk, Ctrl-C) removes the temporary and leaves the destination as
it was, so no reader ever sees a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from porting.errors import CheckpointError


def _check_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(path, f"cannot write: directory {parent} does not exist")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary file path in the destination's directory; replaces `path` on success.

    Args:
      path: the destination file. An existing file is replaced; a directory is refused.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(path, "cannot write a file: a directory exists at this path")
    parent = _check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    # mkstemp creates the file 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yields a not-yet-existing temporary directory path; renames it to `path` on success.

    Args:
      path: the destination directory; it must not exist (a directory is never merged or
        silently replaced).
    """
    path = os.fspath(path)
    if os.path.lexists(path):
        raise CheckpointError(path, "cannot write a checkpoint directory: the path already exists")
    parent = _check_parent(path)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    tmp = os.path.join(holder, "checkpoint")
    try:
        yield tmp
        os.rename(tmp, path)  # atomic on POSIX; fails rather than merge if `path` appeared meanwhile
    finally:
        shutil.rmtree(holder, ignore_errors=True)
