"""jaxgpt.beam_search: exact values on hand-built logits (tie rule, frozen hypotheses), greedy
equality at beams=1, torch parity of tokens and scores past the window slide, agreement with
score(), no recompilation, hostile inputs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgpt
from jaxgpt import beam as beam_module
from jaxgpt.beam import beam_search, beam_search_text
from jaxgpt.score import score_tokens
from tests.porting_helpers import one_torch_thread, random_reference  # noqa: F401

torch = pytest.importorskip("torch")

from porting import load_weights  # noqa: E402
from porting.torch_reference import make_reference, reference_beam_search  # noqa: E402

SMALL = dict(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
C = SMALL["context_length"]
VOCAB = jaxgpt.default_vocab()


def _ported(tmp_path, ref, name="weights.pt"):
    path = tmp_path / name
    torch.save(ref.state_dict(), path)
    return load_weights(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = random_reference("drake", seed=1, **SMALL)
    return ref, jaxgpt.Sampler(_ported(tmp_path_factory.mktemp("beam"), ref))


def _constant(probs: dict[int, float]):
    """A small GPT whose next-token distribution is `probs` (rest shared) whatever the context."""
    model = jaxgpt.GPT(jaxgpt.GPTConfig(**SMALL))
    v = SMALL["vocab_size"]
    p = np.full(v, (1 - sum(probs.values())) / (v - len(probs)))
    for token, value in probs.items():
        p[token] = value
    model.vocab_projection.kernel[...] = jnp.zeros_like(model.vocab_projection.kernel[...])
    model.vocab_projection.bias[...] = jnp.asarray(np.log(p), jnp.float32)
    return model


def _torch_search(ref, context, num_new, beams, stop=()):
    stop = [VOCAB.encode(s).tolist() for s in stop]
    if context.shape[1] == 0:
        context = np.zeros((context.shape[0], 1), np.int64)
    tokens, scores = reference_beam_search(ref, torch.from_numpy(context).long(), num_new, beams, C, stop)
    return tokens.numpy(), scores.numpy()


def test_equal_scores_go_to_the_lower_flat_index():
    a, b = 10, 20
    result = beam_search(_constant({a: 0.6, b: 0.3}), np.array([[1]]), 2, beams=2)
    # [a, b] and [b, a] score exactly the same (float addition commutes): [a, b] has flat index
    # 0 * V + b, [b, a] 1 * V + a, so [a, b] is kept
    np.testing.assert_array_equal(result.tokens[0], [[a, a], [a, b]])
    lp = np.log(np.float32([0.6, 0.3]))
    np.testing.assert_allclose(result.scores[0], [2 * lp[0], lp[0] + lp[1]], rtol=1e-6)


def test_a_frozen_hypothesis_keeps_its_score_and_competes():
    a, b = 10, 20
    # log 0.6 = -0.51, log 0.3 = -1.20: [b] stops at step 0 with -1.20; step 1 keeps [a, a]
    # (-1.02) and [b]; step 2 ranks [b] (-1.20) above [a, a, a] (-1.53)
    result = beam_search(_constant({a: 0.6, b: 0.3}), np.array([[1]]), 3, beams=2, stop=VOCAB.decode([b]))
    np.testing.assert_array_equal(result.tokens[0], [[b, -1, -1], [a, a, a]])
    np.testing.assert_allclose(result.scores[0], [np.log(0.3), 3 * np.log(0.6)], rtol=1e-5)
    np.testing.assert_array_equal(result.lengths[0], [1, 3])
    np.testing.assert_array_equal(result.stopped[0], [True, False])


def test_shared_prefix_windows_equal_full_windows(pair):
    # beams that agree but for their last 8 tokens: the prefix encoded once per row + the
    # suffixes per beam give the logits of the full windows
    _, sampler = pair
    model = nnx.merge(sampler.graphdef.graphdef, sampler.state_on(jax.local_devices()[:1]))
    rng = np.random.default_rng(0)
    windows = np.repeat(rng.integers(0, SMALL["vocab_size"], (2, 1, C)), 3, axis=1)
    windows[:, :, -8:] = rng.integers(0, SMALL["vocab_size"], (2, 3, 8))
    shared = beam_module._shared_window(model, jnp.asarray(windows), 8)
    full = model(jnp.asarray(windows.reshape(6, C)))[:, -1]
    np.testing.assert_allclose(shared, full, atol=1e-5 * max(1.0, float(jnp.abs(full).max())), rtol=0)
    assert beam_module._beam_windows(model, jnp.asarray(windows)).shape == (6, SMALL["vocab_size"])


@pytest.mark.parametrize("context", [np.array([[5, 17, 3], [40, 2, 2]]), np.zeros((2, 0), np.int64)],
                         ids=["prompt", "seed-token"])
def test_one_beam_is_greedy_past_the_window(pair, context):
    _, model = pair
    greedy = jaxgpt.generate_tokens(model, context, C + 60, temperature=0)
    result = beam_search(model, context, C + 60, beams=1)
    np.testing.assert_array_equal(result.tokens[:, 0], greedy)


@pytest.mark.parametrize("beams", [1, 2, 5])
def test_matches_torch_reference(pair, beams):
    ref, model = pair
    context = np.array([[5, 17, 3], [40, 2, 2], [7, 7, 7]])
    ours = beam_search(model, context, C + 30, beams=beams)
    tokens, scores = _torch_search(ref, context, C + 30, beams)
    np.testing.assert_array_equal(ours.tokens, tokens)
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4, rtol=0)
    assert np.all(np.diff(ours.scores, axis=1) <= 0)  # best first


def test_stop_strings_match_torch_reference(pair):
    ref, model = pair
    context = np.array([[5, 17, 3], [40, 2, 2]])
    free = beam_search(model, context, C + 20, beams=4)
    # stop strings taken from the unstopped hypotheses, so that some of them do stop
    stop = [VOCAB.decode(free.tokens[0, 0, 6:8]), VOCAB.decode(free.tokens[1, 2, 3:4])]
    ours = beam_search(model, context, C + 20, beams=4, stop=stop)
    tokens, scores = _torch_search(ref, context, C + 20, 4, stop)
    assert ours.stopped.any()
    np.testing.assert_array_equal(ours.tokens, tokens)
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4, rtol=0)
    for row, length, stopped in zip(ours.tokens.reshape(-1, C + 20), ours.lengths.ravel(), ours.stopped.ravel()):
        assert np.all(row[:length] >= 0) and np.all(row[length:] == -1)
        assert stopped == any(VOCAB.decode(row[:length]).endswith(s) for s in stop)


def test_learning_variant_matches_torch(tmp_path):
    ref = random_reference("learning", seed=3, **SMALL)
    model = _ported(tmp_path, ref)
    context = np.zeros((1, 0), np.int64)
    ours = beam_search(model, context, C + 10, beams=3)
    tokens, scores = _torch_search(ref, context, C + 10, 3)
    np.testing.assert_array_equal(ours.tokens, tokens)
    np.testing.assert_allclose(ours.scores, scores, atol=1e-4, rtol=0)


def test_scores_are_the_sum_of_score_log_probabilities(pair):
    # an empty prompt is the seed token, which score() conditions on too
    _, model = pair
    result = beam_search(model, np.zeros((1, 0), np.int64), C + 12, beams=3)
    for tokens, total in zip(result.tokens[0], result.scores[0]):
        np.testing.assert_allclose(score_tokens(model, tokens).logprobs.sum(), total, atol=1e-4)


def test_no_recompile_for_new_context_stop_or_length(pair):
    _, model = pair
    beam_search(model, np.array([[1, 2, 3]]), 20, beams=3, stop="ab")
    before = dict(beam_module.TRACE_COUNTS)
    for context, num_new, stop in [(np.array([[9] * 15]), 64, None), (np.zeros((1, 0), np.int64), 1, ["x", "yz"]),
                                   (np.array([[4] * 40]), 33, "abcdefgh")]:
        assert beam_search(model, context, num_new, beams=3, stop=stop).tokens.shape == (1, 3, num_new)
    assert beam_module.TRACE_COUNTS == before


def test_text_form(pair):
    _, model = pair
    hypotheses = beam_search_text(model, "ROMEO:", 24, beams=3)
    assert len(hypotheses) == 3 and all(len(text) == 24 for text, _ in hypotheses)
    assert [s for _, s in hypotheses] == sorted((s for _, s in hypotheses), reverse=True)
    stop = hypotheses[0][0][5]
    stopped = beam_search_text(model, "ROMEO:", 24, beams=3, stop=stop)
    # a hypothesis freezes at the first stop string, and its text ends before it
    assert all(stop not in text for text, _ in stopped)
    assert any(len(text) < 24 for text, _ in stopped)


def test_text_form_trims_the_longest_matching_stop(pair):
    # beams=1 is greedy: at the first occurrence of character c = text[i], the text ends with
    # both c and text[i-1:i+1]; the two-character stop is the one that is cut, whatever the order
    _, model = pair
    text = beam_search_text(model, "ROMEO:", 40, beams=1)[0][0]
    i = next(i for i in range(1, len(text)) if text[i] not in text[:i])
    for stops in ([text[i], text[i - 1:i + 1]], [text[i - 1:i + 1], text[i]]):
        assert beam_search_text(model, "ROMEO:", 40, beams=1, stop=stops)[0][0] == text[:i - 1]


@pytest.mark.parametrize("kwargs,error", [
    (dict(beams=0), "beams must be"), (dict(beams=105), "beams must be"), (dict(beams=True), "beams must be"),
    (dict(num_new=0), "positive integer"), (dict(stop=""), "stop must be"), (dict(stop=[3]), "stop must be"),
    (dict(stop="\t"), "not in the vocabulary"), (dict(context=np.array([[104]])), "outside the vocabulary"),
    (dict(context=np.array([1, 2])), "shape"),
])
def test_bad_input(pair, kwargs, error):
    args = dict(context=np.array([[1, 2]]), num_new=4) | kwargs
    with pytest.raises(ValueError, match=error):
        beam_search(pair[1], args.pop("context"), args.pop("num_new"), **args)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(jaxgpt.DEFAULT_WEIGHTS), reason="the default checkpoint is not installed")
@pytest.mark.parametrize("beams", [1, 2, 5])
def test_trained_weights_match_torch(beams):
    model = load_weights(jaxgpt.DEFAULT_WEIGHTS)
    cfg = model.config
    ref = make_reference(cfg.variant, vocab_size=cfg.vocab_size, context_length=cfg.context_length,
                         model_dim=cfg.model_dim, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads)
    ref.load_state_dict(torch.load(jaxgpt.DEFAULT_WEIGHTS, weights_only=True))
    context = np.stack([VOCAB.encode("ROMEO:\n"), VOCAB.encode("JULIET:")])
    num_new = cfg.context_length + 10
    ours = beam_search(model, context, num_new, beams=beams)
    tokens, scores = reference_beam_search(ref, torch.from_numpy(context).long(), num_new, beams, cfg.context_length)
    np.testing.assert_array_equal(ours.tokens, tokens.numpy())
    np.testing.assert_allclose(ours.scores, scores.numpy(), atol=1e-4, rtol=0)


def test_benchmark_rows_on_a_tiny_model(tmp_path):
    # benchmarks/beam_score.py cannot rot: both rows, same tokens and log-probabilities checked inside
    from benchmarks import beam_score
    from benchmarks.models import build_models
    from benchmarks.settings import TINY

    suite = TINY.replace(reps=1, warmup=1)
    rows, ratios = beam_score.run(build_models(suite.model, str(tmp_path)), suite)
    assert sorted(ratios) == ["beam_b1_x4_vs_reference", "score_vs_tuned"]
    assert all(r["ratio"] > 0 for r in ratios.values())
    assert {(r["name"], r["framework"]) for r in rows} == {
        (f"beam b1 x4 {suite.beam_steps}", "jax"), (f"beam b1 x4 {suite.beam_steps}", "torch"),
        (f"score {suite.score_chars} chars", "jax"), (f"score {suite.score_chars} chars", "torch")}
    doc = {"device": "cpu", "date": "now", "weights": "random", "reps": 1, "score_reps": 1, "limits": None,
           "load_average": [0.0, 0.0], "results": rows, "ratios": ratios}
    report = beam_score.markdown(doc, suite.warmup, suite.model.context_length)
    assert report.count("\n| ") == 2 * 2 + 2 + 4  # two header lines per table, 2 ratios, 4 results


DEVICES_PROBE = """
import sys, numpy as np, jax, jaxgpt
from porting import load_weights
model = load_weights(sys.argv[1])
context = np.array([[5, 17, 3], [40, 2, 2], [7, 7, 7], [1, 2, 3]])
runs = [jaxgpt.beam_search(model, context, 24, beams=3, devices=n) for n in (1, 2, None)]
print(len(jax.devices()), all(np.array_equal(r.tokens, runs[0].tokens) for r in runs),
      max(float(np.abs(r.scores - runs[0].scores).max()) for r in runs))
"""


def test_rows_split_over_devices_give_the_same_beams(tmp_path):
    # 4 rows on 1, 2 and 3 simulated CPU devices (3: padded to 6 rows)
    import subprocess
    import sys

    path = tmp_path / "w.pt"
    torch.save(random_reference("drake", seed=1, **SMALL).state_dict(), path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "PYTHONPATH": root,
           "JAXGPT_NO_COMPILE_CACHE": "1"}
    done = subprocess.run([sys.executable, "-c", DEVICES_PROBE, str(path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    devices, same, diff = done.stdout.split()
    assert (devices, same) == ("3", "True") and float(diff) < 1e-4
