"""Sampling rules: definitions, greedy, distributions, traced parameters, per-row randomness."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import sampling
from jaxgpt.sampling import Greedy, Multinomial, Sampling, TopK, TopP, make_params, sample

V = 10


def _draw(logits, u, **kw):
    params = make_params(vocab_size=logits.shape[-1], **kw)
    return np.asarray(sampling._sample_jit(jnp.asarray(logits, jnp.float32), jnp.asarray(u, jnp.float32), params))


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
])
def test_make_params_rejects(kw, message):
    with pytest.raises(ValueError, match=message):
        make_params(vocab_size=V, **kw)


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


def test_parameters_are_traced_not_compiled_in():
    traces = []

    @jax.jit
    def sample_fn(logits, u, params):
        traces.append(1)  # runs once per trace, i.e. per compilation
        return sample(logits, u, params)

    logits, u = jnp.zeros((2, V)), jnp.full((2,), 0.5)
    for kw in [dict(), dict(temperature=0.3), dict(top_k=4), dict(top_p=0.2), dict(temperature=0.0, top_k=1)]:
        sample_fn(logits, u, make_params(vocab_size=V, **kw))
    assert len(traces) == 1


def test_method_views():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    key = jax.random.key(3)
    np.testing.assert_array_equal(Greedy().get_next_tokens(logits, key), [1, 0])
    np.testing.assert_array_equal(TopK(k=1).get_next_tokens(logits, key), [1, 0])
    np.testing.assert_array_equal(TopP(p=1e-6).get_next_tokens(logits, key), [1, 0])
    assert Multinomial().params(3).top_k == 3
    assert Sampling(temperature=0.5, top_k=2, top_p=0.9).params(3).top_k == 2
    with pytest.raises(ValueError, match="top_p"):
        TopP(p=0.0).get_next_tokens(logits, key)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TopK(k=2).k = 3


def test_uniforms_depend_only_on_seed_row_and_step():
    a = sampling.sampling_uniforms(5, 4, 30)
    assert a.shape == (4, 30) and a.dtype == np.float32 and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(sampling.sampling_uniforms(5, 2, 30), a[:2])  # batch size
    np.testing.assert_array_equal(sampling.sampling_uniforms(5, 4, 10, first_step=20), a[:, 20:])  # chunking
    keys = sampling.row_keys(5, 2, first_row=2)  # rows placed elsewhere (e.g. another device)
    np.testing.assert_array_equal(np.asarray(sampling.step_uniforms(keys, 7)), a[2:, 7])
    assert not np.array_equal(a[0], a[1])  # rows differ
    assert not np.array_equal(sampling.sampling_uniforms(6, 4, 30), a)  # seeds differ


def test_matches_torch_twin():
    torch = pytest.importorskip("torch")
    from porting.torch_reference import filter_logits, inverse_cdf_pick

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(256, 104)) * rng.uniform(0.5, 4, size=(256, 1))).astype(np.float32)
    u = rng.uniform(size=256).astype(np.float32)
    for t, k, p in [(1.0, None, None), (0.8, 20, 0.9), (1.3, None, 0.5), (0.7, 5, None), (2.0, 104, 1.0)]:
        ours = _draw(logits, u, temperature=t, top_k=k, top_p=p)
        theirs = inverse_cdf_pick(filter_logits(torch.from_numpy(logits), t, k, p), torch.from_numpy(u)).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"temperature={t} top_k={k} top_p={p}")
