"""Beam search with the notebook's window, compiled as one `lax` loop: `beam_search`.

    result = jaxgpt.beam_search(model, context, 200, beams=4)   # tokens (B, 4, 200), best first
    text, score = jaxgpt.beam_search_text(model, "ROMEO:", 200, beams=4)[0]

Definition (the torch twin `porting.torch_reference.reference_beam_search` holds to it):
  * a hypothesis' score is the sum of the log-probabilities (log_softmax of the raw logits) of
    its generated tokens; no length penalty: every hypothesis has the same length, and one that
    has produced a `stop` string is frozen, its score kept and compared as is;
  * step 0 expands the context into its `beams` likeliest tokens; every later step scores all
    beams x V continuations and keeps the `beams` best, ties broken by the lower flat index
    beam x V + token. A frozen hypothesis offers one candidate, itself, at flat index beam x V;
  * the logits of a hypothesis come from the notebook's exact loop: its context (prompt, or
    the seed token 0 for an empty one, then its tokens) cropped to the last C tokens at
    positions 0..C-1. So `beams=1` is greedy decoding token for token.

Engine. The B x beams hypotheses are rows of one token stream `(B, beams, C + N)` (the prompt
cropped to C, then the generated tokens); the first C stream tokens of each prompt are
prefilled into a KV cache at once (the rows beyond the prompt hold junk that is masked, then
overwritten, as in engine.py). While the context fits (prompt length + step <= C) each step
decodes every hypothesis' last token from the cache; after the step the surviving
hypotheses' stream rows, KV cache rows and flags are gathered from their parents (a gather
on the beam axis, on the device). Once the context is full every step re-encodes each
hypothesis' window of C tokens, as exact generation does; nothing is cached any more. The
hypotheses of a row usually differ only in their last few tokens, so when all of them agree
on all but the last 8 (or 32) window tokens the shared part is encoded once per row and only
the suffixes per hypothesis (`_beam_windows`), instead of every window whole. Step 0
runs as any other step with the initial scores (0, -inf, ..., -inf): only beam 0's
continuations can be chosen. The loop stops early once every hypothesis is frozen.

Compilation (`TRACE_COUNTS`): once per model configuration and dtype, batch size, beams,
device set, num_new bucket (powers of two from 64) and stop bucket (up to `stop_bucket()`
strings of up to 8 tokens by default; more or longer strings take the next power of two);
never for a new context, its length, a stop string within its bucket or num_new within its
bucket: the prompt length, num_new and the stop strings are traced.
"""

from __future__ import annotations

import collections
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt import engine, sharding
from jaxgpt.model import init_cache
from jaxgpt.score import sampler_of, vocab_of
from jaxgpt.vocab import Vocab

TRACE_COUNTS: collections.Counter = collections.Counter()
"""Number of times the search program was traced (one per compilation) in this process."""

MIN_STEPS, MIN_STOPS, MIN_STOP_LEN = 64, 4, 8  # smallest buckets of num_new and of the stop table
SHARED_SUFFIXES = (8, 32)  # see `_beam_windows`
WILDCARD = -2  # left padding of a stop sequence: matches any token


class BeamResult(NamedTuple):
    """Hypotheses per row, best first.

    Attributes:
      tokens: int32 `(B, beams, num_new)` generated tokens; -1 after a hypothesis' stop string.
      scores: float32 `(B, beams)` sums of the generated tokens' log-probabilities, descending.
      lengths: int32 `(B, beams)` generated tokens, the stop string included.
      stopped: bool `(B, beams)` whether the hypothesis ended with a stop string.
    """

    tokens: np.ndarray
    scores: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray


# ----------------------------------------------------------------------------- model calls
def _prefill(model, tokens, cache):  # (R, C) -> cache holding positions 0..C-1
    return model.prefill(tokens, cache)


def _decode(model, tokens, cache, position):  # (R, 1), all rows at one position -> (R, V), cache
    return model.decode(tokens, cache, jnp.full((tokens.shape[0],), position, jnp.int32))


def _window(model, windows):  # (R, C) -> (R, V) at the last position; the refilled cache is dropped
    r, t = windows.shape
    cache = init_cache(model.config, r, model.token_embedding.embedding.dtype)
    return model.encode_window(windows, cache, jnp.full((r,), t - 1, jnp.int32))[0]


