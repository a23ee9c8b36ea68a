"""Per-character log-probabilities of a text, exactly as generation sees it: `score`.

    logprobs = jaxgpt.score(model, "ROMEO:\\nBut soft!")   # float32 (14,), natural log

Definition. Token stream S = [seed token 0] + text. Character i (= S[i + 1]) is scored with
the context generation would have when producing it: the notebook's loop crops the context to
its last C = context_length tokens, so character i is conditioned on S[max(0, i + 1 - C) :
i + 1] at positions 0, 1, ...; the first character is conditioned on the seed token alone,
and a text longer than C is scored with the sliding window (every character past the first
C has its own window of exactly C tokens), not in disjoint chunks. `mode="strided"` uses
strided generation's windowing instead (generate.py): once the context overflows, the oldest
`stride` tokens are dropped at once, so character i sees between C + 1 - stride and C tokens.

How it is computed. Predictions are grouped by the window they are made in: a window is C
tokens S[b : b + C] at positions 0..C-1, and one causal forward pass over it gives the
prediction of every character whose context starts at b (the row of the last context token).
In exact mode window 0 covers the first C characters and every later character is the last
row of its own window; in strided mode each window covers `stride` characters. The windows
go through the model `WINDOWS_PER_CALL` at a time in one compiled call (the last call padded
with copies, so every call has one shape). Compilation: once per model configuration and
parameter dtype, mode (exact compiles a one-window full pass and a last-row batch pass;
strided one full batch pass) and `top` (the number of alternatives); never for a new text or
its length.

Cost: exact mode pays one full C-token forward per character past the first C (1.22 GFLOP at
the published size), like exact generation; strided mode one per `stride` characters.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import init_cache
from jaxgpt.vocab import Vocab

WINDOWS_PER_CALL = {"cpu": 8}
"""Windows per compiled call by platform (others: `DEFAULT_WINDOWS_PER_CALL`). On a CPU small
batches are faster per window: a batch's attention scores (G, H, C, C) then stay in the cores'
caches. An accelerator wants many windows at once. The calls' fixed shape means one
compilation per mode."""
DEFAULT_WINDOWS_PER_CALL = 256

TRACE_COUNTS: dict[str, int] = {"windows": 0}
"""Number of times the window program was traced (one per compilation) in this process."""


class Scores(NamedTuple):
    """Per-character scores and the likeliest alternatives.

    Attributes:
      logprobs: float32 `(n,)`: log p(character i | its context), natural log.
      top_ids: int32 `(n, k)`: the k likeliest tokens at character i, most likely first.
      top_logprobs: float32 `(n, k)`: their log-probabilities.
    """

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


# ----------------------------------------------------------------------------- model calls
def _all_logits(model, windows):  # (G, C) -> (G, C, V)
    return model(windows)


def _last_logits(model, windows):  # (G, C) -> (G, 1, V): the last row only
    # The refilled cache is unused, so XLA drops its allocation and writes.
    g, t = windows.shape
    last = jnp.full((g,), t - 1, jnp.int32)
    return model.encode_window(windows, init_cache(model.config, g, model.token_embedding.embedding.dtype), last)[0][:, None]


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only", "top"))
def _window_scores(graphdef, state, windows, targets, *, last_only: bool, top: int):
    """Log-probabilities of `targets` under one causal pass per window.

    Args:
      graphdef, state: `nnx.split` of a GPT in eval mode, the graphdef in an `engine.StaticGraph`.
      windows: int32 `(G, C)` windows at positions 0..C-1.
      targets: int32 `(G, R)`: row t's target is the token following windows[:, t] (R = C), or
        following the last token (R = 1 with last_only).
      last_only: compute the last row's logits only.
      top: number of alternatives returned.

    Returns:
      logprobs `(G, R)`, top ids `(G, R, top)`, top logprobs `(G, R, top)`.
    """
    TRACE_COUNTS["windows"] += 1
    model = nnx.merge(graphdef.graphdef, state)
    logits = _last_logits(model, windows) if last_only else _all_logits(model, windows)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (G, R, V)
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    top_logp, top_ids = jax.lax.top_k(logp, top)
    return chosen, top_ids.astype(jnp.int32), top_logp


# ----------------------------------------------------------------------------- windowing
def window_starts(n: int, context_length: int, stride: int = 1) -> np.ndarray:
    """Start b(L) of the context of every prediction, L = 1..n tokens already seen.

    The context of the prediction after L tokens of S is S[b(L) : L]: b = 0 while L <= C;
    past it the oldest `stride` tokens are dropped whenever the context would exceed C, as
    generation does (stride 1 is exact mode: b = L - C).

    Returns:
      int64 `(n,)`.
    """
    seen = np.arange(1, n + 1)
    over = np.maximum(seen - context_length, 0)
    return np.where(over > 0, stride * ((over - 1) // stride + 1), 0)


def _check_mode(mode: str, stride: int | None, context_length: int) -> int:
    if mode == "exact":
        if stride is not None:
            raise ValueError("stride applies to mode='strided' only")
        return 1
    if mode != "strided":
        raise ValueError(f"mode must be one of ('exact', 'strided'), got {mode!r}")
    from jaxgpt.generate import default_stride

    stride = default_stride(context_length) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= context_length:
        raise ValueError(f"stride must be an integer in 1..context_length={context_length}, got {stride!r}")
    return int(stride)


def sampler_of(model):
    """`model` as a `jaxgpt.Sampler` (split and placed once): a GPT in eval mode, or a Sampler."""
    from jaxgpt.generate import Sampler

    return model if isinstance(model, Sampler) else Sampler(model)


def vocab_of(config, vocab: Vocab | str | os.PathLike | None) -> Vocab:
    """`vocab` (a Vocab or a JSON path; None: the published map), checked against the model's size."""
    from jaxgpt.vocab import default_vocab

    vocab = default_vocab() if vocab is None else vocab if isinstance(vocab, Vocab) else Vocab.load(vocab)
    if vocab.size != config.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.size} characters but the model's vocab_size is "
                         f"{config.vocab_size}: pass the checkpoint's vocabulary JSON")
    return vocab


