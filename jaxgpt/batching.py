"""Continuous batching on the host side: `Sampler` (a prepared model) and `Batcher` (its slots).

A `Batcher` owns N slots of the compiled engine (`jaxgpt.engine`). `add` prefills one request
alone and inserts it into a free slot; `step` advances every busy slot by one chunk and returns
what each produced as `Event`s; a finished or cancelled slot is free at once for the next
`add`. `jaxgpt.complete`, the `generate*` functions and the server all drive a Batcher: there
is one generation loop.

Streaming text and stop strings: the engine finds a stop string on the device (so a finished
row stops at once), but the characters of a stop string arrive one by one. An `Event` therefore
holds back the generated characters that could still begin a stop string, and a row finished by
one never shows it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from jaxgpt import engine, sharding
from jaxgpt.options import Options
from jaxgpt.vocab import Vocab, default_vocab


class Sampler:
    """A GPT prepared for generation: split once, its parameters placed once per device set.

    Preparing a model (walking the module graph, placing the parameters) costs more than a
    decode step, so repeated generation should pass a Sampler instead of the GPT. It snapshots
    the parameters: later changes to the model are not seen (build a new Sampler). It also keeps
    the slots of its last idle `Batcher` (per slot count and device set) to reuse their memory.

    Attributes:
      config: the model's `GPTConfig`.
      graphdef: the model's `engine.StaticGraph` (jit's static argument).
    """

    def __init__(self, model):
        """Args: model: a `jaxgpt.GPT` in eval mode (load files with `porting.load_weights`)."""
        if not hasattr(model, "config") or not hasattr(model, "decode"):
            raise TypeError(f"model must be a jaxgpt.GPT (load a checkpoint with porting.load_weights), "
                            f"got {type(model).__name__}")
        if model.training:
            raise ValueError("the model is in training mode (dropout on): call model.eval() before generating")
        self.config = model.config
        self.dtype = model.token_embedding.embedding.dtype
        graphdef, state = nnx.split(model)
        # A new tree over the same arrays: the split state's Variables are the model's own.
        self._state = jax.tree.map(lambda x: x, state)
        self.graphdef = engine.StaticGraph(graphdef)
        self._placed: dict[tuple, nnx.State] = {}
        self._spare: tuple[tuple, engine.Slots] | None = None

    def state_on(self, devices: Sequence[jax.Device]) -> nnx.State:
        """The parameters replicated on `devices` (placed on the first call for them)."""
        key = tuple(devices)
        if key not in self._placed:
            self._placed[key] = jax.device_put(self._state, sharding.placements(devices)[0])
        return self._placed[key]

    def take_slots(self, slots: int, devices: Sequence[jax.Device]) -> engine.Slots:
        """Idle slots for a new Batcher: the last idle Batcher's if they had this shape, else new."""
        key, spare = (slots, tuple(devices)), self._spare
        if spare is not None and spare[0] == key:
            self._spare = None  # handed out (they will be donated): never twice
            return spare[1]
        return engine.empty_slots(self.config, slots, self.dtype, sharding.placements(devices)[1])

    def keep_slots(self, slots: int, devices: Sequence[jax.Device], state: engine.Slots) -> None:
        self._spare = ((slots, tuple(devices)), state)


def as_sampler(model) -> Sampler:
    return model if isinstance(model, Sampler) else Sampler(model)


def vocab_for(config, vocab: Vocab | str | None) -> Vocab | None:
    """The vocabulary to use: `vocab` (a Vocab or a JSON path), else the published one if it fits."""
    if vocab is None:
        vocab = default_vocab()
        return vocab if vocab.size == config.vocab_size else None
    if not isinstance(vocab, Vocab):
        vocab = Vocab.load(vocab)
    if vocab.size != config.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.size} characters but the model's vocab_size is "
                         f"{config.vocab_size}: pass the checkpoint's vocabulary JSON")
    return vocab


@dataclasses.dataclass(frozen=True)
class Event:
    """What one slot produced in one `Batcher.step`.

    Attributes:
      slot: the slot.
      tag: the tag given to `add`.
      tokens: int32 `(n,)` new tokens whose characters are final (stop-string prefixes held back).
      text: their characters (None without a vocabulary).
      logprobs: float32 `(n,)` their log-probabilities, or None (the request asked for none).
      top_ids, top_logprobs: `(n, k)` the k likeliest tokens at each step and their
        log-probabilities (k = the request's logprobs), or None.
      finish_reason: None while running, else "stop" or "length" (the slot is then free).
    """

    slot: int
    tag: object
    tokens: np.ndarray
    text: str | None
    logprobs: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    finish_reason: str | None


