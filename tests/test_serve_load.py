"""The bounded load-and-fault test: a few hundred requests from 64 concurrent clients on 127.0.0.1.

Valid requests (plain and streamed, many options), invalid ones and clients that leave mid-answer
all at once; it ends by itself (every client has a fixed list of requests and timeouts).
Afterwards every valid answer equals its offline `jaxgpt.complete(..., slots=M)`, no slot is
busy, nothing is queued, and memory is back where it started.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random

import httpx
import jax

from jaxgpt import engine

from tests.serve_helpers import SLOTS, assert_choice_equals, offline, running_server, small_model

CLIENTS = 64
REQUESTS = 240
OPTIONS = [{}, {"temperature": 0.6}, {"top_k": 5}, {"top_p": 0.8, "stop": ["e"]}, {"mode": "strided", "stride": 4},
           {"min_p": 0.1, "logprobs": 2}, {"repetition_penalty": 1.2, "logit_bias": {"a": -100}}, {"logprobs": 0}]
INVALID = [{"prompt": "a", "top_p": 0}, {"prompt": "\u4e2d"}, {"prompt": "a", "max_tokens": 0}, {"prompt": 5},
           {"prompt": "a", "n": SLOTS + 1}, {"prompt": "a", "mode": "turbo"}, {"prompt": "a", "stop": [""]}]


def make_plan(rng: random.Random):
    """(kind, body) for every request: 60% valid plain or streamed, 20% invalid, 20% leaving early."""
    chars = "abcdefghij ROMEO:\n"
    plan = []
    for i in range(REQUESTS):
        roll = rng.random()
        if roll < 0.2:
            plan.append(("invalid", rng.choice(INVALID)))
            continue
        body = {"prompt": "".join(rng.choice(chars) for _ in range(rng.randrange(0, 40))),
                "max_tokens": rng.randrange(1, 60), "seed": rng.randrange(2**32), **rng.choice(OPTIONS)}
        if rng.random() < 0.15:
            body["n"] = rng.randrange(2, SLOTS + 1)
        if roll < 0.4:  # long, no stop string: the client leaves before the end
            body = {k: v for k, v in body.items() if k != "stop"}
            plan.append(("leave", {**body, "max_tokens": 100_000, "stream": rng.random() < 0.5}))
        else:
            plan.append(("valid", {**body, "stream": rng.random() < 0.4}))
    return plan


async def run_one(client: httpx.AsyncClient, kind: str, body: dict):
    """Sends one request; returns its answer in the non-streaming shape (or the error status)."""
    for _ in range(200):  # a full queue answers 429: wait and retry, as a client should
        if body.get("stream"):
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers["retry-after"]) / 20)
                    continue
                if r.status_code != 200:
                    return r.status_code
                texts, finish, lps = {}, {}, {}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for c in json.loads(line[6:])["choices"]:
                        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                        finish[c["index"]] = c["finish_reason"]
                        lps.setdefault(c["index"], []).append(c["logprobs"])
                    if kind == "leave":
                        return "left"
                return {"choices": [{"text": texts[i], "finish_reason": finish[i],
                                     "logprobs": _joined(lps[i])} for i in sorted(texts)]}
        try:
            r = await client.post("/v1/completions", json=body, timeout=0.3 if kind == "leave" else 60)
        except httpx.TimeoutException:
            assert kind == "leave"
            return "left"
        if r.status_code == 429:
            await asyncio.sleep(float(r.headers["retry-after"]) / 20)
            continue
        return r.json() if r.status_code == 200 else r.status_code
    raise AssertionError("the queue stayed full")


def _joined(blocks):
    if blocks[0] is None:
        return None
    return {"tokens": sum((b["tokens"] for b in blocks), []),
            "token_logprobs": sum((b["token_logprobs"] for b in blocks), []),
            "top_logprobs": None if blocks[0]["top_logprobs"] is None else sum((b["top_logprobs"] for b in blocks), []),
            "text_offset": sum((b["text_offset"] for b in blocks), [])}


async def load(url: str, plan):
    queue = list(enumerate(plan))
    results = {}

    async def client_loop():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while queue:
                i, (kind, body) = queue.pop()
                results[i] = await run_one(client, kind, body)

    await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), timeout=240)
    return results


def settled_memory():
    """(resident bytes, live JAX arrays) after a garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE"), len(jax.live_arrays())


def test_load_with_faults_keeps_every_answer_exact_and_frees_everything():
    model = small_model(seed=9)
    with running_server(model, max_batch=SLOTS, max_queue=32, max_tokens=100_000) as (server, app):
        asyncio.run(load(server.url, make_plan(random.Random(1))[:120]))  # first use: caches, pools, heap
        rss_before, arrays_before = settled_memory()
        plan = make_plan(random.Random(2))
        results = asyncio.run(load(server.url, plan))
        rss_after, arrays_after = settled_memory()
        health = httpx.get(server.url + "/health").json()
        metrics = app.state.metrics

    assert len(results) == REQUESTS
    kinds = [kind for kind, _ in plan]
    assert kinds.count("valid") > 100 and kinds.count("invalid") > 25 and kinds.count("leave") > 25
    for i, (kind, body) in enumerate(plan):
        if kind == "invalid":
            assert results[i] in (400, 422), (body, results[i])
        elif kind == "leave":
            assert results[i] == "left"
    valid = [(body, results[i]) for i, (kind, body) in enumerate(plan) if kind == "valid"]
    for body, answer in valid:
        expected = offline(model, body, body["seed"])
        assert len(answer["choices"]) == len(expected)
        for c, e in zip(answer["choices"], expected):
            assert_choice_equals(c, e, body, label=json.dumps(body))
    assert health["slots"]["busy"] == 0 and health["queue"]["rows"] == 0
    assert metrics.value("errors_total", kind="500") == 0
    assert metrics.value("cancelled_total") >= 1
    # No engine array outlives its request: a leak would grow with the 240 requests; one set of
    # slots may come and go with the engine's own state (slots lent to the Sampler, a rebuilt engine).
    one_state = len(jax.tree.leaves(engine.empty_slots(model.config, SLOTS, jax.numpy.float32)))
    assert arrays_after <= arrays_before + one_state + 8, (arrays_before, arrays_after, one_state)
    assert rss_after - rss_before < 16 << 20, (rss_before, rss_after)
