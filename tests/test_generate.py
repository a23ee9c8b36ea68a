"""The compiled generation engine against plain re-encoding loops, and what (re)compiles.

All on a small configuration (C = 16) so that every phase (prefill, cached growth, window
slide, strided refills) is crossed in a few dozen steps.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import jaxgpt
from jaxgpt import engine
from jaxgpt.config import GPTConfig
from jaxgpt.generate import Sampler, generate, generate_tokens, stream_text, stream_tokens
from jaxgpt.options import Options
from jaxgpt.model import GPT
from jaxgpt.sampling import sample, sampling_uniforms
from jaxgpt.vocab import Vocab, VocabError

C = 16
CONFIG = GPTConfig(vocab_size=12, context_length=C, model_dim=24, num_blocks=2, num_heads=3)
VOCAB = Vocab(tuple("\n abcdefghij"))


@pytest.fixture(scope="module")
def model():
    return GPT(CONFIG, rngs=nnx.Rngs(3))


@functools.cache
def _full_forward(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


_sample_jit = jax.jit(sample)


def sample_rows(logits, u, window=None, length=None, **options):
    """`jaxgpt.sampling.sample` with one `Options` for every row of `logits` `(B, V)`."""
    _, params, *_ = Options(**options).engine_row(VOCAB, logits.shape[-1], C)
    params = jax.tree.map(lambda a: np.broadcast_to(a, (logits.shape[0], *np.shape(a))), params)
    return np.asarray(_sample_jit(logits, u, params, window, length))


def reference_loop(model, context, num_new, seed, keep=C, **kw):
    """The notebook's loop, step by step: full forward of the kept window, same sampler and uniforms.

    keep = C is the notebook's crop to the last C tokens; keep < C drops C + 1 - keep tokens
    at once whenever the window overflows (strided mode), with the window then growing again.
    The window is right-padded to C so one compiled forward serves every length (causal: the
    padding cannot change the logits at the window's last token).
    """
    context = np.asarray(context, np.int32)
    if context.shape[1] == 0:
        context = np.zeros((context.shape[0], 1), np.int32)
    stream, start = context, max(0, context.shape[1] - C)
    u = sampling_uniforms(seed, context.shape[0], num_new)
    graphdef, state = nnx.split(model)
    forward = _full_forward(graphdef)
    for j in range(num_new):
        if stream.shape[1] - start > C:
            start = stream.shape[1] - keep
        window = stream[:, start:]
        padded = np.pad(window, ((0, 0), (0, C - window.shape[1])))
        logits = np.asarray(forward(state, padded))[:, window.shape[1] - 1]
        token = sample_rows(logits, u[:, j], padded, np.full(len(padded), window.shape[1]), **kw)
        stream = np.concatenate([stream, token[:, None]], axis=1)
    return stream[:, context.shape[1]:]


SETTINGS = [dict(), dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=0.0)]


@pytest.mark.parametrize("prompt_len", [0, 1, 5, C - 1, C, C + 7])
def test_exact_mode_is_the_notebook_loop(model, prompt_len):
    context = np.random.default_rng(prompt_len).integers(0, CONFIG.vocab_size, (2, prompt_len))
    for kw in SETTINGS:
        got = generate_tokens(model, context, 2 * C + 5, seed=11, **kw)
        np.testing.assert_array_equal(got, reference_loop(model, context, 2 * C + 5, 11, **kw), err_msg=str(kw))


@pytest.mark.parametrize("stride", [3, C])
def test_strided_mode_drops_stride_tokens_at_once(model, stride):
    context = np.array([[3, 1, 4, 1, 5]])
    got = generate_tokens(model, context, 3 * C + 3, seed=5, mode="strided", stride=stride)
    want = reference_loop(model, context, 3 * C + 3, 5, keep=C + 1 - stride)
    np.testing.assert_array_equal(got, want)
    exact = generate_tokens(model, context, 3 * C + 3, seed=5)
    n_cached = C - context.shape[1] + 1  # tokens drawn before the window first overflows
    np.testing.assert_array_equal(got[:, :n_cached], exact[:, :n_cached])


def test_stride_one_is_exact_mode(model):
    context = np.array([[2, 7]])
    np.testing.assert_array_equal(generate_tokens(model, context, 3 * C, seed=1, mode="strided", stride=1),
                                  generate_tokens(model, context, 3 * C, seed=1))


@pytest.mark.parametrize("mode", ["exact", "strided"])
def test_streaming_equals_one_call(model, mode):
    context = np.array([[1, 2, 3], [4, 5, 6]])
    whole = generate_tokens(model, context, 3 * C, seed=9, top_p=0.8, mode=mode)
    for chunk_size in (1, 7, 3 * C):
        chunks = list(stream_tokens(model, context, 3 * C, seed=9, top_p=0.8, mode=mode, chunk_size=chunk_size))
        assert [c.shape[1] for c in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
        np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole, err_msg=f"chunk_size={chunk_size}")


def test_rows_are_independent_and_reproducible(model):
    context = np.zeros((3, 4), np.int32)
    a = generate_tokens(model, context, 2 * C, seed=4)
    np.testing.assert_array_equal(a, generate_tokens(model, context, 2 * C, seed=4))
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    # A row's tokens do not depend on the batch size.
    np.testing.assert_array_equal(generate_tokens(model, context[:1], 2 * C, seed=4), a[:1])
    assert not np.array_equal(generate_tokens(model, context, 2 * C, seed=5), a)


def test_what_compiles():
    """Seeds, sampling values, modes, prompts and their lengths within a bucket, lengths and
    chunking reuse the compiled programs; slot counts and prefill buckets compile anew."""
    # A configuration no other test compiles, with a window long enough for several prompt buckets.
    model = GPT(CONFIG.replace(vocab_size=13, context_length=64), rngs=nnx.Rngs(0))

    def run(context, num_new=20, **kw):
        list(stream_tokens(model, np.asarray(context), num_new, **kw))
        return dict(engine.TRACE_COUNTS)

    base = run([[1, 2, 3]])
    for kw in [dict(seed=7), dict(temperature=0.3), dict(temperature=0.0), dict(top_k=3), dict(top_p=0.5),
               dict(top_k=1, top_p=0.2, temperature=2.0), dict(chunk_size=6), dict(mode="strided"),
               dict(mode="strided", stride=5), dict(num_new=300)]:
        assert run([[1, 2, 3]], **kw) == base, kw
    assert run([[4, 4, 4]]) == base  # prompt content

    def delta(counts):
        return {k: counts.get(k, 0) - base.get(k, 0) for k in ("prefill", "insert", "generate")}

    # The prefill (all but the last prompt token) compiles once per power of two.
    assert delta(run([[5] * 16])) == {"prefill": 1, "insert": 0, "generate": 0}
    assert delta(run([[5] * 10])) == {"prefill": 1, "insert": 0, "generate": 0}  # 15 or 9 prefilled: 16
    assert delta(run([[]])) == {"prefill": 1, "insert": 1, "generate": 0}  # nothing prefilled: insert zeros
    assert delta(run([[7]])) == {"prefill": 1, "insert": 1, "generate": 0}
    assert delta(run([[1, 2, 3], [4, 5, 6]])) == {"prefill": 1, "insert": 2, "generate": 1}  # 2 slots
    # A Sampler, and a second model of the same configuration, reuse the programs too.
    counts = dict(engine.TRACE_COUNTS)
    twin = GPT(CONFIG.replace(vocab_size=13, context_length=64), rngs=nnx.Rngs(1))
    list(stream_tokens(Sampler(twin), np.asarray([[1, 2, 3]]), 20))
    list(stream_tokens(Sampler(model), np.asarray([[1, 2, 3]]), 20, seed=9))
    assert dict(engine.TRACE_COUNTS) == counts


def test_long_prompt_is_cropped(model):
    context = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 3 * C))
    np.testing.assert_array_equal(generate_tokens(model, context, 10, seed=3),
                                  generate_tokens(model, context[:, -C:], 10, seed=3))


def test_text_api(model, tmp_path):
    text = generate(model, "abc", 40, vocab=VOCAB, seed=1, temperature=0.8)
    assert isinstance(text, str) and len(text) == 40 and set(text) <= set(VOCAB.chars)
    tokens = generate_tokens(model, VOCAB.encode("abc")[None], 40, seed=1, temperature=0.8)
    assert text == VOCAB.decode(tokens[0])
    chunks = list(stream_text(model, "abc", 40, batch=2, vocab=VOCAB, chunk_size=16, seed=1, temperature=0.8))
    assert [len(c) for c in chunks] == [2, 2, 2]
    assert "".join(c[0] for c in chunks) == text
    path = tmp_path / "vocab.json"
    VOCAB.save(path)
    assert generate(model, "abc", 40, vocab=str(path), seed=1, temperature=0.8) == text


def test_text_api_errors(model):
    with pytest.raises(VocabError, match="'z'"):
        generate(model, "az", 5, vocab=VOCAB)
    with pytest.raises(ValueError, match="vocab_size is 12"):
        generate(model, "a", 5)  # the default vocabulary has 104 characters
    with pytest.raises(ValueError, match="batch"):
        stream_text(model, "a", 5, batch=0, vocab=VOCAB)


@pytest.mark.parametrize("kw, message", [
    (dict(context=[[1, 2]], num_new=0), "positive integer"),
    (dict(context=[[1, 12]]), "token id 12"),
    (dict(context=[[-1]]), "token id -1"),
    (dict(context=[1, 2]), "shape"),
    (dict(context=[[0.5]]), "integer"),
    (dict(seed=-1), "seed"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(mode="fast"), "mode"),
    (dict(mode="strided", stride=C + 1), "stride"),
    (dict(mode="strided", stride=0), "stride"),
    (dict(stride=4), "stride applies"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_options_raise_before_running(model, kw, message):
    kw = dict(dict(context=[[1, 2]], num_new=5), **kw)
    before = dict(engine.TRACE_COUNTS)
    with pytest.raises(ValueError, match=message):
        stream_tokens(model, kw.pop("context"), kw.pop("num_new"), **kw)
    assert dict(engine.TRACE_COUNTS) == before


def test_sampler_gives_the_model_s_tokens_and_snapshots_its_parameters(model):
    sampler = Sampler(model)
    context = np.asarray([[1, 2, 3], [4, 5, 6]])
    for kw in SETTINGS:
        np.testing.assert_array_equal(generate_tokens(sampler, context, 2 * C, seed=3, **kw),
                                      generate_tokens(model, context, 2 * C, seed=3, **kw))
    assert generate(sampler, "abc", 20, vocab=VOCAB, seed=1) == generate(model, "abc", 20, vocab=VOCAB, seed=1)
    # Later changes to the model are not seen by an existing Sampler (it holds the old arrays).
    changed = GPT(CONFIG, rngs=nnx.Rngs(0))
    nnx.update(changed, nnx.state(model))
    before = generate_tokens(Sampler(changed), context, C, temperature=0)
    snapshot = Sampler(changed)
    changed.vocab_projection.bias[...] = changed.vocab_projection.bias[...].at[7].set(1e3)
    np.testing.assert_array_equal(generate_tokens(snapshot, context, C, temperature=0), before)
    assert (generate_tokens(changed, context, C, temperature=0) == 7).all()


def test_sampler_reuses_its_slots_memory_but_never_their_contents(model):
    sampler = Sampler(model)
    context = np.asarray([[1, 2, 3], [4, 5, 6]])
    expected = generate_tokens(model, context, 2 * C, seed=3)
    devices = jax.devices()[:1]
    spare = lambda: sampler._spare  # (key, slots) kept from the last finished run
    np.testing.assert_array_equal(generate_tokens(sampler, context, 2 * C, seed=3), expected)
    kept = spare()
    assert kept is not None and kept[0] == (2, tuple(devices))
    # The next run of that shape gets that memory (donated to the first insert) ...
    np.testing.assert_array_equal(generate_tokens(sampler, context, 2 * C, seed=3), expected)
    assert all(a.is_deleted() for a in jax.tree.leaves(kept[1].cache))
    # ... and a run of another shape does not, nor disturbs it.
    generate_tokens(sampler, context[:1], 5, seed=3)
    assert spare()[0] == (1, tuple(devices))
    # Whatever the kept slots' caches hold (here NaN everywhere), an inserted request never sees it.
    slots = sampler.take_slots(2, devices)
    poisoned = slots._replace(cache=jax.tree.map(lambda a: jax.numpy.full(a.shape, np.nan, a.dtype), slots.cache))
    sampler.keep_slots(2, devices, poisoned)
    np.testing.assert_array_equal(generate_tokens(sampler, context, 2 * C, seed=3), expected)
    np.testing.assert_array_equal(generate_tokens(sampler, context[:, :1], 2 * C, seed=3),
                                  generate_tokens(model, context[:, :1], 2 * C, seed=3))
    # An abandoned stream keeps nothing (its slots may be mid-way) and later runs are unaffected.
    chunks = stream_tokens(sampler, context, 2 * C, seed=3, chunk_size=4)
    next(chunks)
    del chunks
    np.testing.assert_array_equal(generate_tokens(sampler, context, 2 * C, seed=3), expected)


def test_training_mode_is_refused():
    m = GPT(CONFIG, rngs=nnx.Rngs(0))
    m.train()
    with pytest.raises(ValueError, match="training mode"):
        generate_tokens(m, [[1]], 3)
    with pytest.raises(ValueError, match="training mode"):
        Sampler(m)
    with pytest.raises(TypeError, match="must be a jaxgpt.GPT"):
        Sampler(object())


def test_public_api():
    assert jaxgpt.generate is generate and jaxgpt.generate_tokens is generate_tokens
