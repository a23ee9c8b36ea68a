"""The OpenAI completions protocol: request schema, validation into engine rows, response bodies.

Field for field this follows OpenAI's legacy `POST /v1/completions` (as vLLM's
`CompletionRequest` does), with jaxgpt's extensions. Lengths are in characters: one token is
one character of the model's vocabulary.

    prompt              string or non-empty list of strings (any lengths; "" starts from the
                        notebook's seed token)
    max_tokens          characters to generate per choice, 1..the server's cap (default 16)
    n                   choices per prompt; len(prompts) * n rows, at most the server's slots
    temperature, top_p, seed, stop (a string or a list of up to 4, as OpenAI's; each at most 32
                        characters), logprobs (0-5), echo,
    stream, stream_options.include_usage, user (ignored)
    extensions          top_k, min_p, repetition_penalty, logit_bias ({character: bias}; a bias
                        <= -100 bans the character, as OpenAI documents), mode ("exact" or
                        "strided"), stride
    accepted only at their neutral value: presence_penalty, frequency_penalty (0), best_of (n),
                        suffix (null)

Errors: a body that is not JSON (or uses NaN/Infinity) is 400; a body whose JSON does not fit
the schema (missing prompt, a string where a number goes, an unknown field) is 422; a value
out of range (characters outside the vocabulary, max_tokens above the cap, n above the slots,
top_p outside (0, 1], an unknown mode...) is 400. Every error body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field.

Rows and seeds: choice i of a request (i = prompt_index * n + j) is engine row i with the
random stream (seed, i), so its answer is row i of `jaxgpt.complete(model, prompts_repeated,
max_tokens, seed=seed, slots=M, ...)` with `prompts_repeated = [p0] * n + [p1] * n + ...`.
A request without a seed gets one drawn by the server, reported in the response's `seed`.
"""

from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

MAX_SEED = 2**32  # seeds are integers in [0, 2**32), as for `jaxgpt generate`
MAX_LOGPROBS = 5
BAN = -100.0  # OpenAI: a bias of -100 should ban the token
MODES = ("exact", "strided")


class APIError(Exception):
    """An error answered to one request: HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, param=self.param, type=self.type, code=self.code)


def error_body(message: str, *, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The JSON body of `POST /v1/completions` (types only; values are checked by `plan`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    logprobs: int | None = None
    echo: bool = False
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    mode: str = "exact"
    stride: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class Limits:
    """What the server accepts: its vocabulary, slots, cap on max_tokens, context length."""

    vocab: Any  # jaxgpt.vocab.Vocab
    max_batch: int
    max_tokens: int
    context_length: int
    model_name: str = "jaxgpt"
    max_stops: int = 4  # the engine's fixed-shape stop buffers (jaxgpt.engine.MAX_STOPS, MAX_STOP_LEN)
    max_stop_len: int = 32


@dataclass(frozen=True)
class Plan:
    """A validated request: its rows for the engine and how to answer.

    Attributes:
      prompts: one per row (row i = prompt_index * n + j), already repeated n times.
      options: keyword arguments of `jaxgpt.requests.Options`, shared by every row.
      seed: the seed in use (drawn by the server when the request had none).
    """

    prompts: tuple[str, ...]
    max_chars: int
    options: dict
    seed: int
    echo: bool
    logprobs: int | None  # None: no logprobs block; 0..5: the sampled character's and that many alternatives
    stream: bool
    include_usage: bool
    n: int
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rows(self) -> int:
        return len(self.prompts)


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; APIError 400 for anything that is not one."""

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    return value


def parse_request(body: dict) -> CompletionRequest:
    """The schema check; APIError 422 naming the first offending field."""
    try:
        return CompletionRequest.model_validate(body)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        field_ = ".".join(str(part) for part in first["loc"]) or None
        if first["loc"] and first["loc"][0] in _UNION_FIELDS:
            field_ = first["loc"][0]
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        elif field_ in _UNION_FIELDS and first["type"] != "missing":
            message = f"must be {_UNION_FIELDS[field_]}"
        else:
            message = first["msg"]
        raise APIError(422, f"{field_}: {message}", param=field_) from None


_UNION_FIELDS = {"prompt": "a string or a list of strings", "stop": "a string, a list of strings or null"}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _check_chars(param: str, text: str, vocab) -> None:
    unknown = vocab.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise _bad(param, f"characters not in the model's vocabulary: {shown}")


def _check_range(param: str, value, low=None, high=None, *, low_open=False) -> None:
    if value is None:
        return
    if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "inf)" if high is None else f"{high}]"
        raise _bad(param, f"must be in {lo}{hi}, got {value}")


