"""`POST /v1/attention`: what one character attended to, in every block and head.

The page's attention view asks for it when a character is clicked; any client may.

    request   {"text": "ROMEO: But", "query": 9}
              text: 1..context_length characters of the model's vocabulary, encoded as one
              window at positions 0..T-1 (as the notebook's loop encodes its context);
              query: index of the character whose attention is wanted (default: the last).
    response  {"object": "attention", "model": "jaxgpt", "tokens": ["R", "O", ...],
               "query": 9, "num_blocks": 6, "num_heads": 6,
               "weights": [[[w_0, ..., w_query] per head] per block]}
              weights[i][h][s]: the softmax weight the query gives the character at s <= query
              in head h of block i (row `query` of `GPT.attention_weights`; each sums to 1).

Errors are the completions endpoint's: 400 for a body that is not JSON or a value out of range
(characters outside the vocabulary, a text longer than the window, a query outside it), 422 for
a body that does not fit the schema, each naming the field.

Cost: the query's row depends only on the characters up to it (causal attention), so the text
is cut after the query and right-padded to context_length: one compiled program serves every
request. It runs in a worker thread, one request at a time (a lock), never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from fastapi import APIRouter, Request
from flax import nnx
from pydantic import BaseModel, ConfigDict

from jaxgpt.serving.protocol import APIError, parse_body

router = APIRouter()


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str
    query: int | None = None
    model: str | None = None


class _Program:
    """The compiled `attention_weights` of one served model, rows of one query at a time."""

    def __init__(self, sampler):
        self.config = sampler.config
        self.state = sampler.state_on(jax.local_devices()[:1])
        self.lock = threading.Lock()
        graphdef = sampler.graphdef

        @jax.jit
        def query_row(state, tokens, query):  # tokens int (1, C), query int () -> (N, H, C)
            weights = nnx.merge(graphdef.graphdef, state).attention_weights(tokens)  # (N, 1, H, C, C)
            return jnp.take(weights[:, 0], query, axis=2)

        self._query_row = query_row

    def row(self, ids: np.ndarray, query: int) -> np.ndarray:
        """float32 `(N, H, query + 1)` for token ids `(T,)` and a query index < T."""
        tokens = np.zeros((1, self.config.context_length), np.int32)
        tokens[0, : query + 1] = ids[: query + 1]
        with self.lock:
            row = self._query_row(self.state, tokens, np.int32(query))
            return np.asarray(row)[..., : query + 1]


def _program(app) -> _Program:
    program = getattr(app.state, "attention_program", None)
    if program is None:  # built on first use; a race builds two equal ones, harmlessly
        program = app.state.attention_program = _Program(app.state.sampler)
    return program


def _parse(raw: bytes) -> AttentionRequest:
    try:
        return AttentionRequest.model_validate(parse_body(raw))
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise APIError(422, f"{field}: {message}", param=field) from None


@router.post("/v1/attention")
async def attention(request: Request):
    body = _parse(await request.body())
    state = request.app.state
    limits, vocab, config = state.limits, state.vocab, state.config
    if body.model is not None and body.model != limits.model_name:
        raise APIError(404, f"model: the model '{body.model}' does not exist; this server serves "
                       f"'{limits.model_name}'", param="model", code="model_not_found")
    text = body.text
    if not 1 <= len(text) <= config.context_length:
        raise APIError(400, f"text: must have 1..{config.context_length} characters (the model's window), "
                       f"got {len(text)}", param="text")
    unknown = vocab.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise APIError(400, f"text: characters not in the model's vocabulary: {shown}", param="text")
    query = len(text) - 1 if body.query is None else body.query
    if not 0 <= query < len(text):
        raise APIError(400, f"query: must be in [0, {len(text) - 1}] (an index of text), got {query}", param="query")
    program = _program(request.app)
    row = await asyncio.get_running_loop().run_in_executor(None, program.row, vocab.encode(text), query)
    return {"object": "attention", "model": limits.model_name, "tokens": list(text), "query": query,
            "num_blocks": config.num_blocks, "num_heads": config.num_heads,
            "weights": row.astype(np.float64).tolist()}
