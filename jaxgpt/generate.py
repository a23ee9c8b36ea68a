"""Text generation with the notebook's semantics, compiled: `generate`, `generate_tokens`, streaming.

    model = porting.load_weights("weights.pt")
    print(jaxgpt.generate(model, "ROMEO:", 500, seed=1, temperature=0.8, top_p=0.95))

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
    conditions on between C + 1 - stride and C previous tokens instead of exactly C (exact
    mode is the special case stride = 1), so the text differs from the notebook's once the
    window is full, and it may predict a little worse (less context); in exchange only one step
    in `stride` pays for a full forward pass. The default stride is C // 2.
    Measured (benchmarks/results/strided_quality.md: trained default checkpoint, 4,096
    held-out characters, teacher-forced with each mode's windowing; 2,000 generated
    characters, 2-core Zen 5 CPU): exact 1.4632 nats/char at 207 chars/s; strides 2..96 all
    within one standard error (~0.003 nats) of exact, stride 64 (the default) -0.0019 +-
    0.0026 at 11.5x the speed (15.6x in CPU seconds); stride 112 +0.0027, stride 128 (keep one token)
    +0.025. Past stride 64 the cached steps dominate and the speed grows little.
    (Keeping C + 1 - stride tokens rather than C - stride makes stride = 1 identical to exact
    mode, which the tests use as a check.)

Randomness: the uniform of row r at step j comes from fold_in(fold_in(key(seed), r), j) only,
so rows are independent, a row's text does not depend on the batch size or on chunking, and
`sampling.sampling_uniforms` gives the same numbers to a torch loop (see sampling.py for the
sampling rule). The model's own numerics follow the reference to ~1e-6, so a torch loop fed
these uniforms produces the same tokens (tests/test_sampling_parity.py).

Devices (jaxgpt/sharding.py): by default the batch is split over every local device
(`jax.local_devices()`) when more than one is visible: a 1-D "data" mesh, the parameters
replicated on each device, the stream and KV cache split by rows; XLA partitions the same
compiled loop. The batch is padded with dummy rows to a multiple of the number of devices
used (never more devices than rows: a batch of 3 on 8 devices uses 3) and the output is
trimmed back. Since a row's randomness depends only on (seed, row, step), the tokens are the
same on any number of devices. `devices=1` runs on one device; see `stream_tokens`.

Compilation (see engine.py): the prefill (`engine.start`) once per model configuration/dtype,
batch size (after padding to the device count), device set and prefill bucket (the prompt
length minus one, rounded up to a power of two: 0, 1, 2, 4, ..., C); the loop
(`engine.advance`) once per model configuration/dtype, batch size, device set, stream length
(prompt bucket, powers of two from 16 capped at C, plus num_new bucket, powers of two from 64)
and mode/stride. The prefill buckets are fine because prefill cost grows with the padded
length (a 1-character prompt at batch 64 would otherwise pay for 16 positions per row before
the first character); the loop's are coarse because a loop program is the larger compile.
Changing the number of devices (or the batch size) compiles anew; changing the seed,
temperature, top_k, top_p, prompt content, prompt length within its buckets, num_new within
its bucket, or the chunk size never recompiles.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from jaxgpt import engine, sharding
from jaxgpt.sampling import make_params
from jaxgpt.vocab import Vocab, default_vocab

MODES = ("exact", "strided")
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 64
_MAX_SEED = 2**32


def bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), at most `cap`."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return size if cap is None else min(size, cap)


def default_stride(context_length: int) -> int:
    return max(context_length // 2, 1)


class Sampler:
    """A GPT prepared for repeated generation: split once, its parameters placed once per device set.

    Every generation function accepts a `GPT` (or a checkpoint path) and then prepares it on
    each call: walking the module graph (`nnx.split`) and placing the parameters on the devices
    cost ~6 ms for the published model, more than a whole cached decode step. Pass a Sampler
    instead when generating repeatedly (a server loop, benchmarks, the CLI).

    It snapshots the parameters: later changes to the model are not seen (build a new Sampler).
    It also keeps the KV cache of its last finished run (per batch size and device set; one at a
    time) to reuse that memory in the next run of the same shape: at batch 64 the cache is 99 MB.

    Attributes:
      config: the model's `GPTConfig`.
      graphdef: the model's `engine.StaticGraph` (jit's static argument).
    """

    def __init__(self, model):
        """Args: model: a `jaxgpt.GPT` in eval mode, or a checkpoint path."""
        if isinstance(model, (str, os.PathLike)):
            from porting import load_weights

            model = load_weights(model)
        if not hasattr(model, "config") or not hasattr(model, "decode"):
            raise TypeError(f"model must be a jaxgpt.GPT or a checkpoint path, got {type(model).__name__}")
        if model.training:
            raise ValueError("the model is in training mode (dropout on): call model.eval() before generating")
        self.config = model.config
        self._dtype = model.token_embedding.embedding.dtype
        graphdef, state = nnx.split(model)
        # A new tree over the same arrays: the split state's Variables are the model's own,
        # so assigning a parameter of the model would otherwise show through.
        self._state = jax.tree.map(lambda x: x, state)
        self.graphdef = engine.StaticGraph(graphdef)
        self._placed: dict[tuple, nnx.State] = {}
        self._spare_cache: tuple[tuple, object] | None = None  # (key, KV cache) of the last finished run

    def state_on(self, devices: Sequence[jax.Device]) -> nnx.State:
        """The parameters replicated on `devices` (placed on the first call for them)."""
        key = tuple(devices)
        if key not in self._placed:
            self._placed[key] = jax.device_put(self._state, sharding.placements(devices)[0])
        return self._placed[key]

    def take_cache(self, batch: int, devices: Sequence[jax.Device]):
        """A KV cache for `batch` rows on `devices`: the last run's if it had that shape, else new."""
        key, spare = (batch, tuple(devices)), self._spare_cache
        if spare is not None and spare[0] == key:
            self._spare_cache = None  # handed out (it will be donated): never twice
            return spare[1]
        return engine.new_cache(self.config, batch, self._dtype, sharding.placements(devices)[1])

    def keep_cache(self, batch: int, devices: Sequence[jax.Device], cache) -> None:
        """Keeps a finished run's cache for the next run of the same shape (replacing any other)."""
        self._spare_cache = ((batch, tuple(devices)), cache)