def _extend(model, suffix, prefix_cache):
    """Logits after each beam's window = a prefix shared by the row's beams + its own suffix.

    A local helper over the model's blocks (the model has no multi-token cached entry point):
    the suffix tokens `(B, K, T)` sit at positions P..P+T-1 and attend causally to each other
    and to the row's prefix keys and values `prefix_cache` (B rows, positions 0..P-1 valid,
    P = C - T), computed once per row rather than once per beam. Same arithmetic as the
    model's own forward (pre-norm blocks, eval mode: no dropout).

    Returns:
      float32 logits `(B K, V)` at each window's last position.
    """
    b, k, t = suffix.shape
    start = model.config.context_length - t
    x = model.token_embedding(suffix) + model.pos_embedding(start + jnp.arange(t))  # (B, K, T, D)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # (T, T)
    for block, layer in zip(model.blocks, prefix_cache):
        attention = block.attention
        qkv = attention._qkv(block.norm1(x).reshape(b * k, t, -1))  # (B K, T, 3, H, Kd)
        q, keys, values = (y.reshape(b, k, *y.shape[1:]) for y in qkv.transpose(2, 0, 3, 1, 4))  # (B, K, H, T, Kd)
        scale = math.sqrt(attention.head_size)
        shared = jnp.einsum("bjhtd,bhds->bjhts", q, layer.k[..., :start]) / scale  # (B, K, H, T, P)
        own = jnp.where(causal, jnp.einsum("bjhtd,bjhsd->bjhts", q, keys) / scale, -jnp.inf)  # (B, K, H, T, T)
        probs = jax.nn.softmax(jnp.concatenate([shared, own], axis=-1), axis=-1)
        heads = (jnp.einsum("bjhts,bhsd->bjthd", probs[..., :start], layer.v[:, :, :start])
                 + jnp.einsum("bjhts,bjhsd->bjthd", probs[..., start:], values))  # (B, K, T, H, Kd)
        x = x + attention._output(heads.reshape(b * k, t, *heads.shape[3:])).reshape(x.shape)
        x = x + block.mlp(block.norm2(x))
    return model._logits(x[:, :, -1:].reshape(b * k, 1, -1))[:, 0]


def _shared_window(model, windows, suffix: int):  # (B, K, C), beams equal but the last `suffix` -> (B K, V)
    c = model.config.context_length
    cache = init_cache(model.config, windows.shape[0], model.token_embedding.embedding.dtype)
    cache = _prefill(model, windows[:, 0, : c - suffix], cache)
    return _extend(model, windows[:, :, c - suffix :], cache)


def _beam_windows(model, windows):
    """Logits `(B K, V)` after every hypothesis' window `(B, K, C)`.

    Hypotheses of one row mostly differ in their last few tokens only: when every row's beams
    agree on all but the last 8 (or 32) tokens, the common prefix is encoded once per row and
    only the suffixes per beam (`_extend`); otherwise every window is encoded in full.
    """
    b, k, c = windows.shape
    suffixes = [d for d in SHARED_SUFFIXES if d < c]
    full = lambda w: _window(model, w.reshape(b * k, c))
    if k == 1 or not suffixes:
        return full(windows)
    agree = jnp.all(windows == windows[:, :1], axis=(0, 1))  # (C,)
    fits = [jnp.all(agree[: c - d]) for d in suffixes]
    choice = len(suffixes)
    for i in reversed(range(len(suffixes))):  # the shortest suffix that fits
        choice = jnp.where(fits[i], i, choice)
    branches = [lambda w, d=d: _shared_window(model, w, d) for d in suffixes] + [full]
    return jax.lax.switch(choice, branches, windows)


# ----------------------------------------------------------------------------- the loop
class _State(NamedTuple):
    stream: jax.Array  # int32 (B, K, C + N): prompt at 0..p-1, step j's token at p + j (0 once frozen)
    out: jax.Array  # int32 (B, K, M + N): -1, then step j's token at M + j (-1 once frozen)
    scores: jax.Array  # float32 (B, K)
    frozen: jax.Array  # bool (B, K)


def _gather(x, parents):  # x (B, K, ...), parents (B, K) -> x[b, parents[b, k]]
    return jnp.take_along_axis(x, parents.reshape(*parents.shape, *([1] * (x.ndim - 2))), axis=1)


