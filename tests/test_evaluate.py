"""Teacher-forced evaluation: windows cover every prediction once, figures match a direct
computation, batching and padding change nothing, torch agrees."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.data import DataError
from jaxgpt.evaluate import EvalResult, evaluate, windows
from jaxgpt.model import GPT

C = 8
CONFIG = GPTConfig(vocab_size=11, context_length=C, model_dim=12, num_blocks=2, num_heads=3)


@pytest.fixture(scope="module")
def model():
    return GPT(CONFIG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, 3 * C + 5).astype(np.int32)


def direct_nll(model, tokens) -> float:
    """Mean -log p over the same windows, one window at a time, without padding or masks."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, C):
        x = tokens[start : min(start + C, len(tokens) - 1)]
        y = tokens[start + 1 : start + 1 + len(x)]
        logp = jax.nn.log_softmax(np.asarray(model(x[None]), dtype=np.float64)[0], axis=-1)
        total -= float(np.asarray(logp)[np.arange(len(y)), y].sum())
        count += len(y)
    return total / count


def test_windows_predict_every_character_once(tokens):
    x, y, mask = windows(tokens, C)
    assert x.shape == y.shape == mask.shape == (4, C)  # 3 full windows + the padded rest
    real = mask.astype(bool)
    assert real.sum() == len(tokens) - 1
    np.testing.assert_array_equal(x[real], tokens[:-1])  # inputs in order, each once
    np.testing.assert_array_equal(y[real], tokens[1:])  # each target is the next character
    assert not real[-1, 4:].any() and real[-1, :4].all()  # padding only after the real tail


def test_windows_of_a_short_text_and_too_short_texts():
    x, y, mask = windows(np.array([3, 1, 4], np.int32), C)
    assert x.shape == (1, C) and mask.sum() == 2
    with pytest.raises(DataError, match="at least 2"):
        windows(np.array([3], np.int32), C)


def test_evaluate_matches_a_direct_computation(model, tokens):
    result = evaluate(model, tokens, batch_size=3)
    assert result.num_chars == len(tokens) - 1 and result.num_windows == 4
    assert result.nats_per_char == pytest.approx(direct_nll(model, tokens), abs=1e-5)
    assert result.bits_per_char == pytest.approx(result.nats_per_char / math.log(2))
    assert result.perplexity == pytest.approx(math.exp(result.nats_per_char))


def test_batch_size_and_padding_do_not_change_the_result(model, tokens):
    one = evaluate(model, tokens, batch_size=1).nats_per_char
    assert evaluate(model, tokens, batch_size=7).nats_per_char == pytest.approx(one, abs=1e-6)


def test_a_uniform_model_scores_log_vocab(tokens):
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    kernel = model.vocab_projection.kernel
    kernel[...] = np.zeros(kernel.shape, np.float32)  # zero logits: every character equally likely
    result = evaluate(model, tokens)
    assert result.nats_per_char == pytest.approx(math.log(CONFIG.vocab_size), abs=1e-6)
    assert result.perplexity == pytest.approx(CONFIG.vocab_size, rel=1e-5)


def test_evaluation_leaves_a_training_model_in_training_mode(tokens):
    model = GPT(CONFIG, rngs=nnx.Rngs(1))
    model.train()
    eval_mode = evaluate(GPT(CONFIG, rngs=nnx.Rngs(1)), tokens).nats_per_char
    assert evaluate(model, tokens).nats_per_char == pytest.approx(eval_mode, abs=1e-6)  # dropout off inside
    assert model.training


def test_ids_outside_the_vocabulary_are_refused(model):
    with pytest.raises(DataError, match="0..10"):
        evaluate(model, np.array([1, 2, 11], np.int32))


def test_result_dict():
    r = EvalResult(math.log(4.0), 10, 2)
    assert r.as_dict() == {"nats_per_char": math.log(4.0), "bits_per_char": pytest.approx(2.0),
                           "perplexity": pytest.approx(4.0), "num_chars": 10, "num_windows": 2}


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_torch_reference_agrees(variant, tokens):
    pytest.importorskip("torch")
    from porting.torch_reference import evaluate_torch, reference_from_model

    model = GPT(CONFIG.replace(variant=variant), rngs=nnx.Rngs(2))
    jax_result = evaluate(model, tokens, batch_size=2)
    torch_result = evaluate_torch(reference_from_model(model), tokens, C, batch_size=2)
    assert torch_result.num_chars == jax_result.num_chars
    assert abs(torch_result.nats_per_char - jax_result.nats_per_char) < 1e-5
