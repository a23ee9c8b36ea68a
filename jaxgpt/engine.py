"""The compiled generation engine: a fixed number of slots, each an independent request.

JetStream's split: a request's prompt is prefilled alone (`prefill`, batch 1), inserted into a
free slot (`insert`; requests sharing a prompt share its prefill and one insert), and all slots
advance together (`generate`, up to `CHUNK` steps per call).
A slot holds its own KV cache rows, context window, position, sampling values, random stream,
stop strings and step budget, so rows at different positions, prompt lengths, modes and options
share every step, and a finished slot can take a new request between two calls.

One step of a slot whose context (cached positions `length`, plus the `pending` last token) is:
  * not full (length < C): decode `pending` at position `length` from the cache;
  * full (length == C): re-encode the window that drops the oldest tokens and keeps the last
    `keep` (the pending one included) at positions 0..keep-1, refilling the cache. keep = C is
    the notebook's exact loop (every step once full re-encodes the last C tokens, since learned
    absolute positions shift); keep = C + 1 - stride is strided mode (stride - 1 cached steps
    follow each refill).
and then samples the next token (`jaxgpt.sampling`) from uniform(fold_in(row key, steps done)).

Bits: within one slot count N, a row's computation depends only on its own state, never on the
other slots (the steps are batched but row-independent, full windows are re-encoded in groups of
min(N, REFILL_GROUP) rows whatever their number, the prefill runs alone at batch 1; from
`model.BLOCKED_DECODE_ROWS` slots the decode attention reads as many cache blocks as the furthest
row needs, and the blocks a row does not need leave its values bit for bit unchanged), so a
request gives the same bits in any slot beside any other requests. Different N are different
programs whose logits may differ in the last bits.

The loop has three kinds of step, each in its own while loop that runs while the slots' state
calls for it: decode steps while no live slot is full, mixed steps (decode for the slots with
room, refill for the full ones) while both are live, refill steps while every live slot is full.
No step computes what none of its rows needs, and no `lax.cond` is needed (on CPU a cond costs a
copy of its operands, the caches among them). It runs until `num_steps` steps or until every slot
is idle: a batch whose rows have all finished spends no further steps. A refill re-encodes
REFILL_GROUP windows per forward pass, so a step with few full slots does not re-encode all N
windows, and C positions whatever the row's `keep` (its later positions are masked):
encoding strided rows C // 2 + 1 wide in a second loop made every exact full-window step
slower (benchmarks/results/engine_ab_cpu.md).

Compilation, per model configuration / parameter dtype / devices: `prefill` once per prompt
bucket (the prompt length minus one, rounded up to a power of two), `insert` twice per slot
count N (a prefilled prompt, a one-token prompt), `generate` once per slot count N. Nothing else recompiles: not the prompts, their lengths within a bucket,
max_chars, seeds, any sampling value, modes and strides, stop strings, logprobs, chunk sizes.
`TRACE_COUNTS` counts traces so tests can prove it.
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
"""Number of times each compiled function was traced, i.e. compiled, in this process."""

CHUNK = 128  # steps per `generate` call at most: the length of its output buffers
MAX_TOP_LOGPROBS = 20  # alternatives reported per character at most
MAX_STOPS = 4  # stop strings per request
MAX_STOP_LEN = 32  # characters per stop string
REFILL_GROUP = 4  # full windows re-encoded per forward pass (at most; fewer when N is smaller)

RUNNING, LENGTH, STOP = 0, 1, 2  # `Slots.finish` codes

# XLA:CPU's copy insertion, by default, copies a loop-carried buffer that is both read and
# updated in place within one iteration unless the data flow alone orders the read first. A
# decode step reads each block's KV cache and then writes one position into it; without region
# analysis every cache was copied twice per step. Passed only when compiling for CPU devices.
COMPILER_OPTIONS = {"cpu": {"xla_cpu_copy_insertion_use_region_analysis": True}}

# XLA:CPU's matrix-product library. Its default, YNNPACK, is the faster one for the products of
# a whole prompt (`prefill`); a decode step multiplies one row per slot by every weight matrix,
# where Eigen's kernels are the faster ones, so the loops made of such steps (`generate` here,
# `jaxgpt.beam`'s search) compile their products with Eigen. The two libraries round products
# differently (logits move by ~1e-5), so programs compared bit for bit must be compiled alike.
# Figures: benchmarks/results/decode_dots_cpu.md (`python -m benchmarks.tools.dot_library`).
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions: dots go to Eigen
LOOP_OPTIONS = {"cpu": {**COMPILER_OPTIONS["cpu"], **EIGEN_DOTS}}


class Static:
    """A value as jit's static argument, hashed once (GraphDefs and PyTreeDefs walk their whole
    structure to hash, and jit hashes its static arguments on every call)."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (self.value is other.value or self.value == other.value)


