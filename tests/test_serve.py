"""`jaxgpt serve` over real HTTP on 127.0.0.1: seed-exact answers, streaming, auth, limits, faults.

One server (a small random-weight model, SLOTS slots) serves the whole module; every answer is
checked against `jaxgpt.complete(..., slots=SLOTS)` run offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import httpx
import numpy as np
import pytest

from tests.serve_helpers import KEY, SLOTS, VOCAB, assert_choice_equals, offline, running_server, small_model

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def served(model):
    with running_server(model, max_batch=SLOTS, max_queue=3 * SLOTS, max_tokens=100_000, api_key=KEY) as (server, app):
        yield server, app


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as c:
        yield c


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def health(client):
    return client.get("/health").json()


def read_events(response):
    """The `data:` payloads of a server-sent event stream, JSON-decoded except [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


REQUESTS = [
    {"prompt": "ROMEO:", "max_tokens": 40, "seed": 11},
    {"prompt": "", "max_tokens": 25, "seed": 3, "n": 3, "temperature": 0.7, "logprobs": 3},
    {"prompt": "a" * 30, "max_tokens": 50, "seed": 5, "mode": "strided", "stride": 5, "top_k": 7},
    {"prompt": "the ", "max_tokens": 60, "seed": 2, "stop": ["e", "th"], "top_p": 0.9, "logprobs": 0},
    {"prompt": ["To be", "x"], "max_tokens": 20, "seed": 9, "n": 2, "min_p": 0.05, "repetition_penalty": 1.3,
     "logit_bias": {"e": -100, "a": 2.0}},
]


def test_answers_equal_offline_complete_while_other_requests_run(client, model, served):
    """The determinism contract: choice i == row i of complete([prompt] * n, seed=S, slots=M)."""
    results = [None] * len(REQUESTS)

    def send(i):
        results[i] = client.post("/v1/completions", json=REQUESTS[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, response in zip(REQUESTS, results):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "text_completion" and answer["id"].startswith("cmpl-")
        assert answer["model"] == "jaxgpt" and answer["seed"] == body["seed"]
        expected = offline(model, body, body["seed"])
        assert [c["index"] for c in answer["choices"]] == list(range(len(expected)))
        for c, e in zip(answer["choices"], expected):
            assert_choice_equals(c, e, body, label=json.dumps(body))
        generated = sum(len(e.text) for e in expected)
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        assert answer["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": generated,
                                   "total_tokens": sum(map(len, prompts)) + generated}
    assert health(client)["slots"]["busy"] == 0


def test_a_request_without_seed_reports_the_one_that_reproduces_it(client, model):
    answer = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 20}).json()
    again = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 20, "seed": answer["seed"]}).json()
    assert again["choices"][0]["text"] == answer["choices"][0]["text"]
    assert answer["choices"][0]["text"] == offline(model, {"prompt": "ab", "max_tokens": 20}, answer["seed"])[0].text


def test_streaming_sends_chunks_that_add_up_to_the_answer(client):
    body = {"prompt": "Hi", "max_tokens": 80, "seed": 4, "n": 2, "logprobs": 1}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True, "echo": False,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []
    chunks = events[:-2]
    assert len(chunks) > 4  # several chunks per choice, not one at the end
    for i, want in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine][-1] == want["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        assert sum((c["logprobs"]["token_logprobs"] for c in mine), []) == want["logprobs"]["token_logprobs"]
        assert sum((c["logprobs"]["text_offset"] for c in mine), []) == want["logprobs"]["text_offset"]
        assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_echo_prepends_the_prompt(client):
    body = {"prompt": ["ab", "c"], "max_tokens": 5, "seed": 1, "echo": True}
    plain = client.post("/v1/completions", json={**body, "echo": False}).json()["choices"]
    echoed = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["text"] for c in echoed] == ["ab" + plain[0]["text"], "c" + plain[1]["text"]]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        first = read_events(r)[0]
    assert [c["text"] for c in first["choices"]] == ["ab", "c"]


