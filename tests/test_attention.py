"""`GPT.attention_weights`: the softmax probabilities of every block and head, against the torch
reference's per-head modules (both variants), and their structural properties."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import porting
from jaxgpt import GPTConfig
from tests.porting_helpers import PUBLISHED, SMALL, one_torch_thread, random_reference  # one_torch_thread: autouse fixture
from tests.web_helpers import random_model

torch = pytest.importorskip("torch")
from porting.torch_reference import attention_probabilities, make_reference  # noqa: E402

TOLERANCE = 1e-6
PEAKED = [  # (variant, config, seed): one block, three blocks with 8 heads, head_size 1, published
    ("drake", SMALL, 201),
    ("learning", SMALL, 202),
    ("drake", dict(vocab_size=50, context_length=12, model_dim=48, num_blocks=3, num_heads=8), 203),
    ("learning", dict(vocab_size=50, context_length=12, model_dim=48, num_blocks=3, num_heads=8), 204),
    ("drake", dict(vocab_size=11, context_length=8, model_dim=6, num_blocks=2, num_heads=6), 205),
    ("drake", PUBLISHED, 206),
    ("learning", PUBLISHED, 207),
]


attention_weights = nnx.jit(lambda model, tokens: model.attention_weights(tokens))  # one compilation per shape


def ported(tmp_path, reference):
    torch.save(reference.state_dict(), tmp_path / "ref.pt")
    return porting.load_weights(tmp_path / "ref.pt")


def lengths(context_length):
    return ((1, 2), (context_length // 2 + 1, 1), (context_length, 2))  # (T, B)


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_matches_torch_per_head_attention_within_1e6(tmp_path, variant):
    """The published size with torch's own initialisation (attention spread as in training)."""
    torch.manual_seed(11)
    reference = make_reference(variant, **PUBLISHED)
    model = ported(tmp_path, reference)
    rng = np.random.default_rng(11)
    for t, batch in lengths(128):
        tokens = rng.integers(0, 104, size=(batch, t))
        expected = attention_probabilities(reference, torch.from_numpy(tokens)).numpy()
        got = np.asarray(attention_weights(model, tokens))
        assert got.shape == (6, batch, 6, t, t)
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("variant,config,seed", PEAKED, ids=[f"{v}-{c['model_dim']}x{c['num_blocks']}x{c['num_heads']}"
                                                             for v, c, _ in PEAKED])
def test_peaked_attention_as_accurate_as_torch_itself(tmp_path, variant, config, seed):
    """Every parameter random and attention peaked (scores of tens): float32 alone then moves the
    probabilities by up to ~2e-6 (torch in float32 against torch in float64, published size), so
    1e-6 against torch's float32 would test rounding, not the model. Against the float64
    reference, jaxgpt must be about as accurate as torch's float32 (within 2x its error)."""
    reference = random_reference(variant, seed, **config)
    model = ported(tmp_path, reference)
    rng = np.random.default_rng(seed)
    for t, batch in lengths(config["context_length"]):
        tokens = torch.from_numpy(rng.integers(0, config["vocab_size"], size=(batch, t)))
        torch32 = attention_probabilities(reference.float(), tokens).numpy()
        exact = attention_probabilities(reference.double(), tokens).numpy()
        got = np.asarray(attention_weights(model, tokens.numpy()))
        torch_error = float(np.abs(torch32 - exact).max())
        assert float(np.abs(got - exact).max()) <= max(2 * torch_error, TOLERANCE), (t, torch_error)
        np.testing.assert_allclose(got, torch32, rtol=0, atol=5e-6)


@pytest.fixture(scope="module")
def tiny():
    return random_model(GPTConfig(vocab_size=13, context_length=10, model_dim=12, num_blocks=2, num_heads=3), 3)


def test_rows_are_causal_distributions_and_right_padding_changes_nothing(tiny):
    model = tiny
    tokens = np.random.default_rng(0).integers(0, 13, size=(2, 10))
    weights = np.asarray(attention_weights(model, tokens))  # (2, 2, 3, 10, 10)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.all(weights[..., np.triu_indices(10, k=1)[0], np.triu_indices(10, k=1)[1]] == 0)
    assert np.all(weights[..., 0, 0] == 1)  # the first position can only attend to itself
    prefix = np.asarray(attention_weights(model, tokens[:, :6]))
    np.testing.assert_allclose(prefix, weights[..., :6, :6], rtol=0, atol=1e-6)


def test_bad_inputs_and_training_mode_are_refused(tiny):
    for bad in (np.zeros((1, 11), int), np.zeros((1, 0), int), np.zeros((4,), int)):
        with pytest.raises(ValueError, match="shape|sequence length"):
            tiny.attention_weights(bad)
    tiny.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            tiny.attention_weights(np.zeros((1, 2), int))
    finally:
        tiny.eval()
