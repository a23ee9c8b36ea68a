"""Sampling rules: definitions, greedy, distributions, traced parameters, per-row randomness."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import sampling
from jaxgpt.options import Options
from jaxgpt.sampling import sample
from jaxgpt.vocab import Vocab

V = 10
_sample_jit = jax.jit(sample)


def _params(batch, vocab_size, **kw):
    """SamplingParams of `batch` rows, all with the options `kw`."""
    vocab = Vocab(tuple("abcdefghijklmnopqrstuvwxyz"[:vocab_size])) if vocab_size <= 26 else None
    _, params, *_ = Options(**kw).engine_row(vocab, vocab_size, 16)
    return jax.tree.map(lambda a: np.broadcast_to(a, (batch, *np.shape(a))), params)


def _draw(logits, u, window=None, length=None, **kw):
    logits = jnp.asarray(logits, jnp.float32)
    params = _params(logits.shape[0], logits.shape[-1], **kw)
    return np.asarray(_sample_jit(logits, jnp.asarray(u, jnp.float32), params, window, length))


def _kept(logits, **kw):
    """Indices a draw can reach: sweep u over a fine grid."""
    u = np.linspace(0, 1, 4001, endpoint=False)
    return set(_draw(np.broadcast_to(logits, (len(u), len(logits))), u, **kw).tolist())


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias={"ab": 1.0}), "single characters"),
    (dict(logit_bias={"a": float("nan")}), "logit_bias"),
    (dict(logit_bias={"a": float("inf")}), "logit_bias"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
])
def test_options_reject(kw, message):
    with pytest.raises(ValueError, match=message):
        Options(**kw)


def test_inverse_cdf_is_first_index_above_u():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs)
    # cdf = .1 .3 .6 1.0: u in [0, .1) -> 0, [.1, .3) -> 1, [.3, .6) -> 2, [.6, 1) -> 3
    u = np.array([0.0, 0.09, 0.11, 0.29, 0.31, 0.59, 0.61, 0.999])
    got = _draw(np.broadcast_to(logits, (len(u), 4)), u)
    np.testing.assert_array_equal(got, [0, 0, 1, 1, 2, 2, 3, 3])


def test_top_k_keeps_ties():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 2.0])
    assert _kept(logits, top_k=2) == {1, 2, 3, 5}  # the 2nd largest (2.0) is tied three ways
    assert _kept(logits, top_k=1) == {1}
    assert _kept(logits, top_k=100) == set(range(6))


def test_top_p_keeps_tokens_whose_preceding_mass_is_below_p():
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits = np.log(probs)
    # descending: .5 (before 0), .3 (before .5), .15 (before .8), .05 (before .95)
    assert _kept(logits, top_p=0.5) == {1}
    assert _kept(logits, top_p=0.51) == {1, 2}
    assert _kept(logits, top_p=0.81) == {1, 2, 3}
    assert _kept(logits, top_p=0.1) == {1}  # the top token always survives
    assert _kept(logits, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_applies_after_temperature_and_top_k():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    # top-k 3 renormalises to .444 .333 .222: preceding masses 0, .444, .777
    assert _kept(logits, top_k=3, top_p=0.7) == {0, 1}
    # a high temperature flattens towards uniform: preceding masses grow by ~1/4
    assert _kept(logits, temperature=100.0, top_p=0.6) == {0, 1, 2}


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(top_k=1), dict(temperature=0.0, top_p=0.3)])
def test_greedy_is_argmax_with_first_index_on_ties(kw):
    logits = np.array([[0.0, 5.0, 1.0, 5.0], [2.0, 1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(_draw(logits, [0.99, 0.99], **kw), [1, 0])


def test_unfiltered_draw_follows_softmax():
    logits = np.array([0.5, -1.0, 2.0, 0.0, 1.0])
    u = np.asarray(jax.random.uniform(jax.random.key(0), (20000,)))
    tokens = _draw(np.broadcast_to(logits, (len(u), 5)), u)
    freq = np.bincount(tokens, minlength=5) / len(u)
    np.testing.assert_allclose(freq, jax.nn.softmax(logits), atol=0.01)


def test_temperature_sharpens():
    logits = np.array([1.0, 0.0])
    u = np.linspace(0, 1, 1000, endpoint=False)
    hot = _draw(np.broadcast_to(logits, (1000, 2)), u, temperature=2.0)
    cold = _draw(np.broadcast_to(logits, (1000, 2)), u, temperature=0.25)
    assert (cold == 0).mean() > (hot == 0).mean()
    np.testing.assert_allclose((cold == 0).mean(), jax.nn.softmax(logits / 0.25)[0], atol=0.002)


def test_min_p_keeps_tokens_within_a_factor_of_the_top():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    assert _kept(logits, min_p=0.5) == {0, 1}  # >= 0.25
    assert _kept(logits, min_p=0.3) == {0, 1, 2}  # >= 0.15
    assert _kept(logits, min_p=1.0) == {0}
    assert _kept(logits, min_p=0.0) == {0, 1, 2, 3}
    # after temperature: 0.5 and 0.3 at temperature 0.5 are .25 : .09 -> ratio .36
    assert _kept(logits, temperature=0.5, min_p=0.4) == {0}


def test_repetition_penalty_over_the_window():
    logits = np.array([[2.0, 1.0, -1.0, 0.5]])
    window = np.array([[0, 2, 3, 3]])  # characters 0, 2 present; 3 only beyond the length
    length = np.array([2])
    greedy = dict(temperature=0.0)
    assert _draw(logits, [0.0], window, length, repetition_penalty=1.5, **greedy)[0] == 0  # 2/1.5 > 1
    assert _draw(logits, [0.0], window, length, repetition_penalty=3.0, **greedy)[0] == 1  # 2/3 < 1
    # negative logits are multiplied: -1 * 3 = -3 drops below the rest; probabilities follow the rule
    u = np.linspace(0, 1, 4001, endpoint=False)
    n = len(u)
    tokens = _draw(np.broadcast_to(logits, (n, 4)), u, np.broadcast_to(window, (n, 4)), np.full(n, 2),
                   repetition_penalty=3.0)
    want = jax.nn.softmax(np.array([2 / 3, 1.0, -3.0, 0.5]))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, want, atol=1e-3)
    # A penalty of 1 (or none) is bit for bit the plain rule.
    np.testing.assert_array_equal(
        _draw(np.broadcast_to(logits, (n, 4)), u, np.broadcast_to(window, (n, 4)), np.full(n, 2), repetition_penalty=1.0),
        _draw(np.broadcast_to(logits, (n, 4)), u))


def test_logit_bias_shifts_and_bans():
    logits = np.array([[0.0, 3.0, 1.0, 2.0]])
    assert _draw(logits, [0.0], temperature=0.0, logit_bias={"b": float("-inf")})[0] == 3  # 'b' is id 1
    assert _draw(logits, [0.0], temperature=0.0, logit_bias={"a": 5.0})[0] == 0
    assert 1 not in _kept(logits[0], logit_bias={"b": float("-inf")})
    with pytest.raises(ValueError, match="every character"):
        Options(logit_bias={c: float("-inf") for c in "abcd"}).engine_row(Vocab(tuple("abcd")), 4, 16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Options(logit_bias={"z": 1.0}).engine_row(Vocab(tuple("abcd")), 4, 16)


def test_rows_use_their_own_values():
    """One batch, a different rule per row: each row equals that row drawn alone."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (5, V)).astype(np.float32)
    u = rng.uniform(size=5).astype(np.float32)
    rows = [dict(), dict(temperature=0.0), dict(top_k=3, temperature=0.7), dict(top_p=0.5), dict(min_p=0.2)]
    per_row = [_params(1, V, **kw) for kw in rows]
    mixed = jax.tree.map(lambda *a: np.concatenate(a), *per_row)
    together = np.asarray(_sample_jit(jnp.asarray(logits), jnp.asarray(u), mixed))
    alone = [int(_draw(logits[r : r + 1], u[r : r + 1], **kw)[0]) for r, kw in enumerate(rows)]
    np.testing.assert_array_equal(together, alone)


