"""Next-token sampling, one rule for every row of a batch, each row with its own values.

The rule, in this order (`porting.torch_reference.adjust_logits`, `filter_logits` and
`inverse_cdf_pick` are its torch twins, so a torch loop fed the same uniforms picks the same
tokens):

1. logits + logit_bias (a bias of -inf bans a character);
2. repetition penalty (CTRL / Hugging Face): for each character present in the current window,
   a positive logit is divided by the penalty, a negative one multiplied;
3. greedy rows (temperature 0 or top_k 1) take the argmax of these logits (first on ties);
   the others continue:
4. / temperature;
5. top-k: keep every logit >= the k-th largest (ties kept, so more than k may survive);
6. top-p: in descending probability order keep each token whose *preceding* cumulative mass is
   < p (the most likely token always survives);
7. min-p: keep the tokens whose probability is >= min_p x the top probability;
8. the first index whose cumulative probability exceeds u * total, for one uniform u in [0, 1).

Temperature 1 without filters draws from softmax(logits), the distribution of the notebook's
`torch.multinomial` (same distribution, different random stream). Every parameter is a traced
per-row array (`SamplingParams`), so no value ever recompiles; each step skips the sorts and
masks no row asks for (a `lax.cond` on the batch), and a skipped step gives the same bits.

Randomness: row r's uniform at its step j is uniform(fold_in(fold_in(key(seed_r), stream_r), j));
`row_keys` makes the per-row keys, `sampling_uniforms` returns the numbers for a torch loop.
The log-probabilities reported with a token are log_softmax of the raw logits (the model's own
distribution, before any of the steps above).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParams(NamedTuple):
    """Per-row sampling values; every field is traced.

    Attributes:
      temperature: float32 `(B,)`; 0 is greedy.
      top_k: int32 `(B,)`; vocab_size means no top-k filter; 1 is greedy.
      top_p: float32 `(B,)` in (0, 1]; 1 means no nucleus filter.
      min_p: float32 `(B,)` in [0, 1]; 0 means no min-p filter.
      repetition_penalty: float32 `(B,)` > 0; 1 means none.
      logit_bias: float32 `(B, V)` added to the logits; 0 means none, -inf bans.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    logit_bias: jax.Array


