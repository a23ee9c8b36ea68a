"""Character vocabulary: the published 104-character map, or any id -> character JSON."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from importlib import resources
from typing import Iterable, Sequence

import numpy as np

from jaxgpt.atomic import write_json

DEFAULT_VOCAB_PATH = str(resources.files("jaxgpt") / "assets" / "drake_vocab.json")


class VocabError(ValueError):
    """A vocabulary file is unusable, or text holds characters outside the vocabulary."""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Bijective map between characters and token ids 0..size-1."""

    chars: tuple[str, ...]

    def __post_init__(self):
        if not self.chars:
            raise VocabError("vocabulary is empty")
        for c in self.chars:
            if not isinstance(c, str) or len(c) != 1:
                raise VocabError(f"vocabulary entries must be single characters, got {c!r}")
        if len(set(self.chars)) != len(self.chars):
            raise VocabError("vocabulary has duplicate characters")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of `text` that are not in the vocabulary, sorted."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids `(len(text),)`. Raises VocabError naming unknown characters."""
        unknown = self.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise VocabError(f"characters not in the vocabulary: {shown}{more}")
        index = self._index
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Raises VocabError for an id outside 0..size-1."""
        chars, out = self.chars, []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(chars):
                raise VocabError(f"token id {i} outside the vocabulary of {len(chars)}")
            out.append(chars[i])
        return "".join(out)

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """A vocabulary of the distinct characters of `text`, in code-point order."""
        return cls(tuple(sorted(set(text))))

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_VOCAB_PATH) -> "Vocab":
        """Reads a JSON object {"0": "\\n", "1": " ", ...} (id -> character), or a JSON list."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise VocabError(f"{path}: vocabulary file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VocabError(f"{path}: not a readable vocabulary JSON ({e})") from None
        if isinstance(data, list):
            chars: Sequence = data
        elif isinstance(data, dict):
            try:
                ids = sorted(int(k) for k in data)
            except ValueError:
                raise VocabError(f"{path}: vocabulary keys must be integer ids") from None
            if ids != list(range(len(ids))):
                raise VocabError(f"{path}: vocabulary ids must be 0..{len(ids) - 1} without gaps")
            chars = [data[str(i)] for i in ids]
        else:
            raise VocabError(f"{path}: vocabulary JSON must be an object id -> character or a list")
        try:
            return cls(tuple(chars))
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes the id -> character JSON (the published file's format), atomically."""
        write_json(path, {str(i): c for i, c in enumerate(self.chars)}, indent=0)


@functools.lru_cache(maxsize=1)
def default_vocab() -> Vocab:
    """The published 104-character map (id 0 is the newline, id 1 the space); read once."""
    return Vocab.load(DEFAULT_VOCAB_PATH)
