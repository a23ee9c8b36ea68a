"""Cross-framework sampling parity: jaxgpt's compiled loop vs the torch reference loop.

Both sides pick each token from the same uniform by inverse CDF (the torch side is
`porting.torch_reference.inverse_cdf_generate`, the notebook's re-encoding loop with the
multinomial replaced by that pick, fed `jaxgpt.sampling_uniforms(seed, B, N)`), so the token
streams must be identical, well past the point where the window starts sliding (C + 1000
tokens), for temperature, top-k and top-p together, and for greedy decoding. One differing
token would derail the rest of the stream, so equality over the whole stream is a strong check
of the model numerics, the KV cache, the window slide and the sampling rule at once.

The published-configuration streams cost about a thousand full 128-token forward passes on
each side; they are marked slow.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jaxgpt  # noqa: E402
from jaxgpt.generate import generate_tokens  # noqa: E402
from jaxgpt.sampling import sampling_uniforms  # noqa: E402
from porting import load_weights  # noqa: E402
from porting.torch_reference import inverse_cdf_generate, make_reference  # noqa: E402
from tests.porting_helpers import PUBLISHED, random_reference  # noqa: E402

SMALL = dict(vocab_size=104, context_length=16, model_dim=24, num_blocks=2, num_heads=3)
PAST_SLIDE = 1000
FILTERED = dict(temperature=0.8, top_k=20, top_p=0.9)


@contextlib.contextmanager
def torch_threads(n: int):
    # One thread: on a busy 2-core machine torch's OpenMP pool can be 10x slower than one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def both_streams(ref, model, context, num_new, seed, **kw):
    c = model.config.context_length
    ours = generate_tokens(model, context, num_new, seed=seed, **kw)
    uniforms = torch.from_numpy(sampling_uniforms(seed, context.shape[0], num_new))
    if context.shape[1] == 0:  # an empty prompt is the notebook's seed context [[0]]
        context = np.zeros((context.shape[0], 1), np.int64)
    with torch_threads(1):
        theirs = inverse_cdf_generate(ref, torch.from_numpy(context).long(), uniforms, c,
                                      kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p")).numpy()
    return ours, theirs


def assert_same_stream(ours, theirs):
    assert ours.shape == theirs.shape
    mismatch = np.argwhere(ours != theirs)
    assert mismatch.size == 0, f"first difference at (row, step) {tuple(mismatch[0])} of {ours.shape}"


def ported(tmp_path, ref, name="weights.pt"):
    path = tmp_path / name
    torch.save(ref.state_dict(), path)
    return load_weights(path)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    ref = random_reference("drake", seed=1, **SMALL)
    return ref, ported(tmp_path_factory.mktemp("small"), ref)


@pytest.mark.parametrize("kw", [dict(), FILTERED, dict(temperature=0.0)], ids=["multinomial", "filtered", "greedy"])
def test_small_random_weights(small_pair, kw):
    ref, model = small_pair
    context = np.array([[5, 17, 3], [40, 2, 2]])
    num_new = SMALL["context_length"] + PAST_SLIDE
    assert_same_stream(*both_streams(ref, model, context, num_new, seed=3, **kw))


def test_small_learning_variant(tmp_path):
    ref = random_reference("learning", seed=2, **SMALL)
    model = ported(tmp_path, ref)
    num_new = SMALL["context_length"] + PAST_SLIDE
    assert_same_stream(*both_streams(ref, model, np.zeros((2, 0), np.int64), num_new, seed=5, **FILTERED))


def test_greedy_equals_torch_argmax_loop(small_pair):
    ref, model = small_pair
    ours = generate_tokens(model, np.array([[1, 2, 3]]), 100, top_k=1)
    with torch_threads(1):
        context, out = torch.tensor([[1, 2, 3]]), []
        with torch.no_grad():
            for _ in range(100):  # the notebook's loop with argmax instead of multinomial
                context = context[:, -SMALL["context_length"]:]
                token = ref(context)[:, -1].argmax(-1, keepdim=True)
                context = torch.cat([context, token], 1)
                out.append(int(token))
    np.testing.assert_array_equal(ours[0], out)


@pytest.mark.slow
def test_published_config_random_weights(tmp_path):
    # Default torch initialisation (as a fresh notebook model): a realistic logit spread.
    torch.manual_seed(0)
    ref = make_reference("drake", **PUBLISHED)
    model = ported(tmp_path, ref)
    context = np.zeros((1, 0), np.int64)
    num_new = PUBLISHED["context_length"] + PAST_SLIDE
    assert_same_stream(*both_streams(ref, model, context, num_new, seed=0, **FILTERED))


def _trained_weights():
    path = getattr(jaxgpt, "DEFAULT_WEIGHTS", None)
    return path if path is not None and os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_trained_weights() is None, reason="the trained default checkpoint (jaxgpt.DEFAULT_WEIGHTS) is not installed yet")
def test_trained_weights():
    path = _trained_weights()
    model = load_weights(path)
    ref = make_reference(model.config.variant, **{k: getattr(model.config, k) for k in PUBLISHED})
    ref.load_state_dict(torch.load(path, weights_only=True))
    context = jaxgpt.default_vocab().encode("ROMEO:\n")[None]
    c = model.config.context_length
    assert_same_stream(*both_streams(ref, model, context, c + PAST_SLIDE, seed=1, **FILTERED))
    assert_same_stream(*both_streams(ref, model, context, c + 100, seed=0, temperature=0.0))


@pytest.mark.parametrize("kw", [dict(min_p=0.05, temperature=1.1), dict(repetition_penalty=1.3, top_k=30),
                                dict(logit_bias={"e": -1.5, " ": 0.5, "q": float("-inf")}, top_p=0.95),
                                dict(repetition_penalty=0.8, temperature=0.0)],
                         ids=["min_p", "repetition_penalty", "logit_bias", "greedy_penalty"])
def test_request_options_equal_the_torch_loop_past_the_slide(small_pair, kw):
    """min_p, repetition penalty and logit bias through jaxgpt.complete, against the torch loop
    fed the same uniforms, identical over 1000 tokens past the window slide."""
    ref, model = small_pair
    num_new = SMALL["context_length"] + PAST_SLIDE
    vocab = jaxgpt.default_vocab()
    ours = jaxgpt.complete(model, "ROMEO:", num_new, seed=8, **kw)[0].tokens
    bias = kw.get("logit_bias")
    if bias is not None:
        row = torch.zeros(SMALL["vocab_size"])
        for char, b in bias.items():
            row[int(vocab.encode(char)[0])] = b
        bias = row
    uniforms = torch.from_numpy(sampling_uniforms(8, 1, num_new))
    with torch_threads(1):
        theirs = inverse_cdf_generate(ref, torch.from_numpy(vocab.encode("ROMEO:")[None].astype(np.int64)), uniforms,
                                      SMALL["context_length"], kw.get("temperature", 1.0), kw.get("top_k"),
                                      kw.get("top_p"), kw.get("min_p"), kw.get("repetition_penalty"), bias).numpy()
    assert_same_stream(ours[None], theirs)
