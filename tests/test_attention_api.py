"""`POST /v1/attention` of `jaxgpt serve`: the query's row of `GPT.attention_weights`, and a
precise 4xx error for every bad request."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jaxgpt.config import GPTConfig
from jaxgpt.serving.app import create_app
from jaxgpt.vocab import default_vocab
from tests.web_helpers import random_model

CONFIG = GPTConfig(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3, variant="learning")
VOCAB = default_vocab()


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, 21)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, vocab=VOCAB, max_batch=2, warm_up=False)) as client:
        yield client


@pytest.mark.parametrize("text,query", [("ROMEO: But soft", None), ("ROMEO: But soft", 4), ("a", None),
                                        ("x" * 16, 15)])
def test_the_row_of_the_query(client, model, text, query):
    response = client.post("/v1/attention", json={"text": text} if query is None else {"text": text, "query": query})
    assert response.status_code == 200, response.text
    body = response.json()
    q = len(text) - 1 if query is None else query
    assert (body["object"], body["tokens"], body["query"]) == ("attention", list(text), q)
    assert (body["num_blocks"], body["num_heads"]) == (2, 3)
    expected = np.asarray(model.attention_weights(VOCAB.encode(text)[None]))[:, 0, :, q, : q + 1]  # (N, H, q + 1)
    got = np.asarray(body["weights"])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # padding after the query changes nothing
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("body,status,param,message", [
    ({"text": ""}, 400, "text", "must have 1..16 characters"),
    ({"text": "a" * 17}, 400, "text", "got 17"),
    ({"text": "a\u4e2d"}, 400, "text", "not in the model's vocabulary: '\u4e2d'"),
    ({"text": "abc", "query": 3}, 400, "query", "must be in [0, 2]"),
    ({"text": "abc", "query": -1}, 400, "query", "must be in [0, 2]"),
    ({"text": "abc", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"text": 5}, 422, "text", "text:"),
    ({"text": "abc", "query": "1"}, 422, "query", "query:"),
    ({"text": "abc", "rows": "all"}, 422, "rows", "unknown field"),
    ({}, 422, "text", "text:"),
])
def test_bad_requests_name_the_field(client, body, status, param, message):
    response = client.post("/v1/attention", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_a_body_that_is_not_json_is_400(client):
    response = client.post("/v1/attention", content=b"{text", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_the_api_key_guards_it(model):
    app = create_app(model, vocab=VOCAB, max_batch=2, warm_up=False, api_key="k3y")
    with TestClient(app) as client:
        assert client.post("/v1/attention", json={"text": "ab"}).status_code == 401
        ok = client.post("/v1/attention", json={"text": "ab"}, headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and len(ok.json()["weights"][0][0]) == 2