def _as_sampler(model) -> Sampler:
    return model if isinstance(model, Sampler) else Sampler(model)


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


def _check_run(num_new, seed, mode, stride, chunk_size, context_length: int) -> int:
    """Validates the run options; returns `keep` for the engine."""
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"the number of new tokens must be a positive integer, got {num_new!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "exact":
        if stride is not None:
            raise ValueError("stride applies to mode='strided' only")
        return context_length
    stride = default_stride(context_length) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= context_length:
        raise ValueError(f"stride must be an integer in 1..context_length={context_length}, got {stride!r}")
    return context_length + 1 - int(stride)


def stream_tokens(model, context, num_new: int, *, seed: int = 0, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, mode: str = "exact",
                  stride: int | None = None, chunk_size: int | None = None,
                  devices=None) -> Iterator[np.ndarray]:
    """Generates tokens chunk by chunk; the concatenated chunks equal `generate_tokens`.

    Args:
      model: a `jaxgpt.GPT` in eval mode, a `Sampler` of one (faster for repeated calls), or a
        checkpoint path (`porting.load_weights`).
      context: int `(B, T)` prompt token ids, one prompt per row; T = 0 means the notebook's
        seed token (id 0, newline), which is not part of the output; T > C keeps the last C.
      num_new: tokens to generate per row (>= 1).
      seed: integer in [0, 2**32); row r at step j draws from fold_in(fold_in(key(seed), r), j).
      temperature: >= 0; 0 is greedy.
      top_k: keep the logits >= the k-th largest (ties kept); 1 is greedy; None keeps all.
      top_p: nucleus mass in (0, 1]; None (or 1) keeps all.
      mode: "exact" (the notebook's loop) or "strided" (see the module docstring).
      stride: tokens dropped at once when the window is full, 1..C (strided only; default C // 2).
      chunk_size: tokens per yielded chunk (default: everything in one chunk). Chunks run as
        separate calls of the same compiled loop, so this never changes the tokens.
      devices: where the rows run. None (default): split over every local device (one
        device: as before); an int n: the first n local devices (1 turns sharding off); a
        list of local `jax.Device`s. At most B devices are used; the rows are padded to a
        multiple of their number. The tokens do not depend on this.

    Yields:
      int32 numpy arrays `(B, n)`, n = chunk_size except possibly for the last chunk.

    Raises:
      ValueError: bad context shape/ids, num_new, seed, sampling, mode or devices options
        (checked before anything runs).
    """
    model = _as_sampler(model)
    config = model.config
    context = _check_context(context, config.vocab_size)
    keep = _check_run(num_new, seed, mode, stride, chunk_size, config.context_length)
    params = make_params(temperature, top_k, top_p, vocab_size=config.vocab_size)
    chosen = sharding.resolve_devices(devices)[: context.shape[0]]  # no device gets only padding rows
    return _run(model, context, int(num_new), int(seed), params, keep, int(chunk_size or num_new), chosen)


