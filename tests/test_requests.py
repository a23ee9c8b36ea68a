"""Independent requests: ragged prompts, per-row options, slots, stop strings, log-probabilities.

A small random-weight model with the published 104-character vocabulary and C = 16, so that
prompts, window slides and strided refills are all crossed in a few dozen steps; the torch side
is the notebook's loop (`porting.torch_reference.inverse_cdf_generate`) fed the same uniforms.
"""

from __future__ import annotations

import numpy as np
import pytest

import jaxgpt
from jaxgpt import Options, complete, engine, stream_completions
from jaxgpt.batching import Batcher
from jaxgpt.sampling import sampling_uniforms

torch = pytest.importorskip("torch")

from porting import load_weights  # noqa: E402
from porting.torch_reference import inverse_cdf_generate  # noqa: E402
from tests.porting_helpers import random_reference  # noqa: E402

SMALL = dict(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
C = SMALL["context_length"]
VOCAB = jaxgpt.default_vocab()
PROMPTS = ["", "a", "ROMEO:", "To be, or not to be", "x" * (C - 1), "The quick brown fox jumps over it"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = random_reference("drake", seed=4, **SMALL)
    path = tmp_path_factory.mktemp("requests") / "weights.pt"
    torch.save(ref.state_dict(), path)
    return ref, jaxgpt.Sampler(load_weights(path))


def torch_row(ref, prompt: str, num_new: int, seed: int, stream: int, **options):
    """Tokens (and log-probabilities) of the notebook's loop for one prompt with its own uniforms."""
    ids = VOCAB.encode(prompt) if prompt else np.zeros(1, np.int32)
    u = sampling_uniforms(seed, 1, num_new, streams=[stream])
    bias = options.pop("logit_bias", None)
    if bias is not None:
        row = torch.zeros(SMALL["vocab_size"])
        for char, b in bias.items():
            row[int(VOCAB.encode(char)[0])] = b
        bias = row
    torch.set_num_threads(1)
    tokens, lps = inverse_cdf_generate(ref, torch.from_numpy(ids[None].astype(np.int64)), torch.from_numpy(u), C,
                                       logit_bias=bias, logprobs=True, **options)
    return tokens[0].numpy(), lps[0].numpy()


def test_ragged_greedy_batch_equals_the_notebook_loop_per_prompt(pair):
    ref, sampler = pair
    n = 2 * C + 20  # past the window slide for every prompt
    got = complete(sampler, PROMPTS, n, temperature=0.0)
    for prompt, c in zip(PROMPTS, got):
        want, _ = torch_row(ref, prompt, n, 0, 0, temperature=0.0)
        np.testing.assert_array_equal(c.tokens, want, err_msg=repr(prompt))
        assert c.text == VOCAB.decode(want) and c.finish_reason == "length" and c.logprobs is None


def test_ragged_sampled_rows_with_their_own_options_equal_torch(pair):
    """Per-row options and seeds in one ragged batch, each row against its own torch loop."""
    ref, sampler = pair
    rows = [dict(temperature=0.8, top_k=20, top_p=0.9), dict(), dict(min_p=0.05, temperature=1.2),
            dict(repetition_penalty=1.3), dict(logit_bias={"e": -2.0, " ": float("-inf")}), dict(temperature=0.0)]
    seeds = [11, 12, 13, 14, 15, 16]
    lengths = [C + 40, 10, C + 3, 2 * C + 7, C, 5]
    got = complete(sampler, PROMPTS, lengths, seed=seeds, logprobs=3,
                   **{k: [r.get(k, Options.__dataclass_fields__[k].default) for r in rows]
                      for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "logit_bias")})
    for prompt, c, row, seed, n in zip(PROMPTS, got, rows, seeds, lengths):
        want, lps = torch_row(ref, prompt, n, seed, 0, **dict(row))
        np.testing.assert_array_equal(c.tokens, want, err_msg=f"{prompt!r} {row}")
        chosen = lps[np.arange(n), want]
        np.testing.assert_allclose(c.logprobs, chosen, rtol=0, atol=1e-5 * max(1.0, np.abs(chosen).max()))
        top3 = np.argsort(-lps, axis=1, kind="stable")[:, :3]
        for step, alternatives in enumerate(c.top_logprobs):
            assert list(alternatives) == [VOCAB.chars[i] for i in top3[step]], (prompt, step)
            np.testing.assert_allclose(list(alternatives.values()), lps[step, top3[step]], atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "strided"])
