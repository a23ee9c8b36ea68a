"""The compiled generation loop: prefill into a KV cache, then one token per step.

Token stream S = prompt + generated, kept left-aligned in one fixed-size int32 buffer
`(B, stream_len)`; step j (absolute, 0-based) appends S[p + j] where p is the prompt length.
The KV cache holds the keys/values of S[base], S[base + 1], ... at cache positions 0, 1, ...

* Prefill (`start`): the prompt, padded to its bucket, goes through the model once and fills
  cache positions 0..bucket-1. Pad positions hold junk, but a query at position q only sees
  positions <= q, and every position < the current length has been rewritten by a real
  token before it is seen (decoding writes S[L-1] at position L-1 first, then attends).
* Step j with current length L = p + j (`advance`):
  - L - base <= C: decode S[L-1] alone at cache position L-1-base, attending to the cache.
  - L - base > C (the window would overflow): drop the oldest tokens, keeping the last `keep`
    (S[L-keep:L]), and re-encode them at positions 0..keep-1 with one forward pass that also
    refills the cache (base = L - keep); only the last position is projected to logits.
  `keep = C` is the notebook's exact loop: once the window is full every step re-encodes the
  last C tokens at positions 0..C-1 (learned absolute positions shift, so no cache reuse is
  possible). `keep = C + 1 - stride` is strided mode: after a refill, `stride - 1` cheap
  cached steps follow before the next refill.
* The next token is `sampling.sample(logits, u, params)` with u from (seed, row, j) only.

Both functions take the model's `graphdef` as a static argument and its parameters `state`
as traced arrays; the sampling parameters, the seed, the prompt length and the step
range are traced too. A compilation happens once per distinct
  - graphdef (model configuration and variant) and parameter dtype,
  - batch size B,
  - padded prompt length (`start`; generate.py rounds it up to a power of two) and stream
    length (`advance`; generate.py makes it max(C, prompt bucket + num_new bucket)),
  - `keep` (mode and stride),
  - placement: the devices and shardings of the inputs (generate.py passes the parameters
    replicated and the stream split by rows over a data mesh, jaxgpt/sharding.py; XLA then
    partitions both functions, and the carry comes back split the same way),
and never for a new seed, temperature, top_k, top_p, prompt content, prompt length within its
bucket, num_new within its bucket, or chunking. `TRACE_COUNTS` counts traces (one per
compilation) so tests can prove it.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.model import KVCache, init_cache
from jaxgpt.sampling import SamplingParams, row_keys, sample, step_uniforms

TRACE_COUNTS: collections.Counter = collections.Counter()
"""Number of times `start` / `advance` were traced, i.e. compiled, in this process."""

# XLA:CPU's copy insertion, by default, copies a loop-carried buffer that is both read and
# updated in place within one iteration unless the data flow alone orders the read first. A
# decode step reads each block's KV cache (attention) and then writes one position into it,
# so without region analysis every cache was copied twice per step (24 copies of 129 KB per
# token at batch 1). Passed only when compiling for CPU devices (see `_for_platform`).
COMPILER_OPTIONS = {"cpu": {"xla_cpu_copy_insertion_use_region_analysis": True}}


class StaticGraph:
    """A GraphDef as jit's static argument, hashed once.

    jit hashes its static arguments on every call, and hashing a GraphDef walks the whole
    module graph (~1 ms for the published model, per call of `start` and of `advance`). Equal
    graphs still compare equal, so a new StaticGraph of the same configuration reuses the
    compiled programs.
    """

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (self.graphdef is other.graphdef or self.graphdef == other.graphdef)


def _graph(graphdef) -> nnx.GraphDef:
    return graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef


class Carry(NamedTuple):
    """Generation state between compiled chunks.

    Attributes:
      stream: int32 `(B, stream_len)`; prompt at 0..p-1, step j's token at p + j.
      cache: KV cache per block (`model.LayerCache`); position q holds S[base + q].
      base: int32 `()` stream index of cache position 0.
    """

    stream: jax.Array
    cache: KVCache
    base: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "batch", "dtype", "rows"))
def new_cache(config, batch: int, dtype, rows: jax.sharding.Sharding | None = None) -> KVCache:
    """A zero KV cache for `batch` rows (`model.init_cache`), its rows placed as `rows` says.

    Args:
      config: the model's `GPTConfig` (static, as all arguments).
      batch: rows B.
      dtype: the parameters' dtype.
      rows: optional placement of the rows (the stream's `NamedSharding` on several devices).
    """
    cache = init_cache(config, batch, dtype=dtype)
    if isinstance(rows, jax.sharding.NamedSharding):
        cache = jax.lax.with_sharding_constraint(cache, rows)
    return cache


def _for_platform(fn, **jit_kwargs):
    """`fn` jitted once per platform, with that platform's `COMPILER_OPTIONS`.

    Returns a function that runs the program of the platform the parameters (`state`, the
    second argument) live on; it keeps `fn`'s name, docstring and, as `__wrapped__`, `fn`.
    """
    programs: dict[str, Callable] = {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        leaf = jax.tree.leaves(args[1] if len(args) > 1 else kwargs["state"])[0]
        platform = (next(iter(leaf.sharding.device_set)).platform if isinstance(leaf, jax.Array)
                    else jax.default_backend())
        if platform not in programs:
            programs[platform] = jax.jit(fn, compiler_options=COMPILER_OPTIONS.get(platform), **jit_kwargs)
        return programs[platform](*args, **kwargs)

    return run


def start(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, cache: KVCache) -> KVCache:
    """Clears `cache` in place, then prefills it with the prompt but its last token, at 0..P-1.

    The last prompt token is left out because generation step 0 decodes it anyway (to get the
    logits of the first new token); a one-token prompt therefore prefills nothing (P = 0).

    Args:
      graphdef, state: `nnx.split(model)` of a GPT in eval mode (graphdef plain or in a
        `StaticGraph`).
      prompt: int32 `(B, P)`, the prompt without its last token, left-aligned and padded to
        its bucket (0 <= P <= C).
      cache: a KV cache of B rows to reuse (from `new_cache`, or a finished generation's
        carry); donated. Reusing memory XLA:CPU already holds avoids the page faults of fresh
        memory (batch 64: 99 MB, ~14 ms fresh against ~5 ms in place).

    Returns:
      The KV cache; with the stream (the prompt at its head) and base 0 it makes the
      initial `Carry`.
    """
    TRACE_COUNTS["start"] += 1
    model = nnx.merge(_graph(graphdef), state)
    # Zeros, not stale values: unwritten positions are masked out of the attention scores, but
    # the values are still multiplied by their zero weights, and 0 * NaN would be NaN.
    cache = jax.tree.map(jnp.zeros_like, cache)
    if prompt.shape[1] > 0:
        cache = model.prefill(prompt, cache)
    return cache


# keep_unused: the cache's values are never read (it is cleared), and jit would otherwise drop
# the argument, and with it the donation that lets the output reuse its memory.
START_JIT = dict(static_argnames=("graphdef",), donate_argnames=("cache",), keep_unused=True)
start = _for_platform(start, **START_JIT)


def advance(graphdef: nnx.GraphDef, state: nnx.State, carry: Carry, prompt_len: jax.Array,
            first: jax.Array, last: jax.Array, seed: jax.Array, params: SamplingParams, *, keep: int,
            first_row: jax.Array | int = 0) -> Carry:
    """Runs steps first..last-1 (absolute step indices, traced) in one `lax` loop.

    Args:
      graphdef, state: `nnx.split(model)` of a GPT in eval mode.
      carry: state after step first-1 (from `start` or a previous `advance`); donated.
      prompt_len: int32 `()` true prompt length p (1..C).
      first, last: int32 `()` step range.
      seed: uint32 `()`; row r's uniform at step j comes from fold_in(fold_in(key(seed), r), j).
      params: traced `SamplingParams`.
      keep: tokens kept when the window overflows: C (exact) or C + 1 - stride (strided).
      first_row: global index of this batch's first row (traced; nonzero when a batch is split
        over devices, so that every row keeps its own random stream).

    Returns:
      The `Carry` after step last-1; tokens at stream[:, p + first : p + last].
    """
    TRACE_COUNTS["advance"] += 1
    model = nnx.merge(_graph(graphdef), state)
    window = model.config.context_length
    keys = row_keys(seed, carry.stream.shape[0], first_row)

    def append(carry: Carry, j, logits) -> Carry:
        token = sample(logits, step_uniforms(keys, j), params)  # (B,)
        stream = jax.lax.dynamic_update_slice_in_dim(carry.stream, token[:, None], prompt_len + j, axis=1)
        return carry._replace(stream=stream)

    def decode_step(j, carry: Carry) -> Carry:
        position = prompt_len + j - 1  # of the last token in the stream
        token = jax.lax.dynamic_slice_in_dim(carry.stream, position, 1, axis=1)  # (B, 1)
        rows = jnp.full((token.shape[0],), position - carry.base, jnp.int32)
        logits, cache = model.decode(token, carry.cache, rows)
        return append(carry._replace(cache=cache), j, logits)

    def refill_step(j, carry: Carry) -> Carry:
        base = prompt_len + j - keep
        context = jax.lax.dynamic_slice_in_dim(carry.stream, base, keep, axis=1)  # (B, keep)
        logits, cache = model.encode_window(context, carry.cache, jnp.full((context.shape[0],), keep - 1, jnp.int32))
        return append(Carry(carry.stream, cache, base), j, logits)

    def decode_run(j, carry: Carry):
        # Step j decodes from the cache while the window has room: p + j - base <= C.
        end = jnp.minimum(last, window + carry.base - prompt_len + 1)
        return jax.lax.fori_loop(j, end, decode_step, carry), jnp.maximum(j, end)

    def segment(loop):  # one refill, then the cached steps it makes possible (none when keep = C)
        j, carry = loop
        carry, j = decode_run(j + 1, refill_step(j, carry))
        return j, carry

    # Two loops rather than a per-step lax.cond: a cond around the cache costs ~20% per
    # cached step on CPU.
    carry, j = decode_run(first, carry)
    _, carry = jax.lax.while_loop(lambda loop: loop[0] < last, segment, (j, carry))
    return carry


ADVANCE_JIT = dict(static_argnames=("graphdef", "keep"), donate_argnames=("carry",))
advance = _for_platform(advance, **ADVANCE_JIT)