def _run(model, context, num_new, seed, params, keep, chunk_size, devices) -> Iterator[np.ndarray]:
    config = model.config
    batch = context.shape[0]
    if context.shape[1] == 0:
        context = np.zeros((batch, 1), np.int32)  # the notebook's seed context [[0]]
    context = context[:, -config.context_length :]  # the notebook's crop
    p = context.shape[1]
    # The prefill skips the last prompt token (step 0 decodes it): nothing for a 1-token prompt.
    prefill_bucket = 0 if p == 1 else bucket(p - 1, 1, config.context_length)
    # At least C: the refill step slices `keep` <= C tokens (compiled even when never run).
    stream_len = max(bucket(p, MIN_PROMPT_BUCKET, config.context_length) + bucket(num_new, MIN_STEPS_BUCKET),
                     config.context_length)
    # Rows padded to a multiple of the device count; padding rows come last, so the real rows
    # keep their indices and hence their random streams (keyed by (seed, row, step)).
    stream = np.zeros((sharding.padded_size(batch, len(devices)), stream_len), np.int32)
    stream[:batch, :p] = context

    # Parameters replicated, rows split: XLA partitions the compiled loop over the devices and
    # the carry (stream, KV cache) stays split by rows from call to call. Every carry leaf is
    # placed as `advance` returns it (base replicated), so chunk 2 reuses chunk 1's trace.
    whole, rows = sharding.placements(devices)
    graphdef, state = model.graphdef, model.state_on(devices)
    rows_total = stream.shape[0]
    cache = engine.start(graphdef, state, jax.device_put(stream[:, :prefill_bucket], rows),
                         model.take_cache(rows_total, devices))
    carry = engine.Carry(jax.device_put(stream, rows), cache, jax.device_put(np.int32(0), whole))
    # numpy scalars, not jnp: jit takes them as traced arguments without an eager dispatch each.
    for first in range(0, num_new, chunk_size):
        last = min(first + chunk_size, num_new)
        carry = engine.advance(graphdef, state, carry, np.int32(p), np.int32(first), np.int32(last),
                               np.uint32(seed), params, keep=keep)
        # Copy out now: the next advance donates (reuses) the buffer.
        yield np.array(np.asarray(carry.stream)[:batch, p + first : p + last])
    model.keep_cache(rows_total, devices, carry.cache)


def generate_tokens(model, context, num_new: int, *, seed: int = 0, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, mode: str = "exact",
                    stride: int | None = None, devices=None) -> np.ndarray:
    """Continues each row of `context` by `num_new` tokens, as the notebook's loop would.

    Args: as `stream_tokens` (without chunking); `devices` splits the rows over devices.

    Returns:
      int32 numpy array `(B, num_new)`: the generated tokens only.
    """
    chunks = stream_tokens(model, context, num_new, seed=seed, temperature=temperature, top_k=top_k,
                           top_p=top_p, mode=mode, stride=stride, devices=devices)
    return np.concatenate(list(chunks), axis=1)


def _vocab_for(model, vocab: Vocab | str | os.PathLike | None) -> Vocab:
    if vocab is None:
        vocab = default_vocab()
    elif not isinstance(vocab, Vocab):
        vocab = Vocab.load(vocab)
    if vocab.size != model.config.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.size} characters but the model's vocab_size is "
                         f"{model.config.vocab_size}: pass the checkpoint's vocabulary JSON")
    return vocab


def stream_text(model, prompt: str | Sequence[str] = "", num_chars: int = 500, *, batch: int = 1,
                vocab: Vocab | str | os.PathLike | None = None, chunk_size: int | None = None,
                **options) -> Iterator[list[str]]:
    """Generates text chunk by chunk: yields, per chunk, one string per sample.

    Args:
      model: a `jaxgpt.GPT` in eval mode, a `Sampler` of one, or a checkpoint path.
      prompt: the text to continue (all characters must be in the vocabulary); "" starts from
        the notebook's seed token (newline). A list gives one prompt per row; they must have
        the same length (the stream is one (B, T) array).
      num_chars: characters to generate per sample (the prompt is not repeated).
      batch: number of samples for a single prompt string (rows are independent draws).
      vocab: a `Vocab` or a vocabulary JSON path; default: the published 104-character map.
      chunk_size: characters per yielded chunk (default: all at once).
      **options: seed, temperature, top_k, top_p, mode, stride, devices, as in `stream_tokens`.

    Yields:
      lists of B strings.
    """
    model = _as_sampler(model)
    vocab = _vocab_for(model, vocab)
    prompts = [prompt] * _check_batch(batch) if isinstance(prompt, str) else list(prompt)
    if not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must be a non-empty list of strings of equal length")
    context = np.stack([vocab.encode(p) for p in prompts]).reshape(len(prompts), len(prompts[0]))
    chunks = stream_tokens(model, context, num_chars, chunk_size=chunk_size, **options)  # validates now
    return ([vocab.decode(row) for row in chunk] for chunk in chunks)


def _check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)


def generate(model, prompt: str = "", num_chars: int = 500, *,
             vocab: Vocab | str | os.PathLike | None = None, **options) -> str:
    """Continues `prompt` by `num_chars` characters, as the notebook's loop would.

    Args:
      model: a `jaxgpt.GPT` in eval mode, a `Sampler` of one, or a checkpoint path.
      prompt: text to continue; "" starts from the notebook's seed token (newline).
      num_chars: characters to generate (>= 1); the prompt is not repeated.
      vocab: a `Vocab` or vocabulary JSON path; default: the published 104-character map.
      **options: seed, temperature, top_k, top_p, mode, stride, devices, as in `stream_tokens`.

    Returns:
      The generated characters.

    Raises:
      VocabError: a prompt character outside the vocabulary.
      ValueError: bad options, or a vocabulary whose size differs from the model's.
    """
    return "".join(chunk[0] for chunk in stream_text(model, prompt, num_chars, vocab=vocab, **options))