class StaticGraph(Static):
    """A GraphDef as jit's static argument."""

    __slots__ = ()

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.value


def _model(graphdef, state):
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef, state)


class Request(NamedTuple):
    """One request's initial slot state, as host arrays (built by `jaxgpt.batching`).

    Attributes:
      window: int32 `(C,)` the prompt without its last token, left-aligned (the cached part).
      length: int32 `()` its length, 0..C-1.
      pending: int32 `()` the prompt's last token (the seed token 0 for an empty prompt).
      budget: int32 `()` tokens to generate at most.
      seed, stream: uint32 `()` the random stream.
      keep: int32 `()` tokens kept at a refill (C exact, C + 1 - stride strided).
      params: `SamplingParams` of one row (scalars, logit_bias `(V,)`).
      stops: int32 `(MAX_STOPS, MAX_STOP_LEN)` stop strings, right-aligned, -1 padded.
      stop_lengths: int32 `(MAX_STOPS,)` their lengths (0: unused).
      top_n: int32 `()` log-probabilities wanted: -1 none, 0 the chosen token's, n > 0 also the
        n likeliest alternatives.
    """

    window: jax.Array
    length: jax.Array
    pending: jax.Array
    budget: jax.Array
    seed: jax.Array
    stream: jax.Array
    keep: jax.Array
    params: SamplingParams
    stops: jax.Array
    stop_lengths: jax.Array
    top_n: jax.Array


class Slots(NamedTuple):
    """The state of N slots between compiled calls (every field has N rows first).

    Attributes:
      cache: KV cache; a live row b holds the keys and values of window[b, :length[b]] (an idle
        row's cache is junk until a request is inserted).
      window: int32 `(N, C)` the tokens at cache positions 0..length-1.
      length: int32 `(N,)` cached positions.
      pending: int32 `(N,)` the last token, not yet in the cache.
      done: int32 `(N,)` tokens generated so far (the random stream's step index).
      budget: int32 `(N,)` tokens to generate at most.
      active: bool `(N,)` slot busy and not finished.
      keys: `(N,)` random keys, fold_in(key(seed), stream).
      keep, params, stops, stop_lengths, top_n: as in `Request`, per row.
      recent: int32 `(N, MAX_STOP_LEN)` the last generated tokens (-1 before any), for stops.
      finish: int32 `(N,)` RUNNING, LENGTH or STOP.
      stop_length: int32 `(N,)` length of the stop string that finished the row (0 if none).
    """

    cache: KVCache
    window: jax.Array
    length: jax.Array
    pending: jax.Array
    done: jax.Array
    budget: jax.Array
    active: jax.Array
    keys: jax.Array
    keep: jax.Array
    params: SamplingParams
    stops: jax.Array
    stop_lengths: jax.Array
    top_n: jax.Array
    recent: jax.Array
    finish: jax.Array
    stop_length: jax.Array


class Chunk(NamedTuple):
    """What one `generate` call produced: column i is the call's step i.

    Attributes:
      tokens: int32 `(N, CHUNK)`.
      valid: bool `(N, CHUNK)` the slot was live at that step (its token is real).
      logprobs: float32 `(N, CHUNK)` log-probability of each token (rows with top_n >= 0).
      top_ids: int32 `(N, CHUNK, L)` likeliest tokens, most likely first (L = min(MAX_TOP_LOGPROBS, V)).
      top_logprobs: float32 `(N, CHUNK, L)` their log-probabilities.
    """

    tokens: jax.Array
    valid: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