def test_a_row_alone_equals_the_row_in_any_batch_with_the_same_slots(pair, mode):
    """Bit for bit: logprobs (floats) too, whatever the other rows, their number and the slot."""
    _, sampler = pair
    kw = dict(seed=[7, 8, 9, 10, 11, 12], temperature=[0.9, 0.0, 1.1, 0.7, 1.0, 1.0], top_p=0.95, mode=mode,
              logprobs=2, slots=8)
    batch = complete(sampler, PROMPTS, 2 * C + 9, **kw)
    for r in (0, 3, 5):
        alone = complete(sampler, PROMPTS[r], 2 * C + 9, **{k: (v[r] if isinstance(v, list) else v) for k, v in kw.items()})[0]
        np.testing.assert_array_equal(alone.tokens, batch[r].tokens)
        np.testing.assert_array_equal(alone.logprobs, batch[r].logprobs)  # same bits, not just close
    # Reversed order puts every row in another slot; more prompts than slots queue for free ones.
    reordered = complete(sampler, PROMPTS[::-1], 2 * C + 9, **{k: (v[::-1] if isinstance(v, list) else v)
                                                               for k, v in kw.items()})
    for a, b in zip(batch, reordered[::-1]):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
    queued = complete(sampler, PROMPTS * 2, 2 * C + 9, **{k: (v * 2 if isinstance(v, list) else v)
                                                          for k, v in dict(kw, slots=4).items()})
    small = complete(sampler, PROMPTS, 2 * C + 9, **dict(kw, slots=4))
    for a, b in zip(queued, small * 2):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


@pytest.fixture(scope="module")
def wide_sampler(tmp_path_factory):
    """The small model with C = 48: a decode step of 8 or more rows reads its cache in 3 blocks."""
    ref = random_reference("drake", seed=6, **dict(SMALL, context_length=48))
    path = tmp_path_factory.mktemp("requests_wide") / "weights.pt"
    torch.save(ref.state_dict(), path)
    return jaxgpt.Sampler(load_weights(path))


@pytest.mark.parametrize("mode", ["exact", "strided"])
def test_rows_alone_equal_rows_in_a_batch_across_cache_blocks(wide_sampler, mode):
    """At 8 slots the decode attention reads only the cache blocks the furthest row needs: ragged
    rows (positions in different blocks, past the window slide) and a batch whose rows all start
    at position 0 (no block read at the first step) give each row the bits it gets alone."""
    from jaxgpt import model as model_module

    assert model_module.decodes_in_blocks(8, 48)
    c = 48
    prompts = ["", "a", "x" * 17, "To be, or not to be: that is the question", "y" * (c - 1), "z" * (c + 12)]
    kw = dict(seed=[3, 4, 5, 6, 7, 8], temperature=[1.0, 0.8, 0.0, 1.1, 0.9, 1.0], mode=mode, logprobs=1, slots=8)
    batch = complete(wide_sampler, prompts, 2 * c + 9, **kw)
    for r in range(len(prompts)):
        alone = complete(wide_sampler, prompts[r], 2 * c + 9,
                         **{k: (v[r] if isinstance(v, list) else v) for k, v in kw.items()})[0]
        np.testing.assert_array_equal(alone.logprobs, batch[r].logprobs)  # same bits, not just close
    fresh = complete(wide_sampler, [""] * 8, 20, seed=list(range(8)), mode=mode, logprobs=1, slots=8)
    for r in (0, 5):
        alone = complete(wide_sampler, "", 20, seed=r, mode=mode, logprobs=1, slots=8)[0]
        np.testing.assert_array_equal(alone.logprobs, fresh[r].logprobs)


