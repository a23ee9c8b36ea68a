"""jaxgpt.GPT itself: exact values on tiny hand-built parameters, causality, determinism, dropout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPTConfig, init_cache
from porting import keymap, model_from_params
from tests.porting_helpers import jitted_logits

EPS = 1e-5  # torch.nn.LayerNorm's default


def zero_params(config: GPTConfig) -> dict[str, np.ndarray]:
    params = {k: np.zeros(s, np.float32) for k, s in keymap.layout(config, "flax").items()}
    for k in params:
        if k.endswith(".scale"):
            params[k][:] = 1.0
    return params


def random_params(config: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(1.0 if k.endswith(".scale") else 0.0, 0.5, s).astype(np.float32)
            for k, s in keymap.layout(config, "flax").items()}


# ----------------------------------------------------------------------------- exact values
def test_logits_by_hand_with_silent_blocks():
    """qkv, MLP kernels zero: x = tok + pos + out_bias + down_bias; the rest is one LayerNorm.

    With D = 2, LayerNorm([a, b]) = [n, -n] with n = ((a - b) / 2) / sqrt(((a - b) / 2)^2 + eps),
    so with kernel [[1, 0, 2], [0, 1, -1]] and bias [0, 0.25, 0] the logits are [n, 0.25 - n, 3n].
    """
    config = GPTConfig(vocab_size=3, context_length=4, model_dim=2, num_blocks=1, num_heads=1)
    p = zero_params(config)
    p["token_embedding.embedding"][:] = [[1, -1], [2, 0], [0, 0]]
    p["pos_embedding.embedding"][:] = [[0, 0], [0, 1], [0, 2], [0, 3]]
    p["blocks.0.attention.out_bias"][:] = [0.5, -0.5]  # cancels the MLP's output bias
    p["blocks.0.mlp.down.bias"][:] = [-0.5, 0.5]
    p["blocks.0.mlp.up.bias"][:] = 7.0  # relu(7) times a zero kernel: no effect
    p["vocab_projection.kernel"][:] = [[1, 0, 2], [0, 1, -1]]
    p["vocab_projection.bias"][:] = [0, 0.25, 0]
    logits = jitted_logits(model_from_params(p, config))(np.array([[0, 1, 2]]))

    def n(a, b):
        return ((a - b) / 2) / math.sqrt(((a - b) / 2) ** 2 + EPS)

    expected = [[n(a, b), 0.25 - n(a, b), 3 * n(a, b)] for a, b in ([1, -1], [2, 1], [0, 2])]
    np.testing.assert_allclose(logits[0], expected, rtol=0, atol=1e-6)


def test_uniform_attention_averages_values_by_hand():
    """Zero queries: every position attends uniformly to itself and the positions before it."""
    config = GPTConfig(vocab_size=2, context_length=3, model_dim=2, num_blocks=1, num_heads=1)
    p = zero_params(config)
    p["token_embedding.embedding"][:] = [[3, 1], [0, 4]]
    p["blocks.0.attention.qkv"][:, 2, 0, :] = np.eye(2)  # values = LayerNorm(x), queries = keys = 0
    p["blocks.0.attention.out_kernel"][0] = np.eye(2)
    p["vocab_projection.kernel"][:] = np.eye(2)
    logits = jitted_logits(model_from_params(p, config))(np.array([[0, 1, 0]]))
    ln = lambda v: (v - v.mean()) / math.sqrt(((v - v.mean()) ** 2).mean() + EPS)
    x = np.array([[3.0, 1.0], [0.0, 4.0], [3.0, 1.0]])
    values = np.stack([ln(v) for v in x])  # [c, -c], [-c', c'], [c, -c]
    mixed = x + np.stack([values[: t + 1].mean(0) for t in range(3)])
    np.testing.assert_allclose(logits[0], np.stack([ln(v) for v in mixed]), rtol=0, atol=1e-6)


def numpy_forward(p: dict[str, np.ndarray], config: GPTConfig, tokens: np.ndarray) -> np.ndarray:
    """The spec's forward pass, head by head, in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    ln = lambda x, pre: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS) * p[pre + ".scale"] + p[pre + ".bias"]
    t = tokens.shape[1]
    x = p["token_embedding.embedding"][tokens] + p["pos_embedding.embedding"][:t]
    mask = np.tril(np.ones((t, t), bool))
    for i in range(config.num_blocks):
        b = f"blocks.{i}"
        h = ln(x, b + ".norm1")
        heads = []
        for j in range(config.num_heads):
            q, k, v = (h @ p[b + ".attention.qkv"][:, c, j, :] for c in range(3))
            s = np.where(mask, q @ k.swapaxes(1, 2) / math.sqrt(config.head_size), -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append(w / w.sum(-1, keepdims=True) @ v)
        a = np.concatenate(heads, -1)
        if config.variant == "drake":
            a = a @ p[b + ".attention.out_kernel"].reshape(config.model_dim, config.model_dim) + p[b + ".attention.out_bias"]
        x = x + a
        u = np.maximum(ln(x, b + ".norm2") @ p[b + ".mlp.up.kernel"] + p[b + ".mlp.up.bias"], 0)
        x = x + u @ p[b + ".mlp.down.kernel"] + p[b + ".mlp.down.bias"]
    return ln(x, "final_norm") @ p["vocab_projection.kernel"] + p["vocab_projection.bias"]


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_matches_a_head_by_head_numpy_forward(variant):
    config = GPTConfig(vocab_size=5, context_length=6, model_dim=6, num_blocks=2, num_heads=3, variant=variant)
    p = random_params(config, seed=1)
    tokens = np.random.default_rng(1).integers(0, 5, size=(2, 6))
    got = jitted_logits(model_from_params(p, config))(tokens)
    np.testing.assert_allclose(got, numpy_forward(p, config, tokens), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_causality(variant):
    """Changing token p never changes the logits before p (bit for bit), and does change p's."""
    config = GPTConfig(vocab_size=9, context_length=8, model_dim=12, num_blocks=2, num_heads=3, variant=variant)
    logits_fn = jitted_logits(model_from_params(random_params(config, 2), config))
    tokens = np.random.default_rng(2).integers(0, 9, size=(2, 8))
    base = logits_fn(tokens)
    for pos in range(8):
        changed = tokens.copy()
        changed[:, pos] = (changed[:, pos] + 1 + pos) % 9
        out = logits_fn(changed)
        np.testing.assert_array_equal(out[:, :pos], base[:, :pos])
        assert np.abs(out[:, pos] - base[:, pos]).max() > 1e-3


def test_eval_mode_is_deterministic_and_the_default():
    config = GPTConfig(vocab_size=7, context_length=5, model_dim=8, num_blocks=1, num_heads=2)
    model = model_from_params(random_params(config, 3), config)
    assert not model.training
    tokens = np.random.default_rng(3).integers(0, 7, size=(3, 5))
    first = jitted_logits(model)(tokens)
    np.testing.assert_array_equal(jitted_logits(model)(tokens), first)


def train_logits(model):
    """`(tokens, key) -> logits` of a model in training mode, compiled once."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, k: nnx.merge(graphdef, s)(t, rngs=k))
    return lambda tokens, key: np.asarray(forward(state, tokens, key))


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_dropout_only_in_train_mode(variant):
    config = GPTConfig(vocab_size=7, context_length=5, model_dim=8, num_blocks=2, num_heads=2, variant=variant)
    model = model_from_params(random_params(config, 4), config)
    tokens = np.random.default_rng(4).integers(0, 7, size=(2, 5))
    eval_logits = jitted_logits(model)(tokens)
    model.train()
    assert model.training
    with pytest.raises(ValueError, match="rngs"):
        model(tokens)
    train = train_logits(model)
    a, b = train(tokens, jax.random.key(0)), train(tokens, jax.random.key(1))
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - eval_logits).max() > 1e-3
    np.testing.assert_array_equal(train(tokens, jax.random.key(0)), a)
    model.eval()
    np.testing.assert_array_equal(jitted_logits(model)(tokens), eval_logits)
    # With rate 0 the training forward is the eval forward.
    quiet = model_from_params(random_params(config, 4), config.replace(dropout=0.0))
    quiet.train()
    np.testing.assert_allclose(train_logits(quiet)(tokens, jax.random.key(0)), eval_logits, rtol=0, atol=1e-6)


def test_kv_cache_matches_the_full_forward():
    config = GPTConfig(vocab_size=9, context_length=8, model_dim=12, num_blocks=2, num_heads=3)
    model = model_from_params(random_params(config, 5), config)
    tokens = np.random.default_rng(5).integers(0, 9, size=(2, 8))
    full = jitted_logits(model)(tokens)
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))
    decode = jax.jit(lambda s, t, c, p: nnx.merge(graphdef, s).decode(t, c, p))
    cache = prefill(state, tokens[:, :3], init_cache(config, 2))  # positions 0..2
    for t in range(3, 8):
        logits, cache = decode(state, tokens[:, t : t + 1], cache, np.full(2, t, np.int32))
        assert logits.shape == (2, 9)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=0, atol=1e-5)


def test_decode_takes_one_position_per_row():
    """Rows at different positions in one decode call: each equals its own full forward."""
    config = GPTConfig(vocab_size=9, context_length=8, model_dim=12, num_blocks=2, num_heads=3)
    model = model_from_params(random_params(config, 8), config)
    tokens = np.random.default_rng(8).integers(0, 9, size=(3, 8))
    full = np.asarray(jitted_logits(model)(tokens))
    graphdef, state = nnx.split(model)
    cache = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))(state, tokens, init_cache(config, 3))
    positions = np.array([1, 5, 7], np.int32)  # row b sees tokens 0..positions[b]
    step = tokens[np.arange(3), positions][:, None]
    logits, _ = jax.jit(lambda s, t, c, p: nnx.merge(graphdef, s).decode(t, c, p))(state, step, cache, positions)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(3), positions], rtol=0, atol=1e-5)


@pytest.mark.parametrize("context", [48, 12])  # 3 blocks of DECODE_BLOCK; 12 is read whole (no multiple of 16)
def test_blocked_decode_of_many_rows_matches_the_full_forward_and_ignores_the_other_rows(context):
    """From BLOCKED_DECODE_ROWS rows (and a context that DECODE_BLOCK divides) a decode step reads
    the cache in blocks, as many as the furthest row needs: each row still equals its own full
    forward, and its bits do not change when the other rows make the loop read more blocks (all
    at position 0 against all at the end)."""
    from jaxgpt import model as model_module

    rows = model_module.BLOCKED_DECODE_ROWS + 2
    assert model_module.decodes_in_blocks(rows, context) == (context == 48)
    config = GPTConfig(vocab_size=9, context_length=context, model_dim=12, num_blocks=2, num_heads=3)
    model = model_from_params(random_params(config, 9), config)
    tokens = np.random.default_rng(9).integers(0, 9, size=(rows, context))
    full = np.asarray(jitted_logits(model)(tokens))
    graphdef, state = nnx.split(model)
    cache = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))(state, tokens, init_cache(config, rows))
    decode = jax.jit(lambda s, t, c, p: nnx.merge(graphdef, s).decode(t, c, p)[0])
    positions = np.array([0, 1, 15, 16, 17, 31, 32, 33, context - 2, context - 1][:rows], np.int32) % context
    step = tokens[np.arange(rows), positions][:, None]
    logits = np.asarray(decode(state, step, cache, positions))
    np.testing.assert_allclose(logits, full[np.arange(rows), positions], rtol=0, atol=1e-5)
    for row in (1, 3, rows - 1):
        for others in (0, context - 1):
            moved = np.full(rows, others, np.int32)
            moved[row] = positions[row]
            alone = np.asarray(decode(state, tokens[np.arange(rows), moved][:, None], cache, moved))
            np.testing.assert_array_equal(alone[row], logits[row])


def test_blocked_and_whole_cache_attention_agree():
    """The two decode attentions on the same random queries, keys, values and cache."""
    from jaxgpt import model as model_module
    from jaxgpt.model import LayerCache

    rng = np.random.default_rng(10)
    b, h, k, c = 5, 3, 7, 64
    q, key, value = (rng.normal(size=(b, h, 1, k)).astype(np.float32) for _ in range(3))
    cache = LayerCache(rng.normal(size=(b, h, k, c)).astype(np.float32), rng.normal(size=(b, h, c, k)).astype(np.float32))
    positions = np.array([0, 5, 16, 40, 63], np.int32)
    whole = np.asarray(model_module._attend_whole_cache(q, key, value, cache, positions))
    blocked = np.asarray(jax.jit(model_module._attend_in_blocks)(q, key, value, cache, positions))
    assert whole.shape == blocked.shape == (b, 1, h, k)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-6)
    # bfloat16 queries over a float32 cache: the running values stay float32, the result bfloat16.
    half = jax.jit(model_module._attend_in_blocks)(*(a.astype(jnp.bfloat16) for a in (q, key, value)), cache, positions)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), whole, rtol=0, atol=5e-2)


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_encode_window_gives_the_logits_at_last_and_the_prefill_cache(variant):
    config = GPTConfig(vocab_size=9, context_length=8, model_dim=12, num_blocks=2, num_heads=3, variant=variant)
    model = model_from_params(random_params(config, 6), config)
    tokens = np.random.default_rng(6).integers(0, 9, size=(2, 6))
    full = np.asarray(jitted_logits(model)(tokens))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, t, c, last: nnx.merge(graphdef, s).encode_window(t, c, last))
    last = np.array([5, 2], np.int32)
    logits, cache = encode(state, tokens, init_cache(config, 2), last)
    assert logits.shape == (2, 9)
    np.testing.assert_allclose(np.asarray(logits), full[np.arange(2), last], rtol=0, atol=1e-5)
    prefilled = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).prefill(t, c))(state, tokens, init_cache(config, 2))
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(prefilled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _plain_causal_attention(qkv):  # (B, T, 3, H, K): the formula, differentiated by JAX
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, K) each
    t = q.shape[2]
    scores = jax.numpy.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jax.numpy.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    return jax.numpy.einsum("bhts,bhsk->bthk", jax.nn.softmax(scores, axis=-1), v)  # (B, T, H, K)


def test_causal_attention_backward_matches_autodiff():
    from jaxgpt.ops import causal_attention

    rng = np.random.default_rng(7)
    qkv = rng.normal(0, 1, (2, 5, 3, 3, 4)).astype(np.float32)  # B, T, (q, k, v), H, K
    d_out = rng.normal(0, 1, (2, 5, 3, 4)).astype(np.float32)  # B, T, H, K
    out, vjp = jax.jit(lambda a: jax.vjp(causal_attention, a))(qkv)
    want_out, want_vjp = jax.vjp(_plain_causal_attention, qkv)
    assert out.shape == want_out.shape == d_out.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=0, atol=1e-6)
    (got,), (want,) = vjp(d_out), want_vjp(d_out)
    assert got.shape == want.shape == qkv.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
    # A query's output must not depend on later keys or values: their gradients are zero.
    only_first = np.zeros_like(d_out)
    only_first[:, 0] = 1.0
    (d_qkv,) = vjp(only_first)
    assert np.all(np.asarray(d_qkv)[:, 1:, 1:] == 0) and np.any(np.asarray(d_qkv)[:, 0, 1:] != 0)


def test_layer_norm_is_flax_s_forward_with_the_autodiff_gradients():
    """`jaxgpt.ops.layer_norm`: flax's LayerNorm (torch's variance) bit for bit, and its
    hand-written backward equals autodiff of that forward for x, scale and bias."""
    from jaxgpt.ops import layer_norm

    rng = np.random.default_rng(3)
    x = (rng.normal(0, 2, (3, 5, 16)) + 4).astype(np.float32)  # an offset mean tests the centring
    scale, bias = rng.normal(1, 0.5, 16).astype(np.float32), rng.normal(0, 0.5, 16).astype(np.float32)
    d_out = rng.normal(0, 1, x.shape).astype(np.float32)
    graphdef, _ = nnx.split(nnx.LayerNorm(16, epsilon=EPS, use_fast_variance=False, rngs=nnx.Rngs(0)))

    def plain(x, scale, bias):  # flax's module, differentiated by JAX
        return nnx.merge(graphdef, nnx.State({"scale": nnx.Param(scale), "bias": nnx.Param(bias)}))(x)

    out, vjp = jax.jit(lambda *a: jax.vjp(layer_norm, *a))(x, scale, bias)
    want_out, want_vjp = jax.jit(lambda *a: jax.vjp(plain, *a))(x, scale, bias)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    for got, want in zip(vjp(d_out), want_vjp(d_out)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * np.abs(want).max())
    # The input gradient of a normalisation is orthogonal to constant shifts of the input.
    d_x = np.asarray(vjp(d_out)[0])
    np.testing.assert_allclose(d_x.sum(-1), 0, atol=1e-5)


# ----------------------------------------------------------------------------- construction
INIT_CONFIG = GPTConfig(vocab_size=11, context_length=8, model_dim=12, num_blocks=3, num_heads=3)  # sqrt(2 * 3) is inexact
# SHA-256 (first 16 hex digits) of every parameter of GPT(config, rngs=...), by path, computed
# on main before the constructors learned ShapeOnly (b4bb10e): initialisation must not move.
INIT_DIGESTS = {
    ("drake", "default"): "29c54c00bf255e93", ("drake", "Rngs(3)"): "a9c22d7c8c285415",
    ("drake", "Rngs(params=5, dropout=1)"): "9bd4d79be8c0a318",
    ("learning", "default"): "412c12d97ba3b9eb", ("learning", "Rngs(3)"): "b4b85f79f9c737f2",
    ("learning", "Rngs(params=5, dropout=1)"): "da194bae5e02c148",
}
INIT_KEYS_DRAWN = {"drake": 15, "learning": 12}  # keys drawn from the params stream, as on main


def _digest(model) -> str:
    import hashlib

    from porting import params_from_model

    h = hashlib.sha256()
    for path, value in sorted(params_from_model(model).items()):
        h.update(path.encode())
        h.update(str(value.shape).encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_initialisation_is_unchanged(variant):
    from jaxgpt.model import GPT

    config = INIT_CONFIG.replace(variant=variant)
    rngs = {"default": None, "Rngs(3)": nnx.Rngs(3), "Rngs(params=5, dropout=1)": nnx.Rngs(params=5, dropout=1)}
    for name, r in rngs.items():
        assert _digest(GPT(config, rngs=r)) == INIT_DIGESTS[variant, name], name
    assert int(rngs["Rngs(3)"].params.count[...]) == INIT_KEYS_DRAWN[variant]
    assert int(rngs["Rngs(params=5, dropout=1)"].dropout.count[...]) == 0


@pytest.mark.parametrize("variant", ["drake", "learning"])
def test_shape_only_construction_is_eval_shape_s_structure(variant):
    """`GPT(config, rngs=ShapeOnly())` computes nothing and gives what `nnx.eval_shape` traces:
    the same graphdef (static attributes, modes), paths, variable types, shapes and dtypes."""
    from jaxgpt.model import GPT, ShapeOnly

    config = INIT_CONFIG.replace(variant=variant)
    graphdef, state = nnx.split(GPT(config, rngs=ShapeOnly()))
    want_graphdef, want_state = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    assert graphdef == want_graphdef

    def described(s):
        return [(path, type(v), v.get_metadata(), v.get_value()) for path, v in nnx.to_flat_state(s)]

    got, want = described(state), described(want_state)
    assert got == want  # ShapeDtypeStructs compare by shape, dtype and sharding
    assert all(type(value) is jax.ShapeDtypeStruct for *_, value in got)
    assert len(got) == len(keymap.layout(config, "flax"))