def plan(request: CompletionRequest, limits: Limits) -> Plan:
    """Checks every value against the server's limits; APIError 400 naming the field."""
    r, vocab = request, limits.vocab
    if r.model is not None and r.model != limits.model_name:
        raise APIError(404, f"model: the model '{r.model}' does not exist; this server serves "
                       f"'{limits.model_name}'", param="model", code="model_not_found")
    prompts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt)
    if not prompts:
        raise _bad("prompt", "the list of prompts is empty")
    for i, p in enumerate(prompts):
        _check_chars("prompt" if isinstance(r.prompt, str) else f"prompt.{i}", p, vocab)
    _check_range("max_tokens", r.max_tokens, 1, limits.max_tokens)
    if r.echo and r.logprobs is not None and max(map(len, prompts)) > limits.max_tokens:
        # Scoring costs up to one forward pass per character: bounded like generation.
        raise _bad("prompt", f"with echo and logprobs a prompt has at most {limits.max_tokens} characters "
                   f"(the server's cap), got {max(map(len, prompts))}")
    _check_range("n", r.n, 1)
    if len(prompts) * r.n > limits.max_batch:
        raise _bad("n", f"{len(prompts)} prompt(s) x n={r.n} = {len(prompts) * r.n} choices, more than "
                   f"the server's {limits.max_batch} slots (--max-batch)")
    _check_range("temperature", r.temperature, 0.0)
    _check_range("top_p", r.top_p, 0.0, 1.0, low_open=True)
    _check_range("top_k", r.top_k, 1)
    _check_range("min_p", r.min_p, 0.0, 1.0)
    _check_range("repetition_penalty", r.repetition_penalty, 0.0, low_open=True)
    _check_range("logprobs", r.logprobs, 0, MAX_LOGPROBS)
    _check_range("seed", r.seed, 0, MAX_SEED - 1)
    if r.mode not in MODES:
        raise _bad("mode", f"must be one of {', '.join(MODES)}, got '{r.mode}'")
    if r.stride is not None:
        if r.mode != "strided":
            raise _bad("stride", "applies to mode 'strided' only")
        _check_range("stride", r.stride, 1, limits.context_length)
    stop = [] if r.stop is None else [r.stop] if isinstance(r.stop, str) else list(r.stop)
    if len(stop) > limits.max_stops:
        raise _bad("stop", f"at most {limits.max_stops} stop strings, got {len(stop)}")
    for s in stop:
        if not 1 <= len(s) <= limits.max_stop_len:
            raise _bad("stop", f"a stop string has 1..{limits.max_stop_len} characters, got {len(s)}")
        _check_chars("stop", s, vocab)
    bias = {}
    for char, value in (r.logit_bias or {}).items():
        if len(char) != 1:
            raise _bad("logit_bias", f"keys are single characters, got {char!r}")
        _check_chars("logit_bias", char, vocab)
        _check_range("logit_bias", value, BAN, 100.0)
        bias[char] = -math.inf if value <= BAN else float(value)
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("suffix", None)):
        value = getattr(r, name)
        if value is not None and value != neutral:
            raise _bad(name, "is not supported by this server")
    if r.best_of is not None and r.best_of != r.n:
        raise _bad("best_of", "is not supported by this server (only best_of = n)")
    options = dict(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                   repetition_penalty=r.repetition_penalty, logit_bias=bias or None, stop=tuple(stop),
                   logprobs=None if r.logprobs is None else max(r.logprobs, 1), mode=r.mode, stride=r.stride)
    return Plan(prompts=tuple(p for p in prompts for _ in range(r.n)), max_chars=r.max_tokens,
                options=options, seed=secrets.randbelow(MAX_SEED) if r.seed is None else r.seed,
                echo=r.echo, logprobs=r.logprobs, stream=r.stream,
                include_usage=bool(r.stream_options and r.stream_options.include_usage), n=r.n)


# ----------------------------------------------------------------------------- response bodies
def _number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no infinities


def logprobs_block(text: str, logprobs, top_logprobs, offset: int, want_top: int) -> dict:
    """OpenAI's `logprobs` object for `text`, its characters starting at `offset` in the choice.

    `logprobs` may hold None entries (the first character of an echoed prompt has no
    condition); `top_logprobs` is one dict per character or None.
    """
    tops = None
    if want_top > 0:
        tops = [None if t is None else {c: _number(v) for c, v in t.items()} for t in
                (top_logprobs if top_logprobs is not None else [None] * len(text))]
    return {"tokens": list(text),
            "token_logprobs": [None if v is None else _number(v) for v in logprobs],
            "top_logprobs": tops,
            "text_offset": list(range(offset, offset + len(text)))}


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(plan_: Plan, model_name: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": plan_.id, "object": "text_completion", "created": plan_.created, "model": model_name,
            "choices": choices, "seed": plan_.seed}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(plan_: Plan, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in plan_.prompts[::plan_.n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying `data` (a JSON object, or the literal `[DONE]`)."""
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))).encode() + b"\n\n"
