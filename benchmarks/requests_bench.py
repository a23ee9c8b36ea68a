"""Independent requests: a ragged batch through `jaxgpt.complete` against the same requests one by one.

  ragged    32 requests (prompt lengths 1-100 from the corpus, max_chars 20-200, per-row
            temperature / top-k / top-p / min-p / repetition penalty, a third with a stop
            string), all in one `complete` call, against the same 32 `complete` calls one
            after another (each row's text is the same either way: checked on the warm-up).
  logprobs  batch 1, 200 characters from the seed token: logprobs=5 against logprobs=0.

`python -m benchmarks --only requests` runs it inside the suite.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import interleave, make_result, paired_ratio

REQUESTS = 32


def ragged_requests(vocab, text: str, count: int = REQUESTS, seed: int = 0) -> list[dict]:
    """`count` request dicts (prompt, max_chars and options), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(count):
        length = int(rng.integers(1, 101))
        start = int(rng.integers(0, len(text) - length))
        request = dict(prompt=text[start : start + length], max_chars=int(rng.integers(20, 201)),
                       temperature=float(rng.choice([0.0, 0.7, 1.0])), top_k=[None, 20][r % 2],
                       top_p=[None, 0.9, 0.95][r % 3], min_p=[None, 0.05][r % 4 == 0],
                       repetition_penalty=[None, 1.2][r % 5 == 0], stop=[" the"] if r % 3 == 0 else None,
                       seed=r)
        out.append(request)
    return out


def _complete_all(sampler, requests):
    import jaxgpt

    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    return jaxgpt.complete(sampler, [q["prompt"] for q in requests], [q["max_chars"] for q in requests],
                           stop=[q["stop"] for q in requests], **{k: [q[k] for q in requests] for k in keys})


def run(models, suite, limits=None, progress=None) -> tuple[list[dict], dict]:
    """Times the ragged batch and the logprobs cost; returns (result rows, ratios)."""
    import jaxgpt
    from benchmarks.beam_score import _text

    sampler = jaxgpt.Sampler(models.jax)
    vocab = jaxgpt.default_vocab()
    requests = ragged_requests(vocab, _text(20_000, vocab))
    chars = {}

    def batched(warm):
        begin = time.perf_counter()
        done = _complete_all(sampler, requests)
        seconds = time.perf_counter() - begin
        chars["batched"] = [c.text for c in done]
        return {"seconds": seconds, "chars": float(sum(len(c.text) for c in done))}

    def one_by_one(warm):
        begin = time.perf_counter()
        done = [_complete_all(sampler, [q])[0] for q in requests]
        seconds = time.perf_counter() - begin
        chars["alone"] = [c.text for c in done]
        return {"seconds": seconds, "chars": float(sum(len(c.text) for c in done))}

    def logprobs(n):
        def case(warm):
            begin = time.perf_counter()
            jaxgpt.complete(sampler, "", 200, seed=1, logprobs=n)
            return {"seconds": time.perf_counter() - begin}
        return case

    measured = interleave({"batched": batched, "one_by_one": one_by_one, "logprobs_0": logprobs(0),
                           "logprobs_5": logprobs(5)}, suite.reps, progress=progress)
    if chars["batched"] != chars["alone"]:
        raise AssertionError("a ragged batch's texts differ from the same requests run one by one")
    produced = int(measured["batched"].runs[0]["chars"])
    rows = [
        make_result(f"{REQUESTS} ragged requests, one complete() call", "jax", "jaxgpt complete", REQUESTS,
                    produced // REQUESTS, measured["batched"]),
        make_result(f"{REQUESTS} ragged requests, one by one", "jax", "jaxgpt complete", 1, produced,
                    measured["one_by_one"]),
        make_result("200 chars, logprobs=0", "jax", "jaxgpt complete", 1, 200, measured["logprobs_0"]),
        make_result("200 chars, logprobs=5", "jax", "jaxgpt complete", 1, 200, measured["logprobs_5"]),
    ]
    ratios = {
        f"ragged_{REQUESTS}_batched_vs_one_by_one": dict(
            paired_ratio(measured["one_by_one"].runs, measured["batched"].runs),
            what=f"{REQUESTS} ragged requests: one by one / one complete() call (target >= 6x)"),
        "logprobs5_vs_logprobs0": dict(
            paired_ratio(measured["logprobs_0"].runs, measured["logprobs_5"].runs),
            what="batch 1, 200 chars: logprobs=0 time / logprobs=5 time (target >= 0.91, i.e. <= 10% cost)"),
    }
    return rows, ratios