def test_stop_strings(pair):
    _, sampler = pair
    free = complete(sampler, "ROMEO:", 3 * C, seed=5, temperature=0.9)[0]
    text = free.text
    # A stop string taken from the stop-free run: the text is that run's prefix before it.
    for start, length in [(0, 1), (0, 3), (7, 4), (C + 2, 5), (3 * C - 2, 2)]:
        stop = text[start : start + length]
        c = complete(sampler, "ROMEO:", 3 * C, seed=5, temperature=0.9, stop=stop)[0]
        first = text.find(stop)
        assert c.text == text[:first] and c.finish_reason == "stop", (stop, first)
        np.testing.assert_array_equal(c.tokens, free.tokens[:first])
    # Overlapping stop strings: the occurrence that completes first wins (the longer one on a tie).
    for stops in ([text[4:8], text[6:7]], [text[4:8], text[7:8]], [text[10:12], text[9:12]]):
        c = complete(sampler, "ROMEO:", 3 * C, seed=5, temperature=0.9, stop=stops)[0]
        end, winner = min((text.find(s) + len(s), -len(s)) for s in stops)
        assert c.text == text[: end + winner] and c.finish_reason == "stop", stops
    # Never reached: finish_reason "length", the whole text.
    never = next(ch for ch in VOCAB.chars if ch not in text)
    c = complete(sampler, "ROMEO:", 3 * C, seed=5, temperature=0.9, stop=never * 2)[0]
    assert c.text == text and c.finish_reason == "length"


def test_stop_strings_split_across_chunks_are_held_back(pair):
    _, sampler = pair
    text = complete(sampler, "To be", 60, seed=2)[0].text
    stop = text[30:34]
    first = text.find(stop)
    for chunk in (1, 2, 3, 31):
        events = list(stream_completions(sampler, "To be", 60, seed=2, stop=stop, chunk_size=chunk))
        streamed = "".join(e.text for e in events)
        assert streamed == text[:first], chunk
        assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
        assert all(stop not in streamed[: i + len(stop)] for i in range(len(streamed)))  # never shown


def test_early_exit_skips_the_remaining_steps(pair, monkeypatch):
    """A batch whose rows have all stopped runs no further steps: count the steps the engine runs."""
    _, sampler = pair
    text = complete(sampler, ["a", "b"], 200, seed=3, temperature=0.0)[0].text
    stop = text[5:7]
    steps = []
    generate = engine.generate

    def counting(graphdef, state, slots, num_steps, until_finish):
        before = np.asarray(slots.done).copy()
        out = generate(graphdef, state, slots, num_steps, until_finish)
        steps.append(int(np.asarray(out[1].valid).any(axis=0).sum()))
        assert np.array_equal(np.asarray(out[0].done) - before, np.asarray(out[1].valid).sum(axis=1))
        return out

    monkeypatch.setattr(engine, "generate", counting)
    got = complete(sampler, ["a", "a"], 200, seed=[3, 3], temperature=0.0, stop=stop)
    assert [c.finish_reason for c in got] == ["stop", "stop"]
    assert sum(steps) == text.find(stop) + len(stop)  # not 200: the loop ended with the rows
    assert len(steps) == 1


def test_a_waiting_request_takes_a_freed_slot_at_once(pair, monkeypatch):
    """With requests queued, an engine call ends at the step a row finishes, not after CHUNK steps."""
    _, sampler = pair
    calls = []
    generate = engine.generate

    def counting(graphdef, state, slots, num_steps, until_finish):
        out = generate(graphdef, state, slots, num_steps, until_finish)
        calls.append((bool(until_finish), int(np.asarray(out[1].valid).any(axis=0).sum())))
        return out

    monkeypatch.setattr(engine, "generate", counting)
    got = complete(sampler, ["a", "b", "c"], [3, 40, 5], seed=2, slots=2)
    assert [len(c.text) for c in got] == [3, 40, 5]
    # Call 1: rows a and b, ends when a finishes after 3 steps (c waits); then b and c together.
    assert calls[0] == (True, 3) and all(not until for until, _ in calls[1:])
    assert sum(steps for _, steps in calls) == 40
    monkeypatch.setattr(engine, "generate", generate)
    again = complete(sampler, ["a", "b", "c"], [3, 40, 5], seed=2, slots=2)
    assert [c.text for c in again] == [c.text for c in got]  # the same output without the spy


