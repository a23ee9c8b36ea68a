"""Independent requests in one batch: `complete` and `stream_completions`.

    completions = jaxgpt.complete(model, ["ROMEO:", "", "To be"], [200, 50, 80], seed=[1, 2, 3],
                                  temperature=[0.8, 1.0, 0], stop=[["\\n\\n"], None, ["."]], logprobs=5)

Every option is a scalar (all rows) or a list with one value per prompt, and every value is
traced: no value recompiles. A scalar seed gives row r the random stream (seed, r), a list gives
row r the stream (seed[r], 0); a row's output depends only on its own prompt, options and
stream. With `slots=N` every compiled step has N rows whatever the number of prompts, so each
row gets exactly the bits it gets alone with the same N (more prompts than N queue for free
slots: continuous batching). Without `slots`, N is the number of prompts, and logits can differ
in their last bits between batch sizes (a token can then flip, rarely; the README has the figure).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from jaxgpt import engine
from jaxgpt.batching import Batcher, Event, as_sampler
from jaxgpt.options import Options


@dataclasses.dataclass(frozen=True)
class Completion:
    """One request's result.

    Attributes:
      text: the generated characters, without the prompt and without the stop string.
      tokens: int32 ids of `text`.
      finish_reason: "stop" (a stop string) or "length" (max_chars reached).
      logprobs: float32 `(len(text),)` log-probability of each character under the model's own
        distribution (log_softmax of the raw logits), or None when logprobs=0.
      top_logprobs: for logprobs=n > 0, per character a dict of the n most likely characters
        -> log-probability (same distribution), most likely first; else None.
    """

    text: str
    tokens: np.ndarray
    finish_reason: str
    logprobs: np.ndarray | None = None
    top_logprobs: list[dict[str, float]] | None = None


_OPTION_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logit_bias", "stop", "logprobs",
                 "mode", "stride")


def stream_completions(model, prompts: str | Sequence[str], max_chars, *, seed=0, vocab=None, devices=None,
                       slots: int | None = None, chunk_size: int | None = None, **options) -> Iterator[Event]:
    """Runs the requests, yielding each row's new characters and its finish as they are produced.

    Args: as `complete` (options by keyword), plus chunk_size: steps per engine call (default
      `Batcher.STEPS`, at most `engine.CHUNK`; never changes the output).

    Yields:
      `batching.Event`s whose `tag` is the row's index in `prompts`.

    Raises:
      ValueError (VocabError for prompt characters outside the vocabulary): any bad value,
        before anything runs.
    """
    return _prepare(model, prompts, max_chars, seed, vocab, devices, slots, chunk_size, options)[1]


def _prepare(model, prompts, max_chars, seed, vocab, devices, slots, chunk_size, options):
    """Validates everything, then returns (the Batcher, the generator of its events)."""
    if "stop" in options:
        options["stop"] = _stop_rows(options["stop"])
    if "logprobs" in options:  # complete's 0 (none) is Options' None; Options' 0 (chosen only) is not offered
        lp = options["logprobs"]
        if isinstance(lp, np.ndarray):  # per-row values, as every other option accepts them
            lp = lp.tolist() if lp.ndim else lp.item()
        options["logprobs"] = [None if n == 0 else n for n in lp] if isinstance(lp, (list, tuple)) else (
            None if lp == 0 and not isinstance(lp, bool) else lp)
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must be a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    rows = len(prompts)
    seeds, streams = _seeds(seed, rows)
    per_row = {name: _per_row(name, value, rows) for name, value in options.items()}
    row_options = [Options(**{name: values[r] for name, values in per_row.items()}) for r in range(rows)]
    budgets = _per_row("max_chars", max_chars, rows)
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1):
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    batcher = Batcher(as_sampler(model), rows if slots is None else int(slots), vocab=vocab, devices=devices)
    for r, (prompt, opts) in enumerate(zip(prompts, row_options)):  # validate every row before running any
        batcher._prompt_ids(prompt)
        opts.engine_row(batcher.vocab, batcher.config.vocab_size, batcher.config.context_length)
        for name, value in (("seed", seeds[r]), ("stream", streams[r])):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
                raise ValueError(f"{name} must be an integer in [0, 2**32), got {value!r}")
        if isinstance(budgets[r], bool) or not isinstance(budgets[r], (int, np.integer)) or budgets[r] < 1:
            raise ValueError(f"max_chars must be a positive integer, got {budgets[r]!r}")
    return batcher, _run(batcher, prompts, budgets, row_options, seeds, streams, chunk_size)


def _run(batcher, prompts, budgets, row_options, seeds, streams, chunk_size) -> Iterator[Event]:
    waiting = list(range(len(prompts)))
    while waiting or batcher.active():
        while waiting and batcher.free_slots():
            r = waiting.pop(0)
            batcher.add(prompts[r], budgets[r], row_options[r], seed=seeds[r], stream=streams[r], tag=r)
        yield from batcher.step(chunk_size, until_finish=bool(waiting))


def complete(model, prompts: str | Sequence[str], max_chars, *, seed=0, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, logit_bias=None, stop=None, logprobs=0, mode="exact",
             stride=None, vocab=None, devices=None, slots=None) -> list[Completion]:
    """Completes each prompt independently, in one batch.

    Args:
      model: a `jaxgpt.GPT` in eval mode or a `jaxgpt.Sampler` of one.
      prompts: a string or a list of strings of any lengths; "" starts from the notebook's seed
        token (newline).
      max_chars: characters to generate at most, per row or for all.
      seed: an integer in [0, 2**32) (row r: stream (seed, r)) or one per row (stream (seed[r], 0)).
      temperature, top_k, top_p, min_p, repetition_penalty, logit_bias, mode, stride: see `Options`.
      stop: a string or a list of strings for every row, or per row a list of lists (or None).
      logprobs: 0: none; n > 0: each character's log-probability and the n likeliest alternatives.
      vocab: a `Vocab` or a vocabulary JSON path (default: the published map).
      devices: None (every local device), a count, or a list of devices.
      slots: N rows per compiled step (see the module docstring); default: the number of prompts.

    Returns:
      One `Completion` per prompt, in order.
    """
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty, logit_bias=logit_bias, stop=stop,
                   logprobs=logprobs, mode=mode, stride=stride)
    # As many steps per engine call as it holds: nobody watches the text arrive.
    batcher, events = _prepare(model, prompts, max_chars, seed, vocab, devices, slots, engine.CHUNK, options)
    parts: dict[int, list[Event]] = {}
    for event in events:
        parts.setdefault(event.tag, []).append(event)
    return [completion_from_events(parts[r], batcher.vocab) for r in range(len(parts))]


def completion_from_events(events: list[Event], vocab) -> Completion:
    """The `Completion` of one request from all its events, in order (`vocab` names top_logprobs)."""
    tokens = np.concatenate([e.tokens for e in events])
    text = "".join(e.text or "" for e in events)
    logprobs = top = None
    if events[0].logprobs is not None:
        logprobs = np.concatenate([e.logprobs for e in events])
        ids = np.concatenate([e.top_ids for e in events])
        if ids.shape[1]:
            top_lp = np.concatenate([e.top_logprobs for e in events])
            name = vocab.chars.__getitem__ if vocab is not None else int
            top = [{name(int(i)): float(lp) for i, lp in zip(row_ids, row_lp)} for row_ids, row_lp in zip(ids, top_lp)]
    return Completion(text, tokens, events[-1].finish_reason, logprobs, top)


def _seeds(seed, rows: int) -> tuple[list[int], list[int]]:
    if isinstance(seed, (list, tuple, np.ndarray)):
        seeds = list(seed)
        if len(seeds) != rows:
            raise ValueError(f"seed has {len(seeds)} values for {rows} prompts")
        return seeds, [0] * rows
    return [seed] * rows, list(range(rows))


def _per_row(name: str, value, rows: int) -> list:
    """A scalar option broadcast to every row, or a per-row list checked for its length."""
    is_list = isinstance(value, (list, tuple, np.ndarray)) and not (name in ("stop",) and _is_stop_list(value))
    if name == "logit_bias":
        is_list = isinstance(value, (list, tuple))
    if not is_list:
        return [value] * rows
    if len(value) != rows:
        raise ValueError(f"{name} has {len(value)} values for {rows} prompts")
    return list(value)


def _is_stop_list(value) -> bool:
    """True for one list of stop strings (shared by all rows), False for per-row lists."""
    return all(isinstance(v, str) for v in value)


def _stop_rows(stop):
    """`stop` as `Options.stop` values: () for None, per row when given as a list of lists."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    forms = "stop must be a string, a list of strings, or one list of strings per prompt"
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"{forms}; got {type(stop).__name__}")
    if _is_stop_list(stop):
        return tuple(stop)
    rows = []
    for s in stop:
        if s is not None and not isinstance(s, (str, list, tuple)):
            raise ValueError(f"{forms}; got an entry {s!r}")
        rows.append(() if s is None else ((s,) if isinstance(s, str) else tuple(s)))
    return rows


__all__ = ["Completion", "Options", "complete", "stream_completions"]