_FLAT: collections.OrderedDict = collections.OrderedDict()  # id(state) -> (state, Static(treedef), leaves)


def _flatten(state):
    """`state`'s treedef and leaves, remembered for the last few states.

    Flattening an `nnx.State` runs Python for every Variable; the engine is called with the
    same few parameter states over and over, so each call would pay it again.
    """
    hit = _FLAT.get(id(state))
    if hit is None or hit[0] is not state:
        leaves, treedef = jax.tree.flatten(state)
        hit = _FLAT[id(state)] = (state, Static(treedef), tuple(leaves))
        while len(_FLAT) > 8:
            _FLAT.popitem(last=False)
    return hit[1], hit[2]


def _for_platform(fn, donate_argnums=(), static_argnames=(), options=None):
    """`fn(graphdef, state, *args)` jitted once per platform (that of `state`).

    graphdef is static, and fn's keyword arguments `static_argnames`; the state travels as its
    leaves (see `_flatten`); `donate_argnums` count fn's positional arguments. `options`: XLA
    compiler options by platform (default `COMPILER_OPTIONS`; `LOOP_OPTIONS` for decode loops).
    """
    options = COMPILER_OPTIONS if options is None else options
    programs: dict[str, Callable] = {}

    def flat(graphdef, tree, leaves, *args, **kwargs):
        return fn(graphdef, jax.tree.unflatten(tree.value, leaves), *args, **kwargs)

    flat.__name__ = flat.__qualname__ = fn.__name__  # programs (and compilation-cache entries) keep fn's name

    @functools.wraps(fn)
    def run(graphdef, state, *args, **kwargs):
        tree, leaves = _flatten(state)
        leaf = leaves[0]
        platform = (next(iter(leaf.sharding.device_set)).platform if isinstance(leaf, jax.Array)
                    else jax.default_backend())
        if platform not in programs:
            programs[platform] = jax.jit(flat, compiler_options=options.get(platform), static_argnums=(0, 1),
                                         static_argnames=static_argnames,
                                         donate_argnums=tuple(i + 1 for i in donate_argnums))
        return programs[platform](graphdef, tree, leaves, *args, **kwargs)

    return run


def empty_slots(config, slots: int, dtype, rows: jax.sharding.Sharding | None = None) -> Slots:
    """N idle slots (zero cache, inactive), their rows placed as `rows` says.

    Placed explicitly (committed), as `insert` and `generate` return them: otherwise the first
    call of each would see other input placements than the later ones, and compile twice.
    """
    state = _empty_slots(config, slots, dtype, rows)
    return jax.device_put(state, rows) if rows is not None else state


@functools.partial(jax.jit, static_argnames=("config", "slots", "dtype", "rows"))
def _empty_slots(config, slots, dtype, rows):
    n, c, v = slots, config.context_length, config.vocab_size
    zeros = lambda dt, *shape: jnp.zeros((n, *shape), dt)  # noqa: E731
    state = Slots(
        cache=init_cache(config, n, dtype), window=zeros(jnp.int32, c), length=zeros(jnp.int32),
        pending=zeros(jnp.int32), done=zeros(jnp.int32), budget=zeros(jnp.int32), active=zeros(bool),
        keys=row_keys(jnp.zeros(n, jnp.uint32), jnp.arange(n, dtype=jnp.uint32)),
        keep=jnp.full((n,), c, jnp.int32),
        params=SamplingParams(jnp.ones(n), jnp.full((n,), v, jnp.int32), jnp.ones(n), zeros(jnp.float32),
                              jnp.ones(n), zeros(jnp.float32, v)),
        stops=jnp.full((n, MAX_STOPS, MAX_STOP_LEN), -1, jnp.int32), stop_lengths=zeros(jnp.int32, MAX_STOPS),
        top_n=jnp.full((n,), -1, jnp.int32), recent=jnp.full((n, MAX_STOP_LEN), -1, jnp.int32),
        finish=zeros(jnp.int32), stop_length=zeros(jnp.int32))
    if isinstance(rows, jax.sharding.NamedSharding):
        state = jax.lax.with_sharding_constraint(state, rows)
    return state


