"""Character data pipeline with the notebook's batch-loader semantics.

`batch_loader` in the notebook draws `batch_size` random start indices and returns windows of
`context_length` tokens and the same windows shifted by one as targets. Here each batch is a
pure function of (seed, step), so an interrupted run resumed at step s sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxgpt.vocab import Vocab, VocabError


class DataError(ValueError):
    """The training text is missing, empty, unreadable, or too short."""


def read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text file; raises DataError with the path for any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: text file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not text:
        raise DataError(f"{path}: text file is empty")
    return text


def count_unknown(text: str, unknown: list[str]) -> str:
    """"4 characters (1 distinct: 'ö')": how many characters of `text` are the `unknown` ones."""
    count = sum(text.count(c) for c in unknown)
    shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    return f"{count} characters ({len(unknown)} distinct: {shown})"


def encode_text(text: str, vocab: Vocab, *, drop_unknown: bool = False) -> np.ndarray:
    """Text -> int32 ids `(N,)`. Unknown characters raise, unless `drop_unknown` removes them."""
    unknown = vocab.unknown_chars(text)
    if unknown and drop_unknown:
        text = text.translate({ord(c): None for c in unknown})
    elif unknown:
        raise VocabError(f"{count_unknown(text, unknown)} are not in the vocabulary; pass drop_unknown "
                         "(--drop-unknown) to remove them or build a vocabulary from the text")
    return vocab.encode(text)


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # (N_train,) int32
    val: np.ndarray  # (N_val,) int32


def train_val_split(tokens: np.ndarray, val_fraction: float, context_length: int) -> Split:
    """The first (1 - val_fraction) of the tokens for training, the rest held out (as nanoGPT)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    split = Split(tokens[:cut], tokens[cut:])
    for name, part in (("training", split.train), ("validation", split.val)):
        if len(part) <= context_length + 1:
            raise DataError(
                f"the {name} part has {len(part)} characters; it needs more than context_length + 1 = "
                f"{context_length + 1}: use a longer text"
            )
    return split


def get_batch(tokens: np.ndarray, context_length: int, batch_size: int, seed: int, step: int):
    """Random windows and their shifted targets: int32 `(B, T)` each, a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context_length, size=batch_size)
    index = starts[:, None] + np.arange(context_length)[None, :]  # (B, T)
    return tokens[index], tokens[index + 1]


def eval_windows(tokens: np.ndarray, context_length: int, max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive non-overlapping windows covering the tokens (teacher forcing): `(N, T)` x and y."""
    n = (len(tokens) - 1) // context_length
    if max_windows is not None:
        n = min(n, max_windows)
    x = tokens[: n * context_length].reshape(n, context_length)
    y = tokens[1 : n * context_length + 1].reshape(n, context_length)
    return x, y