def _select(state: _State, logp, j, prompt_len, stops, stop_valid):
    """Keeps the best `K` of the K x V continuations; appends their tokens; freezes stopped ones.

    Returns:
      the new `_State` and the parents `(B, K)` (to reorder a KV cache).
    """
    b, k, v = logp.shape
    stay = jnp.full((v,), -jnp.inf).at[0].set(0.0)  # a frozen hypothesis offers only itself
    candidates = jnp.where(state.frozen[..., None], state.scores[..., None] + stay,
                           state.scores[..., None] + logp)  # (B, K, V)
    scores, flat = jax.lax.top_k(candidates.reshape(b, k * v), k)  # ties: lower flat index first
    parents, tokens = flat // v, (flat % v).astype(jnp.int32)  # (B, K)
    was_frozen = _gather(state.frozen, parents)
    stream = _gather(state.stream, parents)
    stream = jax.lax.dynamic_update_slice_in_dim(stream, jnp.where(was_frozen, 0, tokens)[..., None],
                                                 prompt_len + j, axis=2)
    m = stops.shape[1]
    out = _gather(state.out, parents)
    out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(was_frozen, -1, tokens)[..., None], m + j, axis=2)
    tail = jax.lax.dynamic_slice_in_dim(out, j + 1, m, axis=2)  # (B, K, M): the last M generated (or -1)
    hits = jnp.all((stops == WILDCARD) | (tail[:, :, None, :] == stops), axis=-1) & stop_valid  # (B, K, S)
    return _State(stream, out, scores, was_frozen | jnp.any(hits, axis=-1)), parents


def search(graphdef, state, stream, prompt_len, num_new, stops, stop_valid, *, beams: int) -> _State:
    """The whole beam search of B prompts in one program.

    Args:
      graphdef, state: the model's `engine.StaticGraph` and parameters (traced).
      stream: int32 `(B, C + N)`: each prompt (cropped to C, at least one token) left-aligned.
      prompt_len: int32 `()` prompt length p, 1..C.
      num_new: int32 `()` steps, 1..N.
      stops: int32 `(S, M)` stop token sequences, left-padded with `WILDCARD`.
      stop_valid: bool `(S,)` which rows of `stops` are real.
      beams: hypotheses per prompt (static).

    Returns:
      the final `_State`.
    """
    TRACE_COUNTS["search"] += 1
    model = nnx.merge(graphdef.graphdef, state)
    c = model.config.context_length
    b, m = stream.shape[0], stops.shape[1]
    rows = b * beams
    flat = lambda x: x.reshape(rows, *x.shape[2:])  # (B, K, ...) -> (B K, ...)
    cache = _prefill(model, stream[:, :c], init_cache(model.config, b, model.token_embedding.embedding.dtype))
    cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), cache)  # (B K, ...)
    initial = _State(
        stream=jnp.repeat(stream[:, None], beams, axis=1),
        out=jnp.full((b, beams, m + stream.shape[1] - c), -1, jnp.int32),
        scores=jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)[None].repeat(b, axis=0).astype(jnp.float32),
        frozen=jnp.zeros((b, beams), bool))
    live = lambda j, s: (j < num_new) & ~jnp.all(s.frozen)

    def decode_step(loop):  # the context fits: decode the last token of every hypothesis
        j, s, cache = loop
        position = prompt_len + j - 1
        last = jax.lax.dynamic_slice_in_dim(s.stream, position, 1, axis=2)  # (B, K, 1)
        logits, cache = _decode(model, flat(last), cache, position)
        s, parents = _select(s, jax.nn.log_softmax(logits).reshape(b, beams, -1), j, prompt_len, stops, stop_valid)
        cache = jax.tree.map(lambda x: flat(_gather(x.reshape(b, beams, *x.shape[1:]), parents)), cache)
        return j + 1, s, cache

    def window_step(loop):  # the context is full: re-encode every hypothesis' last C tokens
        j, s = loop
        windows = jax.lax.dynamic_slice_in_dim(s.stream, prompt_len + j - c, c, axis=2)  # (B, K, C)
        logits = _beam_windows(model, windows)
        s, _ = _select(s, jax.nn.log_softmax(logits).reshape(b, beams, -1), j, prompt_len, stops, stop_valid)
        return j + 1, s

    cached_steps = jnp.minimum(num_new, c - prompt_len + 1)  # steps with prompt_len + j <= C
    j, s, _ = jax.lax.while_loop(lambda l: live(l[0], l[1]) & (l[0] < cached_steps), decode_step,
                                 (jnp.int32(0), initial, cache))
    _, s = jax.lax.while_loop(lambda l: live(*l), window_step, (j, s))
    return s


search = engine._for_platform(search, static_argnames=("beams",), options=engine.LOOP_OPTIONS)


# ----------------------------------------------------------------------------- API
def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _check_context(context, vocab_size: int) -> np.ndarray:
    context = np.asarray(context)
    if context.ndim != 2 or context.shape[0] < 1:
        raise ValueError(f"context must have shape (batch >= 1, length), got {context.shape}")
    if context.size and not np.issubdtype(context.dtype, np.integer):
        raise ValueError(f"context must hold integer token ids, got dtype {context.dtype}")
    if context.size and (context.min() < 0 or context.max() >= vocab_size):
        raise ValueError(f"context holds token ids outside the vocabulary 0..{vocab_size - 1}")
    return context.astype(np.int32)