def prefill(graphdef, state: nnx.State, tokens: jax.Array) -> KVCache:
    """The KV cache of one prompt alone: tokens int32 `(1, P)`, P >= 1 (its bucket, right-padded).

    Padding positions hold junk, but generation overwrites each before any query can see it.
    """
    TRACE_COUNTS["prefill"] += 1
    model = _model(graphdef, state)
    return model.prefill(tokens, init_cache(model.config, 1, state_dtype(state)))


prefill = _for_platform(prefill)


def state_dtype(state: nnx.State):
    return jax.tree.leaves(state)[0].dtype


def insert(slots: Slots, requests: Request, cache: KVCache | None, targets) -> Slots:
    """Places requests that share one prompt into their slots: every field's row, and the cache row.

    Args:
      slots: the current slots; donated.
      requests: `Request` whose fields have N rows (one per slot of `slots`; rows beyond the
        requests are padding, aimed at slot N, which does not exist, and dropped).
      cache: their prompt's prefilled cache (`prefill`, one row), or None for a one-token
        prompt (nothing cached: the slots keep their cache rows, unread).
      targets: int32 `(N,)` the slot of each row of `requests`: the real rows first, then N
        for each padding row.
    """
    TRACE_COUNTS["insert"] += 1
    n = slots.length.shape[0]

    def put(field, rows):
        return field.at[targets].set(jnp.asarray(rows, field.dtype), mode="drop")

    # A one-token prompt caches nothing: its slots keep the previous request's keys and values,
    # which only masked positions see (weight exactly 0; the model's values are finite).
    if cache is not None:  # written into the real rows only (a scatter of N broadcast rows costs N writes)
        def write(i, into):
            return jax.tree.map(lambda a, row: jax.lax.dynamic_update_slice_in_dim(a, row.astype(a.dtype), targets[i], 0),
                                into, cache)
        cache = jax.lax.fori_loop(0, jnp.sum(targets < n), write, slots.cache)
    r = requests
    return Slots(
        cache=slots.cache if cache is None else cache,
        window=put(slots.window, r.window), length=put(slots.length, r.length), pending=put(slots.pending, r.pending),
        done=put(slots.done, jnp.zeros(n, jnp.int32)), budget=put(slots.budget, r.budget),
        active=put(slots.active, jnp.ones(n, bool)), keys=put(slots.keys, row_keys(r.seed, r.stream)),
        keep=put(slots.keep, r.keep), params=jax.tree.map(put, slots.params, r.params), stops=put(slots.stops, r.stops),
        stop_lengths=put(slots.stop_lengths, r.stop_lengths), top_n=put(slots.top_n, r.top_n),
        recent=put(slots.recent, jnp.full((n, MAX_STOP_LEN), -1)), finish=put(slots.finish, jnp.full(n, RUNNING)),
        stop_length=put(slots.stop_length, jnp.zeros(n, jnp.int32)))


insert = jax.jit(insert, donate_argnames=("slots",))


def release(slots: Slots, slot) -> Slots:
    """Marks `slot` idle (a cancelled request): it takes no further steps."""
    return slots._replace(active=slots.active.at[slot].set(False))


release = jax.jit(release, donate_argnames=("slots",))