def adjust_logits(logits: jax.Array, params: SamplingParams, window=None, length=None) -> jax.Array:
    """Steps 1-2: bias, then the repetition penalty over each row's current window.

    Args:
      logits: float `(B, V)`.
      params: `SamplingParams` of B rows.
      window: int `(B, C)` tokens of each row's current context (positions < length[b] count),
        or None (no repetition penalty).
      length: int `(B,)` the windows' lengths.
    """
    logits = logits.astype(jnp.float32) + params.logit_bias
    if window is None:
        return logits

    def penalise(x):
        valid = jnp.arange(window.shape[1]) < length[:, None]  # (B, C)
        present = jnp.any((window[..., None] == jnp.arange(x.shape[-1])) & valid[..., None], axis=1)  # (B, V)
        p = params.repetition_penalty[:, None]
        return jnp.where(present, jnp.where(x > 0, x / p, x * p), x)

    return jax.lax.cond(jnp.any(params.repetition_penalty != 1), penalise, lambda x: x, logits)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Steps 4-7: temperature (> 0 here), top-k, top-p, min-p; removed entries become -inf.

    Each filter sorts or reduces the vocabulary, so each runs only when some row asks for it.
    """
    logits = logits / params.temperature[:, None]
    v = logits.shape[-1]
    top_k, top_p, min_p = jnp.any(params.top_k < v), jnp.any(params.top_p < 1.0), jnp.any(params.min_p > 0.0)

    def filters(x):  # one outer cond: an unfiltered step pays for one branch, not three
        x = jax.lax.cond(top_k, _top_k, lambda x, _: x, x, params.top_k)
        x = jax.lax.cond(top_p, _top_p, lambda x, _: x, x, params.top_p)
        return jax.lax.cond(min_p, _min_p, lambda x, _: x, x, params.min_p)

    return jax.lax.cond(top_k | top_p | min_p, filters, lambda x: x, logits)


def _top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Removes every logit below its row's k-th largest; ties with it are kept."""
    v = logits.shape[-1]
    k = jnp.clip(top_k, 1, v)  # k-th largest = element V-k of the ascending sort
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), (v - k)[:, None], axis=-1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Removes each token whose strictly more probable tokens already hold mass >= top_p.

    Stable order on ties, as torch's stable descending sort. Rows with top_p == 1 are left
    untouched (rounding could otherwise push a negligible tail token's preceding mass to 1.0).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    before_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    before = jnp.put_along_axis(jnp.zeros_like(before_sorted), order, before_sorted, axis=-1, inplace=False)
    return jnp.where((before >= top_p[:, None]) & (top_p[:, None] < 1.0), -jnp.inf, logits)


def _min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Removes the tokens whose probability is below min_p x the row's top probability."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, -jnp.inf, logits)


def inverse_cdf_pick(logits: jax.Array, u: jax.Array) -> jax.Array:
    """First index whose cumulative probability exceeds u * total.

    Args:
      logits: float `(B, V)` (entries may be -inf).
      u: float `(B,)` uniforms in [0, 1).

    Returns:
      int32 `(B,)` token ids.
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    threshold = u[..., None].astype(jnp.float32) * cdf[..., -1:]
    index = jnp.sum(cdf <= threshold, axis=-1, dtype=jnp.int32)
    return jnp.minimum(index, logits.shape[-1] - 1)


def sample(logits: jax.Array, u: jax.Array, params: SamplingParams, window=None, length=None) -> jax.Array:
    """The next token of each row by the rule above.

    Args:
      logits: float `(B, V)` raw logits.
      u: float32 `(B,)` one uniform in [0, 1) per row (unused by greedy rows).
      params: `SamplingParams` of B rows.
      window, length: each row's current context for the repetition penalty (`adjust_logits`).

    Returns:
      int32 `(B,)` token ids.
    """
    adjusted = adjust_logits(logits, params, window, length)
    greedy = (params.temperature == 0) | (params.top_k == 1)
    # A placeholder temperature keeps the greedy rows' discarded draw free of inf/NaN.
    safe = params._replace(temperature=jnp.where(greedy, 1.0, params.temperature))
    drawn = inverse_cdf_pick(filter_logits(adjusted, safe), u)
    return jnp.where(greedy, jnp.argmax(adjusted, axis=-1).astype(jnp.int32), drawn)


# ----------------------------------------------------------------------------- randomness
def row_keys(seeds, streams) -> jax.Array:
    """One key per row: fold_in(key(seed_r), stream_r). `seeds`, `streams`: uint32 `(B,)`; keys `(B,)`."""
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(
        jnp.asarray(seeds, jnp.uint32), jnp.asarray(streams, jnp.uint32))


def step_uniforms(keys: jax.Array, steps) -> jax.Array:
    """The uniforms of each row's step `steps[r]` (int `(B,)`, or one int for all): float32 `(B,)`."""
    steps = jnp.broadcast_to(jnp.asarray(steps), keys.shape)
    return jax.vmap(lambda k, j: jax.random.uniform(jax.random.fold_in(k, j), (), jnp.float32))(keys, steps)


@jax.jit
def _uniform_table(keys, steps):
    return jax.vmap(lambda j: step_uniforms(keys, j), out_axes=1)(steps)


def sampling_uniforms(seed, batch: int, num_steps: int, first_step: int = 0, *, streams=None) -> np.ndarray:
    """The uniforms generation draws: float32 `(batch, num_steps)`, column j = step first_step + j.

    Args:
      seed: one seed (row r then uses stream r, as a scalar seed does in `jaxgpt.complete`), or
        one seed per row (each with stream 0, as a list of seeds does).
      batch: rows.
      num_steps, first_step: the steps (step 0 picks the first generated token).
      streams: explicit per-row stream numbers (overrides the defaults above).

    Feed them to `porting.torch_reference.inverse_cdf_generate` to reproduce jaxgpt's tokens.
    """
    seeds = np.broadcast_to(np.asarray(seed, np.uint32), (batch,))
    if streams is None:
        streams = np.arange(batch) if np.ndim(seed) == 0 else np.zeros(batch)
    steps = jnp.arange(first_step, first_step + num_steps)
    return np.array(_uniform_table(row_keys(seeds, np.asarray(streams, np.uint32)), steps))  # writable copy
