"""The one exception type of the porting layer."""

from __future__ import annotations

import os


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
        self.problem = " ".join(problem.splitlines())  # one line: a CLI prints it as is
        super().__init__(f"{self.path}: {self.problem}")


class TorchUnavailableError(ImportError):
    """Writing a torch file needs torch, an optional extra of jaxgpt."""

    def __init__(self, what: str = "writing a torch .pt file"):
        super().__init__(f'{what} needs torch, which is not installed: pip install "jaxgpt[torch]"')


def summarize(items: list[str], limit: int = 20) -> str:
    """`a, b, c` for short lists; the first `limit` items and `... and N more` for long ones."""
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... and {len(items) - limit} more"