def generate(graphdef, state: nnx.State, slots: Slots, num_steps, until_finish) -> tuple[Slots, Chunk]:
    """Advances every active slot by up to `num_steps` (traced, <= CHUNK) steps.

    Args:
      graphdef, state: `nnx.split` of a GPT in eval mode (graphdef plain or a `StaticGraph`).
      slots: the current slots; donated.
      num_steps: int32 `()`.
      until_finish: bool `()`: also end the call after the first step at which some slot
        finishes (the host has a request waiting for a free slot).

    Returns:
      The slots after the last step, and the `Chunk` of tokens (and log-probabilities) produced.
    """
    TRACE_COUNTS["generate"] += 1
    model = _model(graphdef, state)
    c = model.config.context_length
    n, v = slots.length.shape[0], model.config.vocab_size
    group = min(n, REFILL_GROUP)
    top = min(MAX_TOP_LOGPROBS, v)
    out = Chunk(jnp.zeros((n, CHUNK), jnp.int32), jnp.zeros((n, CHUNK), bool), jnp.zeros((n, CHUNK)),
                jnp.zeros((n, CHUNK, top), jnp.int32), jnp.zeros((n, CHUNK, top)))

    def needs_refill(s):
        return s.active & (s.length >= c)

    def decode(s: Slots, rows):  # decode `pending` for the rows with room (others: junk, discarded)
        # Rows that do not decode here (idle, or full and refilled next) use position 0: their
        # output is discarded, and a blocked decode then reads only what the live rows need.
        positions = jnp.where(rows, jnp.minimum(s.length, c - 1), 0)
        logits, cache = model.decode(s.pending[:, None], s.cache, positions)
        grow = rows & (s.length < c)
        window = jnp.where(grow[:, None] & (jnp.arange(c) == s.length[:, None]), s.pending[:, None], s.window)
        return s._replace(cache=cache, window=window, length=s.length + grow), logits

    def refill(s: Slots, full):  # re-encode the last `keep` tokens of the `full` rows at 0..keep-1
        index = jnp.arange(c) + (c + 1 - s.keep)[:, None]  # window[index] for positions < keep - 1
        window = jnp.take_along_axis(s.window, jnp.minimum(index, c - 1), axis=1)
        window = jnp.where(jnp.arange(c) == (s.keep - 1)[:, None], s.pending[:, None], window)
        window = jnp.where(jnp.arange(c) < s.keep[:, None], window, 0)  # (N, C)
        order = jnp.argsort((~full).astype(jnp.int32), stable=True)  # full rows first
        order = jnp.concatenate([order, jnp.full((group,), n)])  # padding entries: row N, dropped
        cache, logits = _encode_groups(model, window, s.keep, order, 0, jnp.sum(full), group, s.cache,
                                       jnp.zeros((n, v), jnp.float32))
        s = s._replace(cache=cache, window=jnp.where(full[:, None], window, s.window),
                       length=jnp.where(full, s.keep, s.length))
        return s, logits

    def decode_step(loop):
        i, s, out = loop
        s, logits = decode(s, s.active)
        return _emit(i, s, logits, out)

    def mixed_step(loop):  # some live slots are full, the others decode
        i, s, out = loop
        full = needs_refill(s)
        s, decoded = decode(s, s.active & ~full)
        s, refilled = refill(s, full)
        return _emit(i, s, jnp.where(full[:, None], refilled, decoded), out)

    def refill_step(loop):  # every live slot is full
        i, s, out = loop
        s, refilled = refill(s, needs_refill(s))
        return _emit(i, s, refilled, out)

    def running(loop):
        active = loop[1].active
        freed = jnp.any(slots.active & ~active)  # some slot finished during this call
        return (loop[0] < num_steps) & jnp.any(active) & ~(until_finish & freed)

    def kinds(loop):  # (some live slot is full, some live slot has room)
        s = loop[1]
        full = needs_refill(s)
        return jnp.any(full), jnp.any(s.active & ~full)

    def while_(kind, step):  # steps while running and `kind(full, room)` holds
        return lambda loop: jax.lax.while_loop(lambda x: running(x) & kind(*kinds(x)), step, loop)

    # Each kind of step has its own loop, which runs while the slots' state calls for it, so no
    # step computes what none of its rows needs; a `lax.cond` inside one step would cost a copy
    # of every cache on XLA:CPU. While running, one of the three kinds holds, so every pass of
    # the outer loop runs at least one step.
    decode_run = while_(lambda full, room: ~full, decode_step)
    mixed_run = while_(lambda full, room: full & room, mixed_step)
    refill_run = while_(lambda full, room: ~room, refill_step)
    _, slots, out = jax.lax.while_loop(running, lambda x: refill_run(mixed_run(decode_run(x))),
                                       (jnp.int32(0), slots, out))
    return slots, out