def stop_bucket(num: int, longest: int) -> tuple[int, int]:
    """(S, M) shape of the stop table for `num` strings of at most `longest` tokens."""
    return bucket(num, MIN_STOPS), bucket(longest, MIN_STOP_LEN)


def _stop_table(stop, vocab: Vocab):
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a non-empty string or a sequence of them, got {stop!r}")
    encoded = [vocab.encode(s) for s in stop]
    s, m = stop_bucket(len(encoded), max((len(e) for e in encoded), default=1))
    table = np.full((s, m), WILDCARD, np.int32)
    for i, e in enumerate(encoded):
        table[i, m - len(e):] = e
    return table, np.arange(s) < len(encoded)


def beam_search(model, context, num_new: int, *, beams: int = 4, stop=None, vocab=None,
                devices=None) -> BeamResult:
    """The `beams` best continuations of each row of `context` (see the module docstring).

    Args:
      model: a `jaxgpt.GPT` in eval mode, or a `jaxgpt.Sampler` of one.
      context: int `(B, T)` prompts as for `generate_tokens`: T = 0 is the seed token; T > C
        keeps the last C.
      num_new: tokens per hypothesis (>= 1).
      beams: hypotheses kept per row, 1..vocab_size.
      stop: a string or a sequence of strings; a hypothesis whose generated text ends with one
        is frozen (its later tokens are -1).
      vocab: the `Vocab` (or JSON path) that encodes `stop`; default: the published map.
      devices: rows split over devices as in `generate_tokens` (None: all local devices).

    Returns:
      `BeamResult`, hypotheses best first.

    Raises:
      ValueError: bad context, num_new, beams, stop or devices (checked before anything runs).
    """
    model = sampler_of(model)
    config = model.config
    context = _check_context(context, config.vocab_size)
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"the number of new tokens must be a positive integer, got {num_new!r}")
    if isinstance(beams, bool) or not isinstance(beams, (int, np.integer)) or not 1 <= beams <= config.vocab_size:
        raise ValueError(f"beams must be an integer in 1..vocab_size={config.vocab_size}, got {beams!r}")
    stops, stop_valid = _stop_table(stop, vocab_of(config, vocab))
    chosen = sharding.resolve_devices(devices)[: context.shape[0]]
    batch, c = context.shape[0], config.context_length
    if context.shape[1] == 0:
        context = np.zeros((batch, 1), np.int32)  # the notebook's seed context [[0]]
    context = context[:, -c:]
    p = context.shape[1]
    stream = np.zeros((sharding.padded_size(batch, len(chosen)), c + bucket(num_new, MIN_STEPS)), np.int32)
    stream[:batch, :p] = context
    whole, rows = sharding.placements(chosen)
    final = search(model.graphdef, model.state_on(chosen), jax.device_put(stream, rows), np.int32(p),
                   np.int32(num_new), jax.device_put(stops, whole), jax.device_put(stop_valid, whole),
                   beams=int(beams))
    m = stops.shape[1]
    tokens = np.asarray(final.out)[:batch, :, m : m + num_new]
    return BeamResult(tokens, np.asarray(final.scores)[:batch], (tokens >= 0).sum(-1).astype(np.int32),
                      np.asarray(final.frozen)[:batch])


def beam_search_text(model, prompt: str, num_chars: int, beams: int = 4, *, stop=None,
                     vocab: Vocab | str | os.PathLike | None = None, devices=None) -> list[tuple[str, float]]:
    """The `beams` best continuations of `prompt` as (text, score), best first.

    Args:
      model: a `jaxgpt.GPT` in eval mode, or a `jaxgpt.Sampler` of one.
      prompt: text to continue; "" starts from the seed token (newline).
      num_chars: characters per hypothesis.
      beams: hypotheses kept.
      stop: string(s) that end a hypothesis; the text ends before the stop string.
      vocab, devices: as in `beam_search`.

    Returns:
      list of `beams` (text, score) pairs; score is the sum of the characters' log-probabilities.
    """
    model = sampler_of(model)
    vocab = vocab_of(model.config, vocab)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    context = vocab.encode(prompt).reshape(1, len(prompt))
    result = beam_search(model, context, num_chars, beams=beams, stop=stop, vocab=vocab, devices=devices)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    texts = []
    for row, score, stopped in zip(result.tokens[0], result.scores[0], result.stopped[0]):
        text = vocab.decode(row[row >= 0])
        if stopped:
            text = text[: -max(len(s) for s in stops if text.endswith(s))]  # the longest, as `complete` trims
        texts.append((text, float(score)))
    return texts
