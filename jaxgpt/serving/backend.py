"""The server's view of the engine: the calls it makes into jaxgpt.requests / batching / score.

Kept in one place so the server's use of the engine reads at a glance: build the Batcher
(the same continuous-batching core `jaxgpt.complete(..., slots=M)` runs), turn validated
request values into `Options`, compile everything at start-up, score an echoed prompt.
"""

from __future__ import annotations

from jaxgpt.serving.protocol import APIError

_OPTION_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logit_bias", "stop",
                  "logprobs", "mode", "stride")


def as_sampler(model):
    """A `jaxgpt.Sampler` (parameters split and placed once) for a GPT or a Sampler."""
    from jaxgpt.batching import as_sampler

    return as_sampler(model)


class EngineUnavailable(RuntimeError):
    """The engine modules the server drives are missing from this installation."""


def stop_limits() -> dict:
    """The engine's fixed stop-string buffer sizes, as `protocol.Limits` fields."""
    from jaxgpt import engine

    return {"max_stops": getattr(engine, "MAX_STOPS", 4), "max_stop_len": getattr(engine, "MAX_STOP_LEN", 32)}


def make_batcher(sampler, slots: int, vocab, devices):
    try:
        from jaxgpt.batching import Batcher
    except ModuleNotFoundError as e:
        if e.name != "jaxgpt.batching":
            raise
        raise EngineUnavailable("jaxgpt serve needs the continuous-batching engine (jaxgpt.batching), "
                           "which this checkout lacks") from None

    return Batcher(sampler, slots, vocab=vocab, devices=devices)


def make_options(values: dict, config, vocab):
    """`jaxgpt.Options` of a validated request, checked as the engine will (400 on any ValueError).

    protocol.plan has checked every value it knows about; the engine's own check is the last
    word (e.g. a logit_bias banning every character), answered 400 naming the option its
    message mentions.
    """
    from jaxgpt.options import Options

    try:
        options = Options(**values)
        options.engine_row(vocab, config.vocab_size, config.context_length)
    except ValueError as e:
        message = str(e)
        param = next((name for name in _OPTION_FIELDS if name in message), None)
        raise APIError(400, message, param=param) from None
    return options


def warm_up(batcher, vocab, context_length: int) -> None:
    """Compiles the engine's programs now: prefill at every prompt bucket, insert, a chunk, release.

    The prefill buckets are 1, 2, 4, ..., C tokens (a prompt of p characters prefills p - 1);
    a 1-character prompt prefills nothing.
    """
    from jaxgpt.options import Options

    lengths, bucket = [1], 1
    while bucket < context_length:
        lengths.append(bucket + 1)
        bucket *= 2
    lengths.append(context_length)
    char = vocab.chars[0]
    for n in lengths:
        slot = batcher.add(char * n, 1 << 20, Options(logprobs=1), seed=0, stream=0)
        batcher.step(1)
        batcher.cancel(slot)


def top_dicts(vocab, top_ids, top_logprobs) -> list[dict[str, float]] | None:
    """Per character, {character: log-probability} of the likeliest ones, most likely first."""
    if top_ids is None:
        return None
    chars = vocab.chars
    return [{chars[int(i)]: float(lp) for i, lp in zip(ids, lps)} for ids, lps in zip(top_ids, top_logprobs)]


def prompt_logprobs(sampler, vocab, prompt: str, top: int, mode: str = "exact", stride: int | None = None):
    """(logprobs, top_logprobs) of an echoed prompt's characters, from `jaxgpt.score`.

    Character i is scored as generation would see it after the seed token (so the first has a
    value too); `top` dicts of the likeliest characters, most likely first (None when top = 0).
    """
    if not prompt:
        return [], ([] if top else None)
    try:
        from jaxgpt.score import score_details
    except ModuleNotFoundError as e:
        if e.name != "jaxgpt.score":
            raise
        raise APIError(400, "echo: log-probabilities of the prompt need jaxgpt.score, missing from this "
                       "installation", param="echo") from None
    scores = score_details(sampler, prompt, vocab=vocab, mode=mode, stride=stride, top=max(top, 1))
    tops = None
    if top:
        tops = top_dicts(vocab, scores.top_ids[:, :top], scores.top_logprobs[:, :top])
    return [float(x) for x in scores.logprobs], tops