def test_echo_with_logprobs_scores_the_prompt_with_jaxgpt_score(client, model):
    score = pytest.importorskip("jaxgpt.score")
    body = {"prompt": "ROMEO", "max_tokens": 6, "seed": 2, "echo": True, "logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    generated = offline(model, body, 2)[0]
    assert choice["text"] == "ROMEO" + generated.text
    lp = choice["logprobs"]
    scored = score.score_details(model, "ROMEO", vocab=VOCAB, top=2)
    np.testing.assert_array_equal(np.float32(lp["token_logprobs"][:5]), scored.logprobs)
    np.testing.assert_array_equal(np.float32(lp["token_logprobs"][5:]), generated.logprobs)
    assert [list(t) for t in lp["top_logprobs"][:5]] == [[VOCAB.chars[i] for i in ids] for ids in scored.top_ids]
    assert lp["top_logprobs"][5:] == generated.top_logprobs
    assert lp["text_offset"] == list(range(len(choice["text"])))


def test_the_openai_client_works_unchanged(served, model):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in api.models.list().data] == ["jaxgpt"]
    body = {"prompt": "KING:", "max_tokens": 30, "seed": 8, "temperature": 0.9, "stop": ["\n"]}
    answer = api.completions.create(model="jaxgpt", **body)
    assert answer.choices[0].text == offline(model, body, 8)[0].text
    streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(model="jaxgpt", stream=True, **body))
    assert streamed == answer.choices[0].text
    extra = api.completions.create(model="jaxgpt", prompt="KING:", max_tokens=30, seed=8, extra_body={"top_k": 3})
    assert extra.choices[0].text == offline(model, {"prompt": "KING:", "max_tokens": 30, "top_k": 3}, 8)[0].text
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model="jaxgpt", prompt="x", max_tokens=0)
    error = info.value.body.get("error", info.value.body)
    assert error["param"] == "max_tokens"


def test_auth_every_route_but_health_needs_the_key(served):
    url = served[0].url
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + path, headers=AUTH).status_code == 200
    r = httpx.post(url + "/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_bad_requests_never_reach_the_engine(client, served):
    app = served[1]
    steps = app.state.scheduler.steps
    cases = [(b'{"prompt": "a", ', 400, None), (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
             (b'{"prompt": "\\u4e2d"}', 400, "prompt"), (b'{"prompt": "a", "n": 5}', 400, "n"),
             (b'{"prompt": "a", "mode": "fast"}', 400, "mode"), (b'{"prompt": 1}', 422, "prompt"),
             (b'{"prompt": "a", "model": "gpt-4"}', 404, "model"),
             (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, None)]
    for raw, status, param in cases:
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (raw[:40], r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    chunked = client.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * (1 << 20), b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    assert app.state.scheduler.steps == steps
    assert client.get("/nowhere").json()["error"]["message"] == "Not Found"


def test_a_new_request_joins_a_running_batch_at_the_next_chunk(client, model):
    with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 90_000, "stream": True}) as r:
        lines = r.iter_lines()  # kept: a closed iterator would close the stream
        next(line for line in lines if line.startswith("data: "))
        short = {"prompt": "bc", "max_tokens": 40, "seed": 3}
        answer = client.post("/v1/completions", json=short).json()
        # The long one still runs: the short one did not wait for it. Its own slot is freed by the
        # scheduler thread, which may be a moment behind the HTTP answer: wait for it (bounded).
        deadline = time.monotonic() + 5
        while health(client)["slots"]["busy"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(client)["slots"]["busy"] == 1
    assert answer["choices"][0]["text"] == offline(model, short, 3)[0].text


def test_chunks_start_at_one_step_when_requests_join_and_double_back(client, model, served, monkeypatch):
    """The step-size policy: a new row's first characters come after one step, then chunks grow to the cap."""
    scheduler = served[1].state.scheduler
    wait_until(lambda: health(client)["slots"]["busy"] == 0)  # idle: the first chunk recorded is the first one
    steps = []  # max_steps of every Batcher.step, in order
    real = scheduler.batcher.step
    monkeypatch.setattr(scheduler.batcher, "step", lambda k=None: (steps.append(k), real(k))[1])
    with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 90_000, "stream": True,
                                                        "seed": 4}) as r:
        lines = r.iter_lines()  # kept until the with block closes the stream
        next(line for line in lines if line.startswith("data: "))
        wait_until(lambda: len(steps) >= 6)
        joined = len(steps)
        short = {"prompt": "bc", "max_tokens": 30, "seed": 8}
        answer = client.post("/v1/completions", json=short).json()
    cap = scheduler.chunk
    assert cap == 8 and steps[:4] == [1, 2, 4, 8]
    assert 1 in steps[joined:]  # the short request's admission restarted the ramp
    for before, after in zip(steps, steps[1:]):
        assert after == 1 or after == min(2 * before, cap), steps
    assert answer["choices"][0]["text"] == offline(model, short, 8)[0].text