def test_stop_at_the_very_first_character(pair):
    _, sampler = pair
    first = complete(sampler, "a", 5, seed=1)[0].text[0]
    c = complete(sampler, "a", 5, seed=1, stop=[first])[0]
    assert c.text == "" and c.finish_reason == "stop" and len(c.tokens) == 0


def test_logprobs_zero_and_top_logprobs(pair):
    _, sampler = pair
    c = complete(sampler, "ROMEO:", 20, seed=1)[0]
    assert c.logprobs is None and c.top_logprobs is None
    c = complete(sampler, "ROMEO:", 20, seed=1, logprobs=5)[0]
    assert c.logprobs.dtype == np.float32 and c.logprobs.shape == (20,)
    assert all(len(d) == 5 for d in c.top_logprobs)
    for lp, d, ch in zip(c.logprobs, c.top_logprobs, c.text):
        values = list(d.values())
        assert values == sorted(values, reverse=True)
        assert lp <= values[0] + 1e-6 and (ch not in d or abs(d[ch] - lp) < 1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=-0.5), "min_p"),
    (dict(stop="\u4e2d"), "outside the vocabulary"),
    (dict(stop=[["a"], ["b"]]), "2 values for 3 prompts"),
    (dict(temperature=[1.0, 0.5]), "2 values for 3 prompts"),
    (dict(seed=[1, 2]), "2 values for 3 prompts"),
    (dict(logit_bias={"\u4e2d": 1.0}), "outside the vocabulary"),
    (dict(logit_bias=[{"a": 1.0}]), "1 values for 3 prompts"),
    (dict(top_p=0.0), "top_p"),
    (dict(mode="fast"), "mode"),
    (dict(stride=3), "stride applies"),
    (dict(mode="strided", stride=C + 1), "stride"),
    (dict(logprobs=30), "logprobs"),
    (dict(slots=0), "slots"),
    (dict(max_chars=0), "max_chars"),
    (dict(max_chars=[5, 5]), "2 values for 3 prompts"),
    (dict(stop="x" * 40), "stop string"),
    (dict(stop=list("abcde")), "at most 4 stop strings"),
    (dict(prompts=["a", "\u4e2d", "b"]), "not in the vocabulary"),
    (dict(seed=-1), "seed"),
    (dict(stop=5), "stop must be"),
    (dict(stop=[5, 6, 7]), "stop must be"),
    (dict(stop=[["a"], 5, None]), "stop must be"),
])
def test_bad_options_raise_before_anything_runs(pair, kw, message, monkeypatch):
    _, sampler = pair
    kw = dict(dict(prompts=["a", "bc", ""], max_chars=5), **kw)

    def ran(*args, **kwargs):
        raise AssertionError("an engine program ran before the options were checked")

    for program in ("prefill", "insert", "generate"):
        monkeypatch.setattr(engine, program, ran)
    with pytest.raises(ValueError, match=message):
        complete(sampler, kw.pop("prompts"), kw.pop("max_chars"), **kw)


def test_new_values_never_recompile(pair):
    _, sampler = pair
    complete(sampler, ["ab", "cde"], 20, slots=4, seed=1)
    before = dict(engine.TRACE_COUNTS)
    for kw in [dict(seed=[4, 5]), dict(temperature=[0.0, 2.0]), dict(top_k=3, top_p=0.5), dict(min_p=0.2),
               dict(repetition_penalty=[1.5, 0.8]), dict(logit_bias={"a": float("-inf")}), dict(stop=["ab", "c"]),
               dict(logprobs=4), dict(mode=["strided", "exact"], stride=[3, None]), dict(max_chars=[300, 7])]:
        max_chars = kw.pop("max_chars", 20)
        complete(sampler, ["ab", "cde"], max_chars, slots=4, **kw)
    assert dict(engine.TRACE_COUNTS) == before


