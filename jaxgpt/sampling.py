"""Next-token sampling: temperature, top-k, top-p (nucleus) and greedy, by inverse CDF.

Every method draws the next token the same way, so that a torch loop fed the same uniforms
picks the same tokens (`porting.torch_reference.filter_logits` + `inverse_cdf_pick` are the
torch twins of `filter_logits` + `inverse_cdf_pick` here):

1. logits / temperature;
2. top-k: keep every logit >= the k-th largest (ties are kept, so more than k may survive);
3. top-p: in descending probability order keep each token whose *preceding* cumulative mass
   is < p (the most likely token always survives); skipped entirely when p == 1;
4. the first index whose cumulative probability exceeds u * total, for one uniform u in [0, 1).

Temperature 0 or top_k == 1 is greedy: argmax of the raw logits (first index on ties).
Temperature 1 without filtering draws from softmax(logits), the distribution of the
notebook's `torch.multinomial` (same distribution, different random stream).

The parameters are *traced*: `SamplingParams` is a NamedTuple of scalar arrays, so changing
temperature, top_k or top_p never recompiles the generation loop. The frozen dataclasses
(`Multinomial`, `Greedy`, `TopK`, `TopP`, `Sampling`) are the user-facing view in the style of
gemma's `gm.text` samplers: `method.get_next_tokens(logits, rng)`; they all lower to the one
jitted `sample` function with their values as arguments.

Randomness is keyed only by (seed, row, absolute step): `step_uniforms(row_keys(seed, B), j)`.
Rows are independent and a row's stream does not depend on the batch size, on how generation
is chunked, or on how rows are placed on devices. `sampling_uniforms` returns the same values
as an array, to feed the torch reference loop.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParams(NamedTuple):
    """Traced sampling parameters (scalars; a pytree, so jit traces rather than hashes them).

    Attributes:
      temperature: float32 `()` (numpy or jax); 0 means greedy.
      top_k: int32 `()`; vocab_size (or more) means no top-k filtering; 1 means greedy.
      top_p: float32 `()` in (0, 1]; 1 means no nucleus filtering.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def make_params(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                *, vocab_size: int) -> SamplingParams:
    """Validates user values and packs them as traced `SamplingParams`.

    Raises:
      ValueError: temperature < 0 or not finite, top_k < 1, top_p outside (0, 1].
    """
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None:
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    k = vocab_size if top_k is None else min(int(top_k), vocab_size)
    # numpy scalars: traced by jit like jax arrays, but built without an eager jax dispatch.
    return SamplingParams(np.float32(temperature), np.int32(k), np.float32(1.0 if top_p is None else top_p))


