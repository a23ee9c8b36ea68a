"""jaxgpt.score: exact values, the window definition against the torch notebook loop, agreement
with generation's windows, no recompilation, hostile inputs."""

from __future__ import annotations

import importlib
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt
from jaxgpt.generate import generate_tokens
from jaxgpt.score import score, score_details, score_tokens, window_starts
from tests.porting_helpers import one_torch_thread, random_reference  # noqa: F401

score_module = importlib.import_module("jaxgpt.score")  # the module; jaxgpt.score is the function

torch = pytest.importorskip("torch")

from porting import load_weights  # noqa: E402
from porting.torch_reference import make_reference, reference_score  # noqa: E402

SMALL = dict(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
C = SMALL["context_length"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = random_reference("drake", seed=4, **SMALL)
    path = tmp_path_factory.mktemp("score") / "weights.pt"
    torch.save(ref.state_dict(), path)
    return ref, load_weights(path)


def _tolerance(ref, tokens):
    # float32 rounding grows with the logits' magnitude
    with torch.no_grad():
        scale = float(ref(torch.tensor([[0, *tokens[: C - 1]]])).abs().max())
    return 1e-5 * max(1.0, scale)


def test_constant_logits_give_exact_log_softmax():
    # every kernel zero: the logits are the vocabulary bias whatever the context
    model = jaxgpt.GPT(jaxgpt.GPTConfig(**SMALL))
    bias = np.linspace(-2.0, 3.0, SMALL["vocab_size"]).astype(np.float32)
    model.vocab_projection.kernel[...] = jnp.zeros_like(model.vocab_projection.kernel[...])
    model.vocab_projection.bias[...] = jnp.asarray(bias)
    tokens = np.array([3, 50, 7, 7, 99] * 9)  # 45 > C: sliding windows too
    expected = bias[tokens] - (bias.max() + np.log(np.exp(bias - bias.max()).sum()))
    got = score_tokens(model, tokens)
    np.testing.assert_allclose(got.logprobs, expected, atol=2e-6)
    np.testing.assert_array_equal(got.top_ids[:, 0], np.full(len(tokens), SMALL["vocab_size"] - 1))


def test_window_starts_follow_generation():
    # exact: crop to the last C; strided (stride 4): drop 4 at once when the context overflows
    np.testing.assert_array_equal(window_starts(20, 16), [0] * 16 + [1, 2, 3, 4])
    np.testing.assert_array_equal(window_starts(26, 16, 4), [0] * 16 + [4] * 4 + [8] * 4 + [12] * 2)


@pytest.mark.parametrize("mode,stride", [("exact", None), ("strided", 5), ("strided", 1)])
def test_matches_torch_notebook_loop(pair, mode, stride):
    ref, model = pair
    tokens = np.random.default_rng(0).integers(0, SMALL["vocab_size"], 3 * C + 7)
    # 4 windows per call: several calls, the last one padded
    ours = score_tokens(model, tokens, mode=mode, stride=stride, windows_per_call=4).logprobs
    keep = C if mode == "exact" else C + 1 - stride
    theirs = reference_score(ref, tokens, C, keep).numpy()
    np.testing.assert_allclose(ours, theirs, atol=_tolerance(ref, tokens), rtol=0)
    assert ours.dtype == np.float32 and ours.shape == (len(tokens),)


def test_exact_differs_from_strided_past_the_window(pair):
    _, model = pair
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], 2 * C)
    exact = score_tokens(model, tokens).logprobs
    strided = score_tokens(model, tokens, mode="strided", stride=8).logprobs
    np.testing.assert_allclose(exact[:C], strided[:C], atol=1e-5)  # same context while it grows (other batch sizes)
    assert np.abs(exact[C + 1 :] - strided[C + 1 :]).max() > 1e-3  # then strided sees less


@pytest.mark.parametrize("mode,stride", [("exact", None), ("strided", 6)])
def test_greedy_generation_picks_the_top_scored_token(pair, mode, stride):
    # generation and scoring see the same windows: every greedy token is score's top choice
    _, model = pair
    generated = generate_tokens(model, np.zeros((1, 0), np.int32), 4 * C, temperature=0, mode=mode,
                                stride=stride)[0]
    scored = score_tokens(model, generated, mode=mode, stride=stride)
    np.testing.assert_array_equal(scored.top_ids[:, 0], generated)
    np.testing.assert_allclose(scored.logprobs, scored.top_logprobs[:, 0], atol=1e-6)


def test_no_recompile_for_new_text_or_length(pair):
    _, model = pair
    sampler = jaxgpt.Sampler(model)
    vocab = jaxgpt.default_vocab()
    score(sampler, "warm up the programs, longer than sixteen chars")
    before = dict(score_module.TRACE_COUNTS)
    for text in ("a", "ROMEO:\nBut soft!", "x" * 200, "What light through yonder window breaks?"):
        assert score(sampler, text, vocab=vocab).shape == (len(text),)
    assert score_module.TRACE_COUNTS == before


def test_details_are_a_distribution(pair):
    _, model = pair
    details = score_details(model, "To be, or not to be", top=SMALL["vocab_size"])
    probs = np.exp(details.top_logprobs)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.all(np.diff(details.top_logprobs, axis=1) <= 0)


@pytest.mark.parametrize("call,error", [
    (lambda m: score(m, ""), "non-empty"),
    (lambda m: score(m, "tab\there"), "not in the vocabulary"),
    (lambda m: score(m, "abc", mode="fast"), "mode must be"),
    (lambda m: score(m, "abc", stride=4), "applies to mode=.strided. only"),
    (lambda m: score(m, "abc", mode="strided", stride=0), "stride must be"),
    (lambda m: score_tokens(m, [1, 104]), "outside the vocabulary"),
    (lambda m: score_tokens(m, [1.5]), "integer"),
    (lambda m: score_tokens(m, [1], top=0), "top must be"),
])
def test_bad_input(pair, call, error):
    with pytest.raises(ValueError, match=error):
        call(pair[1])


def _trained():
    path = jaxgpt.DEFAULT_WEIGHTS
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_trained() is None, reason="the default checkpoint is not installed")
def test_trained_weights_match_torch():
    model = load_weights(_trained())
    cfg = model.config
    ref = make_reference(cfg.variant, vocab_size=cfg.vocab_size, context_length=cfg.context_length,
                         model_dim=cfg.model_dim, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads)
    ref.load_state_dict(torch.load(_trained(), weights_only=True))
    text = ("ROMEO:\nBut soft! what light through yonder window breaks? It is the east, and Juliet is the "
            "sun. Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.")
    tokens = jaxgpt.default_vocab().encode(text)
    assert len(tokens) > cfg.context_length + 20
    ours = score(model, text)
    theirs = reference_score(ref, tokens, cfg.context_length).numpy()
    with torch.no_grad():
        scale = float(ref(torch.tensor([[0, *tokens[:127]]])).abs().max())
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale, rtol=0)
    # and a trained model finds Shakespeare far likelier than uniform
    assert -ours.mean() < 0.6 * math.log(cfg.vocab_size)
