"""The completions protocol without a server: schema (422), values (400), rows and seeds, bodies, metrics."""

from __future__ import annotations

import json
import math

import pytest

from jaxgpt.serving import protocol
from jaxgpt.serving.metrics import Metrics
from jaxgpt.serving.protocol import APIError, Limits
from jaxgpt.vocab import Vocab

VOCAB = Vocab(tuple("\n abcdefghij"))
LIMITS = Limits(vocab=VOCAB, max_batch=4, max_tokens=100, context_length=16)


def planned(**body):
    return protocol.plan(protocol.parse_request({"prompt": "abc", **body}), LIMITS)


def error_of(fn, *args):
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b'"prompt"', b'{"prompt": "a", "temperature": NaN}',
                                 b'{"prompt": "a", "max_tokens": Infinity}', b"\xff\xfe"])
def test_bodies_that_are_not_a_json_object_are_400(raw):
    e = error_of(protocol.parse_body, raw)
    assert e.status == 400 and e.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": ["a", None]}, "prompt"),
    ({"prompt": "a", "max_tokens": "12"}, "max_tokens"),
    ({"prompt": "a", "n": True}, "n"),
    ({"prompt": "a", "n": 1.5}, "n"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "logit_bias": {"a": "x"}}, "logit_bias.a"),
    ({"prompt": "a", "max_token": 5}, "max_token"),  # a typo is an unknown field, not silently ignored
    ({"prompt": "a", "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
])
def test_schema_errors_are_422_naming_the_field(body, param):
    e = error_of(protocol.parse_request, body)
    assert e.status == 422 and e.param == param
    assert e.message.startswith(f"{param}: ")
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "abZ"}, "prompt", "'Z'"),
    ({"prompt": ["ab", "Zq"]}, "prompt.1", "'Z', 'q'"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": "a" * 101, "echo": True, "logprobs": 0}, "prompt", "at most 100 characters"),
    ({"max_tokens": 0}, "max_tokens", "[1, 100]"),
    ({"max_tokens": 101}, "max_tokens", "[1, 100]"),
    ({"n": 5}, "n", "4 slots"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "n", "6 choices"),
    ({"top_p": 0.0}, "top_p", "(0.0, 1.0]"),
    ({"top_p": 1.01}, "top_p", "(0.0, 1.0]"),
    ({"temperature": -0.1}, "temperature", "[0.0"),
    ({"top_k": 0}, "top_k", "[1"),
    ({"min_p": 1.5}, "min_p", "[0.0, 1.0]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "(0.0"),
    ({"logprobs": 6}, "logprobs", "[0, 5]"),
    ({"seed": -1}, "seed", "[0, "),
    ({"seed": 2**32}, "seed", "[0, "),
    ({"mode": "fast"}, "mode", "'fast'"),
    ({"stride": 4}, "stride", "'strided' only"),
    ({"mode": "strided", "stride": 17}, "stride", "[1, 16]"),
    ({"stop": ["a", ""]}, "stop", "1..32 characters, got 0"),
    ({"stop": "a" * 33}, "stop", "1..32 characters, got 33"),
    ({"stop": "Z"}, "stop", "'Z'"),
    ({"stop": ["a"] * 5}, "stop", "at most 4"),
    ({"logit_bias": {"ab": 1.0}}, "logit_bias", "single characters"),
    ({"logit_bias": {"Z": 1.0}}, "logit_bias", "'Z'"),
    ({"logit_bias": {"a": 101.0}}, "logit_bias", "[-100.0, 100.0]"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
])
def test_values_out_of_range_are_400_naming_the_field(body, param, words):
    with pytest.raises(APIError) as info:
        planned(**body)
    e = info.value
    assert e.status == 400 and e.param == param, (e.status, e.param, e.message)
    assert words in e.message and e.message.startswith(param)


def test_unknown_model_is_404():
    e = error_of(lambda: planned(model="gpt-4"))
    assert e.status == 404 and e.param == "model" and e.code == "model_not_found"
    assert planned(model="jaxgpt").prompts == ("abc",)


def test_rows_repeat_each_prompt_n_times_in_order_and_keep_the_seed():
    p = planned(prompt=["ab", "c"], n=2, seed=7, max_tokens=9, stop="ba", logprobs=0)
    assert p.prompts == ("ab", "ab", "c", "c") and p.rows == 4 and p.n == 2
    assert p.seed == 7 and p.max_chars == 9
    assert p.options["stop"] == ("ba",)
    assert p.options["logprobs"] == 1 and p.logprobs == 0  # the sampled character's logprob, no alternatives
    assert protocol.usage(p, 10) == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}


def test_a_request_without_seed_gets_one_and_defaults_are_neutral():
    seeds = {planned().seed for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
    o = planned().options
    assert o == dict(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                     logit_bias=None, stop=(), logprobs=None, mode="exact", stride=None)


def test_logit_bias_of_minus_100_bans():
    assert planned(logit_bias={"a": -100, "b": 2.5}).options["logit_bias"] == {"a": -math.inf, "b": 2.5}


def test_logprobs_block_and_sse_wire_format():
    block = protocol.logprobs_block("ab", [None, -0.5], [None, {"a": -0.25, "b": float("-inf")}], 3, 2)
    assert block == {"tokens": ["a", "b"], "token_logprobs": [None, -0.5],
                     "top_logprobs": [None, {"a": -0.25, "b": None}], "text_offset": [3, 4]}
    assert protocol.logprobs_block("a", [-1.0], None, 0, 0)["top_logprobs"] is None
    assert protocol.sse("[DONE]") == b"data: [DONE]\n\n"
    event = protocol.sse({"x": [1, "é"]})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and json.loads(event[6:]) == {"x": [1, "é"]}


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.gauge("slots_busy", "busy", lambda: 3)
    m.inc("requests_total", status="200")
    m.inc("requests_total", status="200")
    m.inc("requests_total", status='4"0')
    m.observe("queue_seconds", 0.003)
    m.observe("queue_seconds", 100.0)
    text = m.render()
    assert 'jaxgpt_requests_total{status="200"} 2\n' in text
    assert 'jaxgpt_requests_total{status="4\\"0"} 1\n' in text
    assert 'jaxgpt_queue_seconds_bucket{le="0.005"} 1\n' in text
    assert 'jaxgpt_queue_seconds_bucket{le="60.0"} 1\n' in text
    assert 'jaxgpt_queue_seconds_bucket{le="+Inf"} 2\n' in text
    assert "jaxgpt_queue_seconds_count 2\n" in text and "jaxgpt_queue_seconds_sum 100.003\n" in text
    assert "# TYPE jaxgpt_slots_busy gauge\njaxgpt_slots_busy 3\n" in text
    assert m.value("requests_total", status="200") == 2