# ----------------------------------------------------------------------------- the draw
def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, then top-k (ties kept), then top-p; removed entries become -inf.

    Args:
      logits: float `(..., V)`.
      params: `SamplingParams`; temperature must be > 0 here (greedy is handled by `sample`).

    Returns:
      float32 `(..., V)` filtered logits.
    """
    logits = logits.astype(jnp.float32) / params.temperature
    # Each filter sorts the vocabulary, so each runs only when asked for (a cond on the traced
    # parameter: no recompile); unfiltered, a step skips two sorts and a scatter.
    logits = jax.lax.cond(params.top_k < logits.shape[-1], _top_k, lambda x, _: x, logits, params.top_k)
    return jax.lax.cond(params.top_p < 1.0, _top_p, lambda x, _: x, logits, params.top_p)


def _top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Removes (-inf) every logit below the k-th largest; ties with it are kept."""
    v = logits.shape[-1]
    # k-th largest = element V-k of the ascending sort; k >= V keeps everything.
    k = jnp.clip(top_k, 1, v)
    ascending = jnp.sort(logits, axis=-1)
    kth = jnp.take_along_axis(ascending, jnp.broadcast_to(v - k, logits.shape[:-1] + (1,)), axis=-1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Removes each token whose strictly more probable tokens already hold mass >= top_p.

    Stable order on ties, as torch's stable descending sort. Only called for top_p < 1, as the
    torch twin does, since rounding could otherwise push the preceding mass of a negligible
    tail token to 1.0.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    before_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    before = jnp.zeros_like(before_sorted)
    before = jnp.put_along_axis(before, order, before_sorted, axis=-1, inplace=False)
    return jnp.where(before >= top_p, -jnp.inf, logits)


def inverse_cdf_pick(logits: jax.Array, u: jax.Array) -> jax.Array:
    """First index whose cumulative probability exceeds u * total.

    Args:
      logits: float `(..., V)` (entries may be -inf).
      u: float `(...)` uniforms in [0, 1).

    Returns:
      int32 `(...)` token ids.
    """
    cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    threshold = u[..., None].astype(jnp.float32) * cdf[..., -1:]
    index = jnp.sum(cdf <= threshold, axis=-1, dtype=jnp.int32)
    return jnp.minimum(index, logits.shape[-1] - 1)


def is_greedy(params: SamplingParams) -> jax.Array:
    return (params.temperature == 0) | (params.top_k == 1)


def sample(logits: jax.Array, u: jax.Array, params: SamplingParams) -> jax.Array:
    """The next token of each row: greedy, or inverse CDF of the filtered distribution.

    Args:
      logits: float `(..., V)`.
      u: float `(...)` one uniform in [0, 1) per row (unused when greedy).
      params: traced `SamplingParams`.

    Returns:
      int32 `(...)` token ids.
    """
    greedy = is_greedy(params)
    # A placeholder temperature keeps the (discarded) sampling branch free of inf/NaN.
    safe = params._replace(temperature=jnp.where(greedy, 1.0, params.temperature))
    drawn = inverse_cdf_pick(filter_logits(logits, safe), u)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


_sample_jit = jax.jit(sample)


# ----------------------------------------------------------------------------- randomness
def row_keys(seed, batch: int, first_row=0) -> jax.Array:
    """One key per row: fold_in(key(seed), row) for rows first_row..first_row+batch-1. `(B,)` keys.

    `seed` (< 2**32) and `first_row` may be traced; `batch` is static.
    """
    base = jax.random.key(jnp.asarray(seed, jnp.uint32))
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(first_row + jnp.arange(batch))


def step_uniforms(keys: jax.Array, step) -> jax.Array:
    """The uniforms of absolute step `step` (traced int ok) for each row key: float32 `(B,)`."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(keys)


@jax.jit
def _uniform_table(keys, steps):
    return jax.vmap(lambda j: step_uniforms(keys, j), out_axes=1)(steps)


def sampling_uniforms(seed: int, batch: int, num_steps: int, first_step: int = 0) -> np.ndarray:
    """The uniforms generation draws for `seed`: float32 `(batch, num_steps)`.

    Column j is absolute step first_step + j (step 0 picks the first generated token). Feed
    them to `porting.torch_reference.inverse_cdf_generate` to reproduce jaxgpt's tokens in torch.
    """
    steps = jnp.arange(first_step, first_step + num_steps)
    return np.array(_uniform_table(row_keys(seed, batch), steps))  # a writable copy


# ----------------------------------------------------------------------------- user-facing views
class SamplingMethod(abc.ABC):
    """A sampling rule. `get_next_tokens(logits (..., V), rng) -> (...)` int32 token ids."""

    @abc.abstractmethod
    def params(self, vocab_size: int) -> SamplingParams:
        """The traced parameters this method stands for."""

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """Samples one token per row; `rng` is one key, split into one uniform per row."""
        u = jax.random.uniform(rng, logits.shape[:-1], jnp.float32)
        return _sample_jit(logits, u, self.params(logits.shape[-1]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling(SamplingMethod):
    """The general rule: temperature, then optional top-k, then optional top-p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def params(self, vocab_size: int) -> SamplingParams:
        return make_params(self.temperature, self.top_k, self.top_p, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Multinomial(SamplingMethod):
    """The notebook's draw from softmax(logits / temperature) (temperature 1 = the notebook)."""

    temperature: float = 1.0

    def params(self, vocab_size: int) -> SamplingParams:
        return make_params(self.temperature, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy(SamplingMethod):
    """The most likely token (first on ties)."""

    def params(self, vocab_size: int) -> SamplingParams:
        return make_params(0.0, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(SamplingMethod):
    """Draw among the logits >= the k-th largest (ties kept)."""

    k: int = 40
    temperature: float = 1.0

    def params(self, vocab_size: int) -> SamplingParams:
        return make_params(self.temperature, self.k, vocab_size=vocab_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(SamplingMethod):
    """Nucleus sampling: the most likely tokens whose preceding cumulative mass is < p."""

    p: float = 0.9
    temperature: float = 1.0

    def params(self, vocab_size: int) -> SamplingParams:
        return make_params(self.temperature, top_p=self.p, vocab_size=vocab_size)
