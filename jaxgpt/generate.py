"""Text generation with the notebook's semantics: `generate`, `generate_tokens`, streaming.

    model = porting.load_weights("weights.pt")
    print(jaxgpt.generate(model, "ROMEO:", 500, seed=1, temperature=0.8, top_p=0.95))

These are views of the one engine (`jaxgpt.batching.Batcher`) for a batch whose rows all run
the same number of steps with the same options; `jaxgpt.complete` serves independent requests.

Modes:
  "exact" (default): the notebook's loop. The context grows from the prompt (or the seed
    token, newline, for an empty prompt) and is cropped to its last C = context_length
    tokens; each token is drawn from the model's prediction at the last position. While the
    context fits, tokens are decoded one at a time from a KV cache; once it is full every step
    re-encodes the last C tokens at positions 0..C-1 with a full forward pass, as the
    notebook does (learned absolute positions shift, so nothing can be reused).
  "strided" (opt-in): when the window is full, the oldest `stride` tokens are dropped at once
    and the remaining C + 1 - stride are re-encoded at positions 0..C-stride in one pass that
    refills the cache; the next stride - 1 tokens are decoded from the cache. Each token then
    conditions on between C + 1 - stride and C previous tokens instead of exactly C (exact mode
    is stride = 1), so the text differs from the notebook's once the window is full and may be
    predicted a little worse; only one step in `stride` pays for a full forward pass. The
    default stride is C // 2; `benchmarks/results/strided_quality.md` measures what strides
    cost in held-out loss and gain in speed.

Randomness: row r at step j draws uniform(fold_in(fold_in(key(seed), r), j)), so rows are
independent, a row's text depends neither on the batch size nor on chunking, and
`sampling.sampling_uniforms` gives the same numbers to a torch loop.

Devices (jaxgpt/sharding.py): by default the rows are split over every local device (a 1-D
"data" mesh, parameters replicated); `devices=1` runs on one device. See `jaxgpt.engine` for
what compiles when.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from jaxgpt import engine
from jaxgpt.batching import Batcher, Sampler, as_sampler, vocab_for
from jaxgpt.options import MODES, Options, default_stride  # noqa: F401 (MODES, default_stride: re-exported)
from jaxgpt.validation import integer, positive_int
from jaxgpt.vocab import Vocab

__all__ = ["Sampler", "generate", "generate_tokens", "stream_text", "stream_tokens"]


def _check_context(context, vocab_size: int) -> np.ndarray:
    context = np.asarray(context)
    if context.ndim != 2:
        raise ValueError(f"context must have shape (batch, length), got {context.shape}")
    if context.shape[0] < 1:
        raise ValueError("context must have at least one row (batch >= 1)")
    if context.size and not np.issubdtype(context.dtype, np.integer):
        raise ValueError(f"context must hold integer token ids, got dtype {context.dtype}")
    if context.size and (context.min() < 0 or context.max() >= vocab_size):
        bad = int(context.min()) if context.min() < 0 else int(context.max())
        raise ValueError(f"context holds token id {bad}, outside the vocabulary 0..{vocab_size - 1}")
    return context.astype(np.int32)


def _lockstep(batcher: Batcher, prompts, num_new: int, options: Options, seed: int,
              chunk_size: int) -> Iterator[np.ndarray]:
    """Every prompt as row r (stream (seed, r)) for `num_new` tokens; yields `(B, n)` chunks."""
    rows = len(prompts)
    for r, prompt in enumerate(prompts):
        batcher.add(prompt, num_new, options, seed=seed, stream=r, tag=r)
    out = [[] for _ in range(rows)]
    sent = 0
    while sent < num_new:
        target = min(sent + chunk_size, num_new)
        while min(len(row) for row in out) < target:
            for event in batcher.step(min(target - min(len(row) for row in out), engine.CHUNK)):
                out[event.tag].extend(event.tokens.tolist())
        yield np.array([row[sent:target] for row in out], np.int32).reshape(rows, target - sent)
        sent = target


LOCKSTEP_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logit_bias", "mode", "stride")
"""The `Options` fields `stream_text` and `generate` take: every row runs for exactly the number
of characters asked, so stop strings (and log-probabilities, which they cannot return) belong
to `jaxgpt.complete` and `jaxgpt.stream_completions`."""


def _lockstep_options(options: dict) -> Options:
    unknown = sorted(set(options) - set(LOCKSTEP_OPTIONS))
    if unknown:
        raise ValueError(f"unexpected option(s) {', '.join(unknown)}: this call takes {', '.join(LOCKSTEP_OPTIONS)}"
                         " (stop strings and log-probabilities: jaxgpt.complete or stream_completions)")
    return Options(**options)


def stream_tokens(model, context, num_new: int, *, seed: int = 0, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, mode: str = "exact",
                  stride: int | None = None, chunk_size: int | None = None,
                  devices=None) -> Iterator[np.ndarray]:
    """Generates tokens chunk by chunk; the concatenated chunks equal `generate_tokens`.

    Args:
      model: a `jaxgpt.GPT` in eval mode or a `Sampler` of one (faster for repeated calls).
      context: int `(B, T)` prompt token ids, one prompt per row; T = 0 means the notebook's
        seed token (id 0, newline), which is not part of the output; T > C keeps the last C.
      num_new: tokens to generate per row (>= 1).
      seed: integer in [0, 2**32); row r at step j draws from fold_in(fold_in(key(seed), r), j).
      temperature, top_k, top_p, mode, stride: see `jaxgpt.Options`.
      chunk_size: tokens per yielded chunk (default: everything in one chunk); never changes
        the tokens.
      devices: None (every local device), a count, or a list of devices; never changes the tokens.

    Yields:
      int32 numpy arrays `(B, n)`, n = chunk_size except possibly for the last chunk.

    Raises:
      ValueError: bad context, num_new, seed, sampling, mode or devices (before anything runs).
    """
    model = as_sampler(model)
    context = _check_context(context, model.config.vocab_size)
    num_new = positive_int(num_new, "the number of new tokens")
    integer(seed, "seed", 0, 2**32 - 1)
    chunk_size = num_new if chunk_size is None else positive_int(chunk_size, "chunk_size")
    options = Options(temperature=temperature, top_k=top_k, top_p=top_p, mode=mode, stride=stride)
    options.keep(model.config.context_length)  # a stride longer than the context fails here
    batcher = Batcher(model, context.shape[0], devices=devices)
    return _lockstep(batcher, list(context), num_new, options, int(seed), chunk_size)


def generate_tokens(model, context, num_new: int, *, seed: int = 0, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, mode: str = "exact",
                    stride: int | None = None, devices=None) -> np.ndarray:
    """Continues each row of `context` by `num_new` tokens, as the notebook's loop would.

    Args: as `stream_tokens` (without chunking).

    Returns:
      int32 numpy array `(B, num_new)`: the generated tokens only.
    """
    chunks = stream_tokens(model, context, num_new, seed=seed, temperature=temperature, top_k=top_k,
                           top_p=top_p, mode=mode, stride=stride, devices=devices)
    return np.concatenate(list(chunks), axis=1)


def stream_text(model, prompt: str | Sequence[str] = "", num_chars: int = 500, *, batch: int = 1,
                vocab: Vocab | str | os.PathLike | None = None, chunk_size: int | None = None,
                seed: int = 0, devices=None, **options) -> Iterator[list[str]]:
    """Generates text chunk by chunk: yields, per chunk, one string per sample.

    Args:
      model: a `jaxgpt.GPT` in eval mode or a `Sampler` of one.
      prompt: the text to continue; "" starts from the notebook's seed token (newline). A list
        gives one prompt per row (any lengths).
      num_chars: characters to generate per sample (the prompt is not repeated).
      batch: number of samples for a single prompt string (rows are independent draws).
      vocab: a `Vocab` or a vocabulary JSON path; default: the published 104-character map.
      chunk_size: characters per yielded chunk (default: all at once).
      seed, devices: as `stream_tokens`.
      **options: `LOCKSTEP_OPTIONS` (temperature, top_k, top_p, min_p, repetition_penalty,
        logit_bias, mode, stride), see `jaxgpt.Options`.

    Yields:
      lists of B strings.
    """
    model = as_sampler(model)
    vocab = vocab_for(model.config, vocab)
    if vocab is None:
        raise ValueError(f"the published vocabulary has 104 characters but the model's vocab_size is "
                         f"{model.config.vocab_size}: pass the checkpoint's vocabulary JSON")
    prompts = [prompt] * positive_int(batch, "batch") if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    ids = [vocab.encode(p) for p in prompts]  # VocabError names unknown characters
    num_chars = positive_int(num_chars, "the number of new tokens")
    integer(seed, "seed", 0, 2**32 - 1)
    chunk_size = num_chars if chunk_size is None else positive_int(chunk_size, "chunk_size")
    row_options = _lockstep_options(options)
    row_options.keep(model.config.context_length)
    batcher = Batcher(model, len(prompts), vocab=vocab, devices=devices)
    chunks = _lockstep(batcher, ids, num_chars, row_options, int(seed), chunk_size)
    return ([vocab.decode(row) for row in chunk] for chunk in chunks)


def generate(model, prompt: str = "", num_chars: int = 500, *,
             vocab: Vocab | str | os.PathLike | None = None, **options) -> str:
    """Continues `prompt` by `num_chars` characters, as the notebook's loop would.

    Args:
      model: a `jaxgpt.GPT` in eval mode or a `Sampler` of one.
      prompt: text to continue; "" starts from the notebook's seed token (newline).
      num_chars: characters to generate (>= 1); the prompt is not repeated.
      vocab: a `Vocab` or vocabulary JSON path; default: the published 104-character map.
      **options: seed, devices and `LOCKSTEP_OPTIONS`, as in `stream_text`.

    Returns:
      The generated characters.

    Raises:
      VocabError: a prompt character outside the vocabulary.
      ValueError: bad options, or a vocabulary whose size differs from the model's.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return "".join(chunk[0] for chunk in stream_text(model, prompt, num_chars, vocab=vocab, **options))