def test_batcher_cancel_frees_the_slot_and_continuous_batching(pair):
    _, sampler = pair
    batcher = Batcher(sampler, 2)
    first = batcher.add("ROMEO:", 200, Options(temperature=0.0), tag="a")
    batcher.add("To be", 200, Options(), seed=3, tag="b")
    assert batcher.free_slots() == 0
    with pytest.raises(ValueError, match="busy"):
        batcher.add("x", 5)
    batcher.step(4)
    batcher.cancel(first)
    assert batcher.free_slots() == 1 and batcher.active() == 1
    batcher.add("", 3, tag="c")  # joins while "b" runs
    events = batcher.step()
    assert {e.tag for e in events} == {"b", "c"}
    c = "".join(e.text for e in events if e.tag == "c")
    assert c == complete(sampler, "", 3, slots=2)[0].text and events[[e.tag for e in events].index("c")].finish_reason == "length"


def test_complete_of_a_single_string_and_the_public_api():
    assert jaxgpt.complete is complete and jaxgpt.Options is Options and jaxgpt.stream_completions is stream_completions
    with pytest.raises(TypeError, match="jaxgpt.GPT"):
        complete("weights.pt", "a", 3)


def test_benchmark_rows_on_a_tiny_model(tmp_path):
    # benchmarks/requests_bench.py cannot rot: its rows, and the batched texts equal one by one (checked inside)
    from benchmarks import requests_bench
    from benchmarks.models import build_models
    from benchmarks.settings import TINY

    suite = TINY.replace(reps=1, warmup=1)
    rows, ratios = requests_bench.run(build_models(suite.model, str(tmp_path)), suite)
    assert sorted(ratios) == ["logprobs5_vs_logprobs0", "ragged_32_batched_vs_one_by_one"]
    assert all(r["ratio"] > 0 and r["what"] for r in ratios.values()) and len(rows) == 4


def test_logprobs_zero_alternatives_through_the_batcher(pair):
    """Options(logprobs=0): the chosen character's log-probability and no alternatives."""
    _, sampler = pair
    batcher = Batcher(sampler, 2)
    batcher.add("ab", 6, Options(logprobs=0))
    events = []
    while batcher.active():
        events += batcher.step(4)
    assert sum(len(e.tokens) for e in events) == 6
    assert all(e.top_ids.shape == (len(e.tokens), 0) and e.logprobs.shape == (len(e.tokens),) for e in events)
    want = complete(sampler, "ab", 6, logprobs=1, slots=2)[0]
    np.testing.assert_array_equal(np.concatenate([e.logprobs for e in events]), want.logprobs)


def test_logprobs_as_a_numpy_array_is_per_row(pair):
    _, sampler = pair
    got = complete(sampler, ["a", "bc"], 6, temperature=0.0, logprobs=np.array([0, 3]))
    assert got[0].logprobs is None and got[1].logprobs is not None and len(got[1].top_logprobs[0]) == 3
    assert [c.text for c in got] == [c.text for c in complete(sampler, ["a", "bc"], 6, temperature=0.0)]


@pytest.mark.parametrize("option", [dict(stop="a"), dict(logprobs=2), dict(unknown=1)])
def test_lockstep_views_refuse_what_only_requests_can_return(pair, option):
    # generate and stream_text return exactly num_chars per row: a stop string would never let
    # a row get there, and they have nowhere to put log-probabilities
    _, sampler = pair
    with pytest.raises(ValueError, match="unexpected option.*jaxgpt.complete"):
        jaxgpt.generate(sampler, "ab", 12, **option)
    with pytest.raises(ValueError, match="unexpected option"):
        jaxgpt.stream_text(sampler, "ab", 12, **option)


@pytest.mark.parametrize("mode", ["exact", "strided"])
def test_a_scalar_seed_gives_generate_tokens_rows(pair, mode):
    # complete(seed=s) gives row r the stream (s, r), as generate_tokens does for the same rows
    _, sampler = pair
    prompt = VOCAB.encode("abc")
    got = complete(sampler, ["abc"] * 3, C + 8, seed=9, temperature=0.9, mode=mode)
    want = jaxgpt.generate_tokens(sampler, np.stack([prompt] * 3), C + 8, seed=9, temperature=0.9, mode=mode)
    np.testing.assert_array_equal(np.stack([c.tokens for c in got]), want)
    assert len({c.text for c in got}) == 3  # three streams, three texts