def _prepared(model):
    """(config, `engine.StaticGraph`, parameters on the default device) of a GPT or Sampler."""
    sampler = sampler_of(model)
    return sampler.config, sampler.graphdef, sampler.state_on(jax.local_devices()[:1])


def score_tokens(model, tokens, *, mode: str = "exact", stride: int | None = None, top: int = 5,
                 windows_per_call: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Scores:
    """Log-probability of every token of `tokens`, each given the seed token and all before it.

    Args:
      model: a `jaxgpt.GPT` in eval mode, or a `jaxgpt.Sampler` of one.
      tokens: int `(n,)` token ids, n >= 1.
      mode: "exact" (the notebook's window) or "strided" (strided generation's windows).
      stride: strided mode's stride, 1..C (default C // 2).
      top: alternatives per position in the result (1..V).
      windows_per_call: windows per compiled call (a new value compiles anew); default
        `WINDOWS_PER_CALL` of the parameters' platform.
      progress: called as progress(windows_done, windows_total) after each call.

    Returns:
      `Scores` with n rows.

    Raises:
      ValueError: empty or non-integer tokens, ids outside the vocabulary, a bad mode/stride/top.
    """
    config, graphdef, state = _prepared(model)
    c, v = config.context_length, config.vocab_size
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= v:
        raise ValueError(f"tokens hold ids outside the vocabulary 0..{v - 1}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 1 <= top <= v:
        raise ValueError(f"top must be an integer in 1..{v}, got {top!r}")
    stride = _check_mode(mode, stride, c)
    n = tokens.size
    stream = np.zeros(n + 1 + c, np.int32)  # S, then zeros: rows past the end are never used
    stream[1 : n + 1] = tokens
    starts = window_starts(n, c, stride)
    # Exact mode: window 0 gives every row, later windows only their last row.
    first_pass = [0] if mode == "exact" else sorted(set(starts.tolist()))
    later = np.arange(1, n - c + 1) if mode == "exact" else np.zeros(0, np.int64)
    total = len(first_pass) + len(later)
    done = 0
    out = Scores(np.empty(n, np.float32), np.empty((n, top), np.int32), np.empty((n, top), np.float32))

    def run(bases, last_only: bool, group: int):
        nonlocal done
        for i in range(0, len(bases), group):
            chunk = np.asarray(bases[i : i + group], np.int64)
            padded = np.concatenate([chunk, np.full(group - len(chunk), chunk[0])])  # one shape
            index = padded[:, None] + np.arange(c)[None]  # (G, C)
            targets = stream[index + 1][:, -1:] if last_only else stream[index + 1]
            results = _window_scores(graphdef, state, stream[index], targets, last_only=last_only, top=int(top))
            logp, ids, top_logp = (np.asarray(a)[: len(chunk)] for a in results)
            for row, b in enumerate(chunk):
                if last_only:  # the prediction after L = b + C tokens: row C - 1
                    seen, rows = np.array([b + c]), np.zeros(1, np.int64)
                else:  # every prediction whose context starts at b: row L - 1 - b
                    seen = np.arange(np.searchsorted(starts, b), np.searchsorted(starts, b, "right")) + 1
                    rows = seen - 1 - b
                out.logprobs[seen - 1], out.top_ids[seen - 1] = logp[row, rows], ids[row, rows]
                out.top_logprobs[seen - 1] = top_logp[row, rows]
            done += len(chunk)
            if progress is not None:
                progress(done, total)

    if windows_per_call is None:
        platform = next(iter(jax.tree.leaves(state)[0].devices())).platform
        windows_per_call = WINDOWS_PER_CALL.get(platform, DEFAULT_WINDOWS_PER_CALL)
    run(first_pass, last_only=False, group=1 if mode == "exact" else int(windows_per_call))
    run(later, last_only=True, group=int(windows_per_call))
    return out


def score_details(model, text: str, *, vocab: Vocab | str | os.PathLike | None = None, mode: str = "exact",
                  stride: int | None = None, top: int = 5, progress=None) -> Scores:
    """`score` with the `top` likeliest alternatives per character (for the HTML page and the CLI)."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    sampler = sampler_of(model)
    tokens = vocab_of(sampler.config, vocab).encode(text)
    return score_tokens(sampler, tokens, mode=mode, stride=stride, top=top, progress=progress)


def score(model, text: str, *, vocab: Vocab | str | os.PathLike | None = None, mode: str = "exact",
          stride: int | None = None) -> np.ndarray:
    """The log-probability of every character of `text` given everything before it.

    Character i is conditioned on the seed token (0, newline) followed by text[:i], cropped to
    the last C tokens at positions 0..C-1, exactly as generation sees it (see the module
    docstring); `mode="strided"` uses strided generation's windowing.

    Args:
      model: a `jaxgpt.GPT` in eval mode, or a `jaxgpt.Sampler` of one.
      text: a non-empty string of vocabulary characters.
      vocab: a `Vocab` or vocabulary JSON path; default: the published 104-character map.
      mode: "exact" or "strided".
      stride: strided mode's stride (default C // 2).

    Returns:
      float32 numpy array `(len(text),)` of natural-log probabilities; its negated sum is the
      text's total surprisal in nats.

    Raises:
      VocabError: a character outside the vocabulary.
      ValueError: an empty text, bad mode/stride, or a vocabulary of another size.
    """
    return score_details(model, text, vocab=vocab, mode=mode, stride=stride, top=1).logprobs
