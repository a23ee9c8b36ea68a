"""Teacher-forced evaluation of a text: loss in nats/char, bits/char and perplexity.

The text is cut into consecutive windows of `context_length` characters; each window is one
forward pass that predicts every next character from the ones before it in the same window
(positions 0..T-1, as the model was trained). The last, shorter window covers the rest, so
every character after the first is predicted exactly once. The same windows can be scored by
the notebook's torch model (`porting.torch_reference.evaluate_torch`) to show both frameworks agree.

Devices: as generation, evaluation splits each batch of windows over every local device when
more than one is visible (parameters replicated, windows split by rows over a "data" mesh,
jaxgpt/sharding.py); XLA partitions the same program and sums across devices. `devices=1`
runs on one device. The figures agree with one device's to float32 rounding of the sum.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import sharding
from jaxgpt.data import DataError, eval_windows
from jaxgpt.validation import positive_int


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Average next-character loss over a text.

    Attributes:
      nats_per_char: mean negative log-likelihood (natural log) per predicted character.
      num_chars: characters predicted (the text's length minus one).
      num_windows: forward passes (windows of up to context_length characters).
    """

    nats_per_char: float
    num_chars: int
    num_windows: int

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2.0)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_char)

    def as_dict(self) -> dict:
        return {"nats_per_char": self.nats_per_char, "bits_per_char": self.bits_per_char,
                "perplexity": self.perplexity, "num_chars": self.num_chars, "num_windows": self.num_windows}


def windows(tokens: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All teacher-forcing windows, the last one padded: x, y int32 `(N, T)`, mask float32 `(N, T)`.

    Padding sits after the real tokens of the last window, so by causality it changes none
    of their predictions; the mask removes its own.

    Raises:
      DataError: fewer than two tokens (nothing to predict).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if len(tokens) < 2:
        raise DataError(f"the text has {len(tokens)} character(s); at least 2 are needed to predict one")
    x, y = eval_windows(tokens, context_length)
    mask = np.ones(x.shape, np.float32)
    rest = len(tokens) - 1 - x.size  # predictions the full windows leave out
    if rest:
        tail_x = np.zeros((1, context_length), np.int32)
        tail_y = np.zeros((1, context_length), np.int32)
        tail_mask = np.zeros((1, context_length), np.float32)
        tail_x[0, :rest] = tokens[x.size : x.size + rest]
        tail_y[0, :rest] = tokens[x.size + 1 : x.size + rest + 1]
        tail_mask[0, :rest] = 1.0
        x, y, mask = np.concatenate([x, tail_x]), np.concatenate([y, tail_y]), np.concatenate([mask, tail_mask])
    return x, y, mask


def window_batches(x, y, mask, batch_size: int, progress: bool = False
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed-shape batches `(batch_size, T)` of `windows`; the last is padded with masked-out rows
    (one compile). `progress` shows a tqdm bar over them."""
    if progress:
        from tqdm.auto import tqdm

        yield from tqdm(window_batches(x, y, mask, batch_size), total=-(-len(x) // batch_size), unit="batch",
                        dynamic_ncols=True, leave=False)
        return
    for i in range(0, len(x), batch_size):
        bx, by, bm = x[i : i + batch_size], y[i : i + batch_size], mask[i : i + batch_size]
        pad = batch_size - len(bx)
        if pad:
            bx = np.concatenate([bx, np.zeros((pad, bx.shape[1]), bx.dtype)])
            by = np.concatenate([by, np.zeros((pad, by.shape[1]), by.dtype)])
            bm = np.concatenate([bm, np.zeros((pad, bm.shape[1]), bm.dtype)])
        yield bx, by, bm


@functools.lru_cache(maxsize=8)
def make_nll_sum(graphdef) -> Callable:
    """Jitted `nll_sum(params, x, y, mask) -> float32` sum of masked -log p(y | x) (eval-mode graphdef).

    Cached per model structure: evaluating models of one configuration again reuses the compiled
    program (it compiles once per batch shape).
    """

    def nll_sum(params, x, y, mask):
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)  # (B, T, V)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (B, T)
        return -(picked * mask).sum()

    return jax.jit(nll_sum)


def evaluate(model, tokens: np.ndarray, *, batch_size: int = 32, progress: bool = False,
             devices=None) -> EvalResult:
    """Teacher-forced loss of `model` over `tokens`.

    Args:
      model: a `jaxgpt.GPT` (evaluated in eval mode: dropout off).
      tokens: int ids `(N,)`, N >= 2, all < vocab_size.
      batch_size: windows per forward pass (a fixed shape: compiles once); rounded up to a
        multiple of the number of devices.
      progress: show a tqdm bar over the batches.
      devices: None for every local device, an int n for the first n, or a list of devices
        (`sharding.resolve_devices`).

    Returns:
      `EvalResult`: per-character sums accumulated in float64 across batches.
    """
    batch_size = positive_int(batch_size, "batch_size")
    config = model.config
    _check_ids(tokens, config.vocab_size)
    chosen = sharding.resolve_devices(devices)
    was_training = model.training
    model.eval()
    graphdef, params = nnx.split(model)
    if was_training:
        model.train()
    nll_sum = make_nll_sum(graphdef)
    place = lambda array: array
    if len(chosen) > 1:
        mesh = sharding.data_mesh(chosen)
        params = jax.device_put(params, sharding.replicated(mesh))
        rows = sharding.batch_sharded(mesh)
        place = lambda array: jax.device_put(array, rows)
        batch_size = sharding.padded_size(batch_size, len(chosen))  # padding rows are masked out
    x, y, mask = windows(tokens, config.context_length)
    total = 0.0
    for bx, by, bm in window_batches(x, y, mask, batch_size, progress):
        total += float(nll_sum(params, place(bx), place(by), place(bm)))
    count = int(mask.sum())
    return EvalResult(total / count, count, len(x))


def _check_ids(tokens, vocab_size: int) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DataError(f"token ids must be in 0..{vocab_size - 1} (the model's vocabulary), "
                        f"found {int(tokens.min())}..{int(tokens.max())}")