def _encode_groups(model, window, keep, order, start, stop, group, cache, logits):
    """Re-encodes rows order[start:stop], `group` at a time, into `cache` and `logits`.

    One forward pass per group of `group` rows whatever their number (the bits of a row never
    depend on how many others are full); the last group's unused entries point at row N and
    are dropped. window: int32 `(N, T)`, keep: `(N,)`, logits: float32 `(N, V)`.
    """
    n = window.shape[0]

    def encode(loop):
        k, cache, logits = loop
        rows = jax.lax.dynamic_slice_in_dim(order, k, group)
        rows = jnp.where(k + jnp.arange(group) < stop, rows, n)
        some, some_cache = model.encode_window(jnp.take(window, rows, axis=0, mode="clip"), init_cache(
            model.config, group, cache[0].k.dtype), jnp.take(keep, rows, mode="clip") - 1)
        cache = jax.tree.map(lambda a, new: a.at[rows].set(new, mode="drop"), cache, some_cache)
        return k + group, cache, logits.at[rows].set(some, mode="drop")

    _, cache, logits = jax.lax.while_loop(lambda loop: loop[0] < stop, encode, (jnp.asarray(start, jnp.int32), cache, logits))
    return cache, logits


def _emit(i, s: Slots, logits, out: Chunk):
    """Samples each live slot's next token from `logits` `(N, V)` and records it at column i."""
    live = s.active
    token = sample(logits, step_uniforms(s.keys, s.done), s.params, s.window, s.length)

    def logprobs(out: Chunk):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # the model's own distribution
        top_lp, top_ids = jax.lax.top_k(lp, out.top_ids.shape[-1])
        chosen = jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
        return out._replace(logprobs=out.logprobs.at[:, i].set(chosen), top_ids=out.top_ids.at[:, i].set(top_ids),
                            top_logprobs=out.top_logprobs.at[:, i].set(top_lp))

    out = jax.lax.cond(jnp.any(live & (s.top_n >= 0)), logprobs, lambda o: o, out)
    out = out._replace(tokens=out.tokens.at[:, i].set(token), valid=out.valid.at[:, i].set(live))

    def stops(recent):  # only rows with stop strings need their recent tokens
        recent = jnp.where(live[:, None], jnp.concatenate([recent[:, 1:], token[:, None]], axis=1), recent)
        return recent, _stop_match(recent, s.stops, s.stop_lengths)

    recent, matched = jax.lax.cond(jnp.any(live[:, None] & (s.stop_lengths > 0)), stops,
                                   lambda recent: (recent, jnp.zeros_like(s.stop_length)), s.recent)
    done = s.done + live
    stopped = live & (matched > 0)
    exhausted = live & ~stopped & (done >= s.budget)
    s = s._replace(pending=jnp.where(live, token, s.pending), done=done, recent=recent,
                   active=live & ~stopped & ~exhausted,
                   finish=jnp.where(stopped, STOP, jnp.where(exhausted, LENGTH, s.finish)),
                   stop_length=jnp.where(stopped, matched, s.stop_length))
    return i + 1, s, out


def _stop_match(recent, stops, lengths):
    """Length of the longest stop string the recent tokens end with, per row (0: none).

    recent `(N, S)`, stops `(N, M, S)` right-aligned, lengths `(N, M)`.
    """
    s = recent.shape[-1]
    counted = jnp.arange(s) >= (s - lengths)[..., None]  # (N, M, S)
    hit = (lengths > 0) & jnp.all((recent[:, None] == stops) | ~counted, axis=-1)  # (N, M)
    return jnp.max(jnp.where(hit, lengths, 0), axis=-1)


generate = _for_platform(generate, donate_argnums=(2,), options=LOOP_OPTIONS)