def test_parameters_are_traced_not_compiled_in():
    traces = []

    @jax.jit
    def sample_fn(logits, u, params):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return sample(logits, u, params)

    logits, u = jnp.zeros((2, V)), jnp.full((2,), 0.5)
    for kw in [dict(), dict(temperature=0.3), dict(top_k=4), dict(top_p=0.2), dict(temperature=0.0, top_k=1),
               dict(min_p=0.3), dict(logit_bias={"a": -1.0})]:
        sample_fn(logits, u, _params(2, V, **kw))
    assert len(traces) == 1


def test_uniforms_depend_only_on_seed_row_and_step():
    a = sampling.sampling_uniforms(5, 4, 30)
    assert a.shape == (4, 30) and a.dtype == np.float32 and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(sampling.sampling_uniforms(5, 2, 30), a[:2])  # batch size
    np.testing.assert_array_equal(sampling.sampling_uniforms(5, 4, 10, first_step=20), a[:, 20:])  # chunking
    keys = sampling.row_keys(np.full(2, 5), np.array([2, 3]))  # rows placed elsewhere (another slot)
    np.testing.assert_array_equal(np.asarray(sampling.step_uniforms(keys, 7)), a[2:, 7])
    assert not np.array_equal(a[0], a[1])  # rows differ
    assert not np.array_equal(sampling.sampling_uniforms(6, 4, 30), a)  # seeds differ
    # A list of seeds gives row r the stream (seed[r], 0).
    listed = sampling.sampling_uniforms([5, 9], 2, 30)
    np.testing.assert_array_equal(listed[0], a[0])
    np.testing.assert_array_equal(listed[1], sampling.sampling_uniforms(9, 1, 30)[0])


def test_matches_torch_twin():
    torch = pytest.importorskip("torch")
    from porting.torch_reference import adjust_logits, filter_logits, inverse_cdf_pick

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(256, 26)) * rng.uniform(0.5, 4, size=(256, 1))).astype(np.float32)
    u = rng.uniform(size=256).astype(np.float32)
    window = rng.integers(0, 26, (256, 16))
    length = rng.integers(1, 17, 256)
    for t, k, p, m, rp, bias in [(1.0, None, None, None, None, None), (0.8, 20, 0.9, None, None, None),
                                 (1.3, None, 0.5, None, None, None), (0.7, 5, None, None, None, None),
                                 (2.0, 26, 1.0, None, None, None), (1.0, None, None, 0.1, None, None),
                                 (0.9, 10, 0.95, 0.05, 1.3, {"a": 2.0, "c": float("-inf")})]:
        ours = _draw(logits, u, window, length, temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=rp,
                     logit_bias=bias)
        bias_row = torch.zeros(26)
        for char, b in (bias or {}).items():
            bias_row[ord(char) - ord("a")] = b
        windows = [torch.from_numpy(window[r, : length[r]]) for r in range(256)]
        adjusted = adjust_logits(torch.from_numpy(logits), bias_row, rp, windows)
        theirs = inverse_cdf_pick(filter_logits(adjusted, t, k, p, m), torch.from_numpy(u)).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"temperature={t} top_k={k} top_p={p} min_p={m}")
