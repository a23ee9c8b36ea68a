"""The one exception type of the porting layer."""

from __future__ import annotations

import os

MAX_PROBLEM = 2000  # characters of a message: a file's names may be long, a message may not be
MAX_ITEM = 200  # characters of one name shown in a message

class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or does not hold a jaxgpt/notebook model.

    The message is one line that starts with the file's path and states the exact problem
    (every missing key, every unexpected key, each shape mismatch, ...), so a CLI can print
    it as is.

    Attributes:
      path: the file or directory the problem is about.
      problem: the message without the path.
    """

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        problem = " ".join(problem.splitlines())  # one line: a CLI prints it as is
        if len(problem) > MAX_PROBLEM:
            problem = problem[: MAX_PROBLEM - 30] + f" ... ({len(problem):,} characters)"
        self.problem = problem
        super().__init__(f"{self.path}: {self.problem}")


class TorchUnavailableError(ImportError):
    """Writing a torch file needs torch, an optional extra of jaxgpt."""

    def __init__(self, what: str = "writing a torch .pt file"):
        super().__init__(f'{what} needs torch, which is not installed: pip install "jaxgpt[torch]"')


def summarize(items: list[str], limit: int = 20) -> str:
    """`a, b, c` for short lists; the first `limit` items and `... and N more` for long ones.
    Each item is cut to `MAX_ITEM` characters (items often hold key names from a file)."""
    shown = [cut(item) for item in items[:limit]]
    if len(items) <= limit:
        return ", ".join(shown)
    return ", ".join(shown) + f", ... and {len(items) - limit} more"


def cut(text: str, limit: int = MAX_ITEM) -> str:
    """`text`, or its first `limit` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def brief(value) -> str:
    """A description of a value read from a file, bounded whatever the value.

    Never `repr` of a container: a few bytes of pickle memo references can make a structure
    whose repr is exponentially long. Scalars are shown (cut); containers by type and length.
    """
    if value is None or type(value) is bool:
        return repr(value)
    if type(value) is int:
        return str(value) if -10**30 < value < 10**30 else f"a {value.bit_length()}-bit int"
    if type(value) is float:
        return repr(value)
    if type(value) is str:
        return repr(value) if len(value) <= 40 else f"a {len(value):,}-character string starting {value[:30]!r}"
    if type(value) in (tuple, list, dict) or isinstance(value, dict):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"
