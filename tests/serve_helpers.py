"""Shared by the serving tests: a small random-weight model, a live server, offline references."""

from __future__ import annotations

import contextlib

import numpy as np
from flax import nnx

import jaxgpt
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT
from jaxgpt.serving.app import create_app
from jaxgpt.serving.server import serve_in_thread
from jaxgpt.vocab import default_vocab

# The published vocabulary at a small size: the window (C = 16) slides within a few dozen characters.
CONFIG = GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
VOCAB = default_vocab()
SLOTS = 4
KEY = "test-key"
OPTION_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logit_bias", "stop", "mode", "stride")


def small_model(seed: int = 5):
    model = GPT(CONFIG, rngs=nnx.Rngs(seed))
    model.eval()
    return model


@contextlib.contextmanager
def running_server(model, **kwargs):
    """create_app(model, **kwargs) served on 127.0.0.1 at a free port; yields (server, app)."""
    app = create_app(model, vocab=VOCAB, **kwargs)
    server, thread = serve_in_thread(app, "127.0.0.1", 0)
    try:
        yield server, app
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"


def engine_options(body: dict) -> dict:
    """`jaxgpt.complete` keyword arguments for the options of a request body."""
    out = {k: body[k] for k in OPTION_NAMES if k in body}
    if "stop" in out and isinstance(out["stop"], str):
        out["stop"] = [out["stop"]]
    if "logit_bias" in out:
        out["logit_bias"] = {c: (-np.inf if v <= -100 else float(v)) for c, v in out["logit_bias"].items()}
    if body.get("logprobs") is not None:  # complete's 0 is none; the chosen character's logprob is the same for any n
        out["logprobs"] = max(body["logprobs"], 1)
    return out


def offline(model, body: dict, seed: int, slots: int = SLOTS):
    """Row i of jaxgpt.complete([prompt] * n, ...) for each choice i of a request body."""
    prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
    n = body.get("n", 1)
    rows = [p for p in prompts for _ in range(n)]
    return jaxgpt.complete(model, rows, body.get("max_tokens", 16), seed=seed, slots=slots, vocab=VOCAB,
                           **engine_options(body))


def assert_choice_equals(choice: dict, completion, body: dict, label=""):
    """An API choice against a `Completion`: same text, finish reason and logprobs, bit for bit."""
    assert choice["text"] == completion.text, label
    assert choice["finish_reason"] == completion.finish_reason, label
    if body.get("logprobs") is None:
        assert choice["logprobs"] is None, label
        return
    lp = choice["logprobs"]
    assert lp["tokens"] == list(completion.text), label
    np.testing.assert_array_equal(np.asarray(lp["token_logprobs"], np.float32), completion.logprobs, err_msg=label)
    if body["logprobs"] > 0:
        assert len(lp["top_logprobs"]) == len(completion.top_logprobs), label
        for got, want in zip(lp["top_logprobs"], completion.top_logprobs):
            assert list(got) == list(want), label
            np.testing.assert_array_equal(np.float32(list(got.values())), np.float32(list(want.values())), err_msg=label)
    assert lp["text_offset"] == list(range(len(completion.text))), label
