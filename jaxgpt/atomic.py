"""Atomic outputs: every file jaxgpt and porting write goes through here.

The writer writes a temporary beside the destination, which is then `os.replace`d into place,
so a failure (exception, full disk, Ctrl-C) leaves the destination as it was and no reader ever
sees a half-written file.

    with atomic_file("weights.safetensors") as tmp:
        save_file(tensors, tmp)               # any writer that takes a path
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator


class OutputError(ValueError):
    """A destination that cannot be written: its directory is missing, or something is in the way.

    Attributes:
      path: the destination.
      problem: the message without the path.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


ErrorType = Callable[[str, str], Exception]  # called as error(path, problem)


def _parent(path: str, error: ErrorType) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise error(path, f"cannot write: directory {parent} does not exist")
    return parent


def _create_temporary(parent: str, name: str) -> tuple[str, int]:
    """Creates an empty, unique temporary file; returns (path, the permissions open() gave it).

    Created with mode 0o666 like any `open(path, "w")`, so the umask (or a default ACL) decides
    its permissions, not `mkstemp`'s fixed 0600.
    """
    for _ in range(100):
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{parent}: no free temporary name for {name}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, error: ErrorType = OutputError) -> Iterator[str]:
    """Yields a temporary file path in the destination's directory; replaces `path` on success.

    The result has the permissions of a plain `open(path, "w")`: an existing file's, else the
    umask's, even when the writer recreates the temporary with its own (safetensors: 0600).

    Args:
      path: the destination file. An existing file is replaced; a directory is refused.
      error: the exception raised for a destination that cannot be written, called as
        `error(path, problem)` (porting passes its CheckpointError).

    Raises:
      OutputError (or `error`): the directory does not exist, or `path` is a directory.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise error(path, "cannot write a file: a directory exists at this path")
    tmp, mode = _create_temporary(_parent(path, error), os.path.basename(path))
    if os.path.isfile(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, error: ErrorType = OutputError) -> Iterator[str]:
    """Yields a not-yet-existing temporary directory path; renames it to `path` on success.

    Args:
      path: the destination directory; it must not exist (a directory is never merged or
        silently replaced).
      error: as for `atomic_file`.
    """
    path = os.fspath(path)
    if os.path.lexists(path):
        raise error(path, "cannot write a checkpoint directory: the path already exists")
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=_parent(path, error))
    tmp = os.path.join(holder, "checkpoint")
    try:
        yield tmp
        os.rename(tmp, path)  # atomic on POSIX; fails rather than merge if `path` appeared meanwhile
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 text atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, data, *, indent: int = 1) -> None:
    """Writes `data` as UTF-8 JSON (non-ASCII kept as is, a final newline) atomically."""
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