def test_a_disconnected_stream_frees_its_slot_within_one_chunk(client, served, monkeypatch):
    scheduler = served[1].state.scheduler
    seen = {}  # Scheduler.steps when the server learnt of the disconnect, and when the engine freed the slot
    for name, obj in (("told", scheduler), ("freed", scheduler.batcher)):
        real = obj.cancel
        monkeypatch.setattr(obj, "cancel", lambda *a, real=real, name=name: (seen.setdefault(name, scheduler.steps),
                                                                              real(*a))[1])
    with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 90_000, "stream": True,
                                                        "seed": 1}) as r:
        lines = r.iter_lines()  # kept until the with block closes the stream
        next(line for line in lines if line.startswith("data: "))
        assert health(client)["slots"]["busy"] == 1
    wait_until(lambda: health(client)["slots"]["busy"] == 0)
    assert seen["freed"] - seen["told"] <= 1  # at most the chunk in progress when the client left
    assert served[1].state.metrics.value("cancelled_total") >= 1


def test_a_disconnected_plain_request_frees_its_slot(client, served):
    async def leave_early():
        async with httpx.AsyncClient(base_url=served[0].url, headers=AUTH) as c:
            with pytest.raises(httpx.TimeoutException):
                await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 90_000}, timeout=0.5)

    asyncio.run(leave_early())
    wait_until(lambda: health(client)["slots"]["busy"] == 0)


def test_a_full_queue_answers_429_and_recovers(client, served):
    long = {"prompt": "a", "max_tokens": 90_000, "stream": True, "n": SLOTS}
    with contextlib.ExitStack() as streams:
        def open_stream():
            response = streams.enter_context(client.stream("POST", "/v1/completions", json=long))
            assert response.status_code == 200

        open_stream()
        wait_until(lambda: health(client)["slots"]["busy"] == SLOTS)
        for _ in range(3):
            open_stream()  # 4 rows running, 12 queued: max_queue
        assert health(client)["queue"]["rows"] == 3 * SLOTS
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    wait_until(lambda: health(client)["slots"]["busy"] == 0 and health(client)["queue"]["rows"] == 0)
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}).status_code == 200


def test_an_exception_in_one_request_is_500_and_the_others_go_on(client, served, model, monkeypatch):
    scheduler = served[1].state.scheduler
    batcher = scheduler.batcher
    real_add = batcher.add

    def add(prompt, *args, **kwargs):
        if prompt == "boom":
            raise RuntimeError("injected fault")
        return real_add(prompt, *args, **kwargs)

    monkeypatch.setattr(batcher, "add", add)
    good = {"prompt": "fine", "max_tokens": 30, "seed": 6}
    results = {}
    threads = [threading.Thread(target=lambda b=b: results.__setitem__(b["prompt"], client.post("/v1/completions", json=b)))
               for b in (good, {"prompt": "boom", "max_tokens": 30})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["boom"].status_code == 500
    assert "injected fault" in results["boom"].json()["error"]["message"]
    assert results["fine"].status_code == 200
    assert results["fine"].json()["choices"][0]["text"] == offline(model, good, 6)[0].text


def test_a_failed_step_ends_its_requests_and_the_engine_is_rebuilt(client, served, model):
    scheduler = served[1].state.scheduler
    broken = scheduler.batcher

    def step(*args, **kwargs):
        raise RuntimeError("injected step fault")

    broken.step = step
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10})
    assert r.status_code == 500 and "injected step fault" in r.json()["error"]["message"]
    assert scheduler.batcher is not broken
    good = {"prompt": "after", "max_tokens": 30, "seed": 12}
    assert client.post("/v1/completions", json=good).json()["choices"][0]["text"] == offline(model, good, 12)[0].text
    assert health(client)["slots"]["busy"] == 0


def test_metrics_count_requests_and_characters(client):
    before = client.get("/metrics").text
    client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 7, "seed": 1})
    text = client.get("/metrics").text
    assert text.startswith("# HELP") and "# TYPE jaxgpt_queue_seconds histogram" in text

    def value(text, name):
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        return float(line.split()[-1])

    assert value(text, 'jaxgpt_requests_total{status="200"}') == value(before, 'jaxgpt_requests_total{status="200"}') + 1
    assert value(text, "jaxgpt_generated_characters_total") >= value(before, "jaxgpt_generated_characters_total") + 1
    assert value(text, "jaxgpt_slots_total") == SLOTS