@dataclasses.dataclass
class _Row:  # a busy slot's host-side record
    tag: object
    stops: tuple[tuple[int, ...], ...]
    top_n: int
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)
    shown: int = 0  # tokens already returned in events


class Batcher:
    """N slots of the compiled engine, each serving one request at a time.

    Not thread-safe: one thread drives it (the server runs it in its scheduler thread).
    """

    STEPS = 32  # steps per `step()` by default: streamed text arrives at least every 32 steps

    def __init__(self, model, slots: int, *, vocab: Vocab | str | None = None, devices=None):
        """Args:
          model: a `jaxgpt.GPT` in eval mode or a `Sampler` of one.
          slots: N, the most requests in flight; every compiled step has N rows, and a request's
            bits depend on N (and nothing else of the batch).
          vocab: for text prompts, stop strings, logit_bias (default: the published map when its
            size fits the model).
          devices: None (every local device), a count or a list: the slots are split over them
            (N padded to a multiple of their number with slots that stay idle).
        """
        self.sampler = as_sampler(model)
        self.config = self.sampler.config
        self.vocab = vocab_for(self.config, vocab)
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        self.slots = int(slots)
        self.devices = sharding.resolve_devices(devices)[: self.slots]  # no device of idle padding only
        self._rows_total = sharding.padded_size(self.slots, len(self.devices))
        self._params = self.sampler.state_on(self.devices)
        self._state = self.sampler.take_slots(self._rows_total, self.devices)
        self._busy: dict[int, _Row] = {}
        self._pending: dict[tuple, list] = {}  # prompt tokens -> [(slot, engine.Request)] not inserted yet

    # ------------------------------------------------------------------ requests in
    def free_slots(self) -> int:
        return self.slots - len(self._busy)

    def active(self) -> int:
        return len(self._busy)

    def add(self, prompt, max_chars: int, options: Options | None = None, *, seed: int = 0, stream: int = 0,
            tag=None) -> int:
        """Prefills `prompt` alone and inserts it into the lowest free slot.

        Args:
          prompt: text (needs the vocabulary) or int token ids; empty: the notebook's seed token
            (newline), not part of the output. Longer than the context: its last C characters.
          max_chars: characters to generate at most (>= 1).
          options: `Options` (default: temperature 1, no filters, no stops, no logprobs).
          seed, stream: the random stream, integers in [0, 2**32).
          tag: returned in this request's events.

        Returns:
          The slot.

        Raises:
          ValueError (VocabError for prompt characters outside the vocabulary): bad values,
            or no free slot; nothing is changed then.
        """
        options = Options() if options is None else options
        c = self.config.context_length
        tokens = self._prompt_ids(prompt)[-c:]
        if isinstance(max_chars, bool) or not isinstance(max_chars, (int, np.integer)) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
        for name, value in (("seed", seed), ("stream", stream)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
                raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
        keep, params, stops, lengths, top_n = options.engine_row(self.vocab, self.config.vocab_size, c)
        if not self.free_slots():
            raise ValueError(f"all {self.slots} slots are busy")
        slot = min(set(range(self.slots)) - self._busy.keys())
        p = len(tokens)
        window = np.zeros(c, np.int32)
        window[: p - 1] = tokens[:-1]
        request = engine.Request(window, np.int32(p - 1), np.int32(tokens[-1]), np.int32(min(max_chars, 2**31 - 1)),
                                 np.uint32(seed), np.uint32(stream), keep, params, stops, lengths, top_n)
        # Inserted at the next step, together with the other requests of the same prompt.
        self._pending.setdefault(tuple(tokens.tolist()), []).append((slot, request))
        self._busy[slot] = _Row(tag, tuple(tuple(s) for s in _stop_ids(stops, lengths)), int(top_n))
        return slot

    def _insert_pending(self) -> None:
        """Prefills each new prompt once, alone, and inserts its requests into their slots."""
        if self._state is None:  # lent to the Sampler while idle: take it back
            self._state = self.sampler.take_slots(self._rows_total, self.devices)
        n, c = self._rows_total, self.config.context_length
        for tokens, group in self._pending.items():
            cache = None
            if len(tokens) > 1:  # the last prompt token is decoded by the first step, so it is not prefilled
                padded = np.zeros((1, min(1 << (len(tokens) - 2).bit_length(), c)), np.int32)
                padded[0, : len(tokens) - 1] = tokens[:-1]
                cache = engine.prefill(self.sampler.graphdef, self._params, padded)
            targets = np.full(n, n, np.int32)  # slot n does not exist: padding rows are dropped
            targets[: len(group)] = [slot for slot, _ in group]
            rows = [request for _, request in group] + [group[0][1]] * (n - len(group))
            stacked = jax.tree.map(lambda *fields: np.stack(fields), *rows)
            self._state = engine.insert(self._state, stacked, cache, targets)
        self._pending.clear()

    def cancel(self, slot: int) -> None:
        """Frees a busy slot at once; its request produces nothing more."""
        if slot in self._busy:
            for tokens, group in list(self._pending.items()):  # not inserted yet: just forget it
                self._pending[tokens] = [(s, r) for s, r in group if s != slot]
                if not self._pending[tokens]:
                    del self._pending[tokens]
            if self._state is not None:
                self._state = engine.release(self._state, np.int32(slot))
            del self._busy[slot]

    # ------------------------------------------------------------------ steps
    def step(self, max_steps: int | None = None, *, until_finish: bool = False) -> list[Event]:
        """Advances every busy slot by up to `max_steps` steps.

        Args:
          max_steps: steps at most in this call (default `STEPS`, at most `engine.CHUNK`);
            never changes any row's output.
          until_finish: also return right after the first step at which some row finishes, so
            that a waiting request can take its slot (never changes any row's output either).

        Returns:
          One `Event` per busy slot that produced final characters or finished.
        """
        if not self._busy:
            return []
        n = self.STEPS if max_steps is None else max(1, min(int(max_steps), engine.CHUNK))
        if self._pending:
            self._insert_pending()
        self._state, chunk = engine.generate(self.sampler.graphdef, self._params, self._state, np.int32(n),
                                              np.bool_(until_finish))
        want_logprobs = any(row.top_n >= 0 for row in self._busy.values())
        fetched = jax.device_get((chunk.tokens, chunk.valid, self._state.finish, self._state.stop_length,
                                  (chunk.logprobs, chunk.top_ids, chunk.top_logprobs) if want_logprobs else None))
        tokens, valid, finish, stop_length, lp = fetched
        events = []
        for slot in sorted(self._busy):
            row = self._busy[slot]
            keep = valid[slot]
            row.tokens.extend(tokens[slot][keep].tolist())
            if row.top_n >= 0:
                row.logprobs.extend(lp[0][slot][keep].tolist())
                row.top_ids.extend(lp[1][slot][keep][:, : row.top_n])
                row.top_logprobs.extend(lp[2][slot][keep][:, : row.top_n])
            reason = {engine.LENGTH: "length", engine.STOP: "stop"}.get(int(finish[slot]))
            event = self._event(slot, row, reason, int(stop_length[slot]))
            if event is not None:
                events.append(event)
            if reason is not None:
                del self._busy[slot]
        if not self._busy:
            self.sampler.keep_slots(self._rows_total, self.devices, self._state)
            self._state = None  # lent to the Sampler (another Batcher may reuse the memory)
        return events

    def _event(self, slot: int, row: _Row, reason: str | None, stop_length: int) -> Event | None:
        end = len(row.tokens) - stop_length if reason == "stop" else len(row.tokens)
        if reason is None:
            end -= _held_back(row.tokens, row.stops)
        if end <= row.shown and reason is None:
            return None
        start, row.shown = row.shown, max(end, row.shown)
        ids = np.asarray(row.tokens[start:end], np.int32)
        with_lp = row.top_n >= 0
        return Event(slot, row.tag, ids, self.vocab.decode(ids) if self.vocab else None,
                     np.asarray(row.logprobs[start:end], np.float32) if with_lp else None,
                     np.asarray(row.top_ids[start:end], np.int32).reshape(len(ids), row.top_n) if with_lp else None,
                     np.asarray(row.top_logprobs[start:end], np.float32).reshape(len(ids), row.top_n)
                     if with_lp else None,
                     reason)

    def _prompt_ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            if self.vocab is None:
                raise ValueError("a text prompt needs a vocabulary matching the model's: pass vocab=")
            ids = self.vocab.encode(prompt)
        else:
            ids = np.asarray(prompt)
            if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
                raise ValueError(f"a token prompt must be a 1-D array of integer ids, got shape {ids.shape} "
                                 f"and dtype {ids.dtype}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
                bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")
        return ids.astype(np.int32) if ids.size else np.zeros(1, np.int32)  # the notebook's seed context [[0]]


def _stop_ids(stops: np.ndarray, lengths: np.ndarray):
    return [stops[m, stops.shape[1] - lengths[m]:] for m in range(len(lengths)) if lengths[m]]


def _held_back(tokens: list, stops) -> int:
    """How many trailing tokens could still be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(tokens)), held, -1):
            if tuple(tokens[-k:]) == stop[:k]:
                held = k
                break
    return held
