"""The notebook's character-level GPT as a Flax NNX module.

Mirrors the specification in `docs/SPEC.md` exactly (pre-norm blocks, ReLU MLP, learned absolute
positions, torch LayerNorm numerics) but computes all heads at once: the per-head torch
projections are fused into one `qkv` kernel by `porting.keymap`. Shapes use B batch, T query
length, C context length, D model_dim, H heads, K head_size, F hidden (4D), V vocab.

Entry points, one return type each:
  `model(tokens)`: logits of every position (training, evaluation, scoring);
  `model.prefill(tokens, cache)`: keys and values of a prompt into the KV cache;
  `model.decode(token, cache, positions)`: one new token per row at its own position;
  `model.encode_window(tokens, cache, last)`: a window re-encoded at positions 0..T-1, the
    cache refilled, logits at one index per row (generation once the context is full).

A freshly built GPT is in eval mode (dropout off, deterministic). `model.train()` turns dropout
on; a training call must then pass `rngs=`. `model.eval()` turns it off again.
`GPT(config, rngs=ShapeOnly())` is the structure alone, without values (what loaders fill in).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.ops import LAYER_NORM_EPS, causal_attention, layer_norm, project


class ShapeOnly:
    """An `nnx.Rngs` stand-in that builds a GPT's structure without its values.

    `GPT(config, rngs=ShapeOnly())` holds a `jax.ShapeDtypeStruct` (shape, float32) in every
    parameter, as `nnx.eval_shape` would give, but without tracing the constructor: nothing is
    drawn or computed. `nnx.split` it and merge the graphdef with loaded values (`porting`).
    """

    def params(self) -> "ShapeOnly":
        return self  # the "key" the initialisers below are given: they recognise it


def _shape_aware(init):
    """`init(key, shape, *dtype)`, except that `ShapeOnly`'s key gives the shape alone."""

    def draw(key, shape, *dtype):
        if isinstance(key, ShapeOnly):
            return jax.ShapeDtypeStruct(shape, jnp.float32)
        return init(key, shape, *dtype)

    return draw


def _constant(fill, shape, rngs) -> jax.Array | jax.ShapeDtypeStruct:
    """`fill(shape)` (`jnp.ones` / `jnp.zeros`; no key is drawn), or the shape alone under `ShapeOnly`."""
    return jax.ShapeDtypeStruct(shape, jnp.float32) if isinstance(rngs, ShapeOnly) else fill(shape)


_normal = nnx.initializers.normal(stddev=0.02)
_init = _shape_aware(_normal)

# The query/key/value product in 4 float32 chains: its rounding, amplified by the attention
# scores, is most of the logits' float32 error (benchmarks/results/parity_numerics.md).
QKV_PARTS = 4


class LayerCache(NamedTuple):
    """Keys and values of one block for every position of the context window.

    Each is stored in the layout its attention product reads (`q @ k` contracts K, `probs @ v`
    contracts C), so XLA multiplies the cache where it lies instead of transposing it per step.
    """

    k: jax.Array  # (B, H, K, C)
    v: jax.Array  # (B, H, C, K)


KVCache = tuple[LayerCache, ...]  # one LayerCache per block


def init_cache(config: GPTConfig, batch: int, dtype=jnp.float32) -> KVCache:
    """An all-zero cache per block; positions are masked out until written."""
    b, h, c, k = batch, config.num_heads, config.context_length, config.head_size
    return tuple(LayerCache(jnp.zeros((b, h, k, c), dtype), jnp.zeros((b, h, c, k), dtype))
                 for _ in range(config.num_blocks))


def _write_window(cache: LayerCache, new: LayerCache) -> LayerCache:
    """`new`'s T positions written at cache positions 0..T-1 of every row."""
    return LayerCache(jax.lax.dynamic_update_slice(cache.k, new.k.astype(cache.k.dtype), (0, 0, 0, 0)),
                      jax.lax.dynamic_update_slice(cache.v, new.v.astype(cache.v.dtype), (0, 0, 0, 0)))


class LayerNorm(nnx.Module):
    """torch's default LayerNorm (eps 1e-5, biased variance, affine)."""

    def __init__(self, dim: int, *, eps: float = LAYER_NORM_EPS, rngs: nnx.Rngs | ShapeOnly | None = None):
        self.eps = eps
        self.scale = nnx.Param(_constant(jnp.ones, (dim,), rngs))  # torch's `weight`
        self.bias = nnx.Param(_constant(jnp.zeros, (dim,), rngs))

    def __call__(self, x):  # (..., D) -> (..., D)
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Linear(nnx.Module):
    """`x @ kernel + bias`, through `ops.project` (whose kernel gradient suits XLA:CPU)."""

    def __init__(self, d_in: int, d_out: int, *, kernel_init, rngs: nnx.Rngs | ShapeOnly):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (d_in, d_out)))
        self.bias = nnx.Param(_constant(jnp.zeros, (d_out,), rngs))

    def __call__(self, x):  # (..., I) -> (..., O)
        return project(x, self.kernel[...]) + self.bias[...]


class Attention(nnx.Module):
    """Causal multi-head self-attention, all heads in one projection."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | ShapeOnly):
        d, h, k = config.model_dim, config.num_heads, config.head_size
        self.num_heads, self.head_size = h, k
        # Fused query/key/value projection, no bias (the notebook's heads have none).
        # Axis 1 is (query, key, value); torch head j's weight [K, D] is qkv[:, c, j, :].T.
        self.qkv = nnx.Param(_init(rngs.params(), (d, 3, h, k)))
        if config.variant == "drake":
            # `compute`: Linear(D, D) over the heads concatenated in order j = 0..H-1.
            out_init = _shape_aware(lambda key, shape: _normal(key, shape) / math.sqrt(2 * config.num_blocks))
            self.out_kernel = nnx.Param(out_init(rngs.params(), (h, k, d)))
            self.out_bias = nnx.Param(_constant(jnp.zeros, (d,), rngs))
        else:  # "learning": the concatenated heads go straight to the residual stream
            self.out_kernel = None
            self.out_bias = None

    def __call__(self, x):
        """Every position attends to itself and the earlier ones.

        Args:
          x: `(B, T, D)` normalised inputs at positions 0..T-1.

        Returns:
          `(B, T, D)` attention output, and the T positions' keys and values (`LayerCache`).
        """
        qkv = self._qkv(x)  # (B, T, 3, H, K)
        return self._output(causal_attention(qkv)), self._keys_values(qkv)

    def last(self, x, last):
        """Like `__call__`, but only the query at index `last[b]` of each row attends.

        Args:
          x: `(B, T, D)` normalised inputs at positions 0..T-1.
          last: int `(B,)` query index per row.

        Returns:
          `(B, 1, D)` attention output, and the T positions' keys and values.
        """
        qkv = self._qkv(x)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, K) each
        q = jnp.take_along_axis(q, last[:, None, None, None], axis=2)  # (B, H, 1, K)
        scores = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(self.head_size)  # (B, H, 1, T)
        scores = jnp.where(jnp.arange(k.shape[2]) <= last[:, None, None, None], scores, -jnp.inf)
        heads = jnp.einsum("bhts,bhsk->bthk", jax.nn.softmax(scores, axis=-1), v)  # (B, 1, H, K)
        return self._output(heads), self._keys_values(qkv)

    def decode(self, x, cache: LayerCache, positions):
        """One new position per row attends to the cached positions before it and to itself.

        Args:
          x: `(B, 1, D)` normalised input of each row's new token.
          cache: keys and values of positions 0..positions[b]-1 of row b (later ones masked).
          positions: int `(B,)` position of each row's new token (< C).

        Returns:
          `(B, 1, D)` attention output, and the cache with the new keys and values written at
          `positions`.
        """
        qkv = self._qkv(x)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, 1, K) each
        attend = _attend_in_blocks if decodes_in_blocks(x.shape[0], cache.k.shape[-1]) else _attend_whole_cache
        # The cache is read as it was before this call and written afterwards, not written and
        # read back: XLA can then update it in place (with copy-insertion region analysis, see
        # engine.py) instead of copying every block's cache on every step.
        heads = attend(q, k, v, cache, positions)  # (B, 1, H, K)
        rows = jnp.arange(x.shape[0])
        cache = LayerCache(cache.k.at[rows, :, :, positions].set(k[:, :, 0].astype(cache.k.dtype), mode="drop"),
                           cache.v.at[rows, :, positions, :].set(v[:, :, 0].astype(cache.v.dtype), mode="drop"))
        return self._output(heads), cache

    def _qkv(self, x):  # (B, T, D) -> (B, T, 3, H, K)
        w = self.qkv[...]
        return project(x, w.reshape(w.shape[0], -1), QKV_PARTS).reshape(*x.shape[:2], *w.shape[1:])

    def _keys_values(self, qkv) -> LayerCache:  # cache layouts: keys (B, H, K, T), values (B, H, T, K)
        _, k, v = qkv.transpose(2, 0, 3, 1, 4)
        return LayerCache(k.swapaxes(2, 3), v)

    def _output(self, heads):  # (B, T, H, K) -> (B, T, D)
        heads = heads.reshape(*heads.shape[:2], -1)
        if self.out_kernel is None:
            return heads
        w = self.out_kernel[...]
        return project(heads, w.reshape(-1, w.shape[-1])) + self.out_bias[...]


# A decode step of this many rows or more reads the KV cache in blocks of DECODE_BLOCK positions,
# only as many blocks as the furthest row needs (`_attend_in_blocks`); fewer rows read the whole
# cache in two batched products (`_attend_whole_cache`): there the loop's overhead per block
# outweighs the positions saved. Figures: benchmarks/results/decode_attention_cpu.md.
BLOCKED_DECODE_ROWS = 8
DECODE_BLOCK = 16


def decodes_in_blocks(rows: int, context_length: int) -> bool:
    """Whether a decode step of `rows` rows reads its cache of `context_length` positions in
    blocks (`_attend_in_blocks`); only a cache that the blocks tile is read so."""
    return rows >= BLOCKED_DECODE_ROWS and context_length % DECODE_BLOCK == 0


def _attend_whole_cache(q, k, v, cache: LayerCache, positions):
    """Each row's query over all C cached positions (those at or after `positions[b]` masked) and itself.

    q, k, v: `(B, H, 1, K)` the new token's; cache as `Attention.decode`'s. Returns `(B, 1, H, K)`.
    """
    scale = math.sqrt(q.shape[-1])
    cached = jnp.einsum("bhtk,bhks->bhts", q, cache.k) / scale  # (B, H, 1, C)
    cached = jnp.where(jnp.arange(cached.shape[-1]) < positions[:, None, None, None], cached, -jnp.inf)
    own = jnp.einsum("bhtk,bhsk->bhts", q, k) / scale  # (B, H, 1, 1)
    probs = jax.nn.softmax(jnp.concatenate([cached, own], axis=-1), axis=-1)  # (B, H, 1, C + 1)
    c = cached.shape[-1]
    return (jnp.einsum("bhts,bhsk->bthk", probs[..., :c], cache.v)
            + jnp.einsum("bhts,bhsk->bthk", probs[..., c:], v))  # (B, 1, H, K)


def _attend_in_blocks(q, k, v, cache: LayerCache, positions):
    """`_attend_whole_cache`'s attention, reading only the cache blocks below max(positions).

    A running (online) softmax: it starts from the row's own position and takes in one block
    of DECODE_BLOCK cached positions per loop iteration, rescaling what it has when a block
    holds a larger score. A block wholly masked for a row leaves that row's running values
    exactly as they were (its scores are -inf: weights 0, rescale exp(0) = 1), so a row's bits
    do not depend on how many blocks the other rows of the batch make the loop read. The
    running values are float32 whatever the cache's dtype, and the result has v's dtype.

    q, k, v: `(B, H, 1, K)` the new token's; cache as `Attention.decode`'s, C a multiple of
    DECODE_BLOCK. Returns `(B, 1, H, K)`.
    """
    scale = math.sqrt(q.shape[-1])
    dtype = v.dtype
    q, k, v = (a[:, :, 0].astype(jnp.float32) for a in (q, k, v))  # (B, H, K)
    size = DECODE_BLOCK

    def block(j, running):
        best, total, weighted = running  # (B, H), (B, H), (B, H, K)
        start = j * size
        keys = jax.lax.dynamic_slice_in_dim(cache.k, start, size, axis=3).astype(jnp.float32)  # (B, H, K, S)
        values = jax.lax.dynamic_slice_in_dim(cache.v, start, size, axis=2).astype(jnp.float32)  # (B, H, S, K)
        # Products written as multiply-and-sum: XLA fuses them into one pass over the block,
        # where a batched matrix product of B x H tiny matrices pays a call per matrix.
        scores = jnp.sum(q[..., None] * keys, axis=2) / scale  # (B, H, S)
        scores = jnp.where(start + jnp.arange(size) < positions[:, None, None], scores, -jnp.inf)
        new_best = jnp.maximum(best, scores.max(axis=-1))
        weights = jnp.exp(scores - new_best[..., None])  # (B, H, S)
        rescale = jnp.exp(best - new_best)
        return (new_best, total * rescale + weights.sum(axis=-1),
                weighted * rescale[..., None] + jnp.sum(weights[..., None] * values, axis=2))

    own = jnp.sum(q * k, axis=-1) / scale  # (B, H): the running maximum starts finite
    blocks = (jnp.max(positions) + size - 1) // size
    _, total, weighted = jax.lax.fori_loop(0, blocks, block, (own, jnp.ones_like(own), v))
    return (weighted / total[..., None])[:, None].astype(dtype)  # (B, 1, H, K)


class MLP(nnx.Module):
    """The notebook's `vanilla_nn`: Linear(D, 4D) -> ReLU -> Linear(4D, D)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | ShapeOnly):
        d, f = config.model_dim, config.hidden_dim
        self.up = Linear(d, f, kernel_init=_init, rngs=rngs)
        down_init = _shape_aware(nnx.initializers.normal(stddev=0.02 / math.sqrt(2 * config.num_blocks)))
        self.down = Linear(f, d, kernel_init=down_init, rngs=rngs)

    def __call__(self, x):  # (B, T, D) -> (B, T, D)
        return self.down(jax.nn.relu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm transformer block with two residual branches."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | ShapeOnly):
        d = config.model_dim
        self.norm1 = LayerNorm(d, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.norm2 = LayerNorm(d, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        # The "learning" notebook has no dropout on the attention branch.
        self.attention_dropout = (
            nnx.Dropout(config.dropout, deterministic=True) if config.variant == "drake" else None
        )
        self.mlp_dropout = nnx.Dropout(config.dropout, deterministic=True)

    def __call__(self, x, rngs=None):
        """`(B, T, D)` -> `(B, T, D)`, and the T positions' keys and values."""
        a, keys_values = self.attention(self.norm1(x))
        if self.attention_dropout is not None:
            a = self.attention_dropout(a, rngs=rngs)
        x = x + a
        return x + self.mlp_dropout(self.mlp(self.norm2(x)), rngs=rngs), keys_values

    def last(self, x, last):
        """`(B, T, D)` -> `(B, 1, D)` at index `last[b]` of each row (inference only)."""
        a, keys_values = self.attention.last(self.norm1(x), last)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1) + a
        return x + self.mlp(self.norm2(x)), keys_values

    def decode(self, x, cache: LayerCache, positions):
        """`(B, 1, D)` -> `(B, 1, D)` for one new token per row (inference only)."""
        a, cache = self.attention.decode(self.norm1(x), cache, positions)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache


class GPT(nnx.Module):
    """Character-level GPT. `model(tokens)` maps int tokens `(B, T)` to logits `(B, T, V)`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | ShapeOnly | None = None):
        """Args:
          config: the hyper-parameters.
          rngs: initialisation randomness (`params` stream; default `nnx.Rngs(0)`), or
            `ShapeOnly()` for the structure alone (`jax.ShapeDtypeStruct` parameters).
        """
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        d = config.model_dim
        self.token_embedding = nnx.Embed(config.vocab_size, d, embedding_init=_init, rngs=rngs)
        self.pos_embedding = nnx.Embed(config.context_length, d, embedding_init=_init, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_blocks)])
        self.final_norm = LayerNorm(d, rngs=rngs)
        self.vocab_projection = Linear(d, config.vocab_size, kernel_init=_init, rngs=rngs)

    def __call__(self, tokens, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """Logits of every position.

        Args:
          tokens: int `(B, T)`, numpy or jax, 1 <= T <= context_length, ids in [0, vocab_size).
          rngs: dropout randomness (an `nnx.Rngs` with a `dropout` stream, or a key), required
            in training mode only.

        Returns:
          float32 logits `(B, T, V)`.
        """
        if isinstance(rngs, jax.Array):
            rngs = nnx.Rngs(dropout=rngs)
        if self.training and rngs is None and self.config.dropout > 0:
            raise ValueError("GPT is in training mode: pass rngs= for dropout, or call model.eval()")
        x = self._embed(tokens)
        for block in self.blocks:
            x, _ = block(x, rngs)
        return self._logits(x)

    def prefill(self, tokens, cache: KVCache) -> KVCache:
        """Writes the keys and values of `tokens` (positions 0..T-1) into `cache`.

        Args:
          tokens: int `(B, T)`.
          cache: a KV cache of B rows (`init_cache`); positions T.. are left as they are.

        Returns:
          The updated cache (no logits: generation decodes the prompt's last token itself).
        """
        x = self._embed(tokens)
        new = []
        for block, layer in zip(self.blocks, cache):
            x, keys_values = block(x)  # the last block's output is unused: XLA drops it
            new.append(_write_window(layer, keys_values))
        return tuple(new)

    def decode(self, tokens, cache: KVCache, positions) -> tuple[jax.Array, KVCache]:
        """One new token per row at its own position, attending to the row's cached positions.

        Args:
          tokens: int `(B, 1)`.
          cache: KV cache of B rows holding positions 0..positions[b]-1 of row b.
          positions: int `(B,)` position of each row's token (< context_length).

        Returns:
          float32 logits `(B, V)` of the next token, and the cache with the new position written.
        """
        x = self.token_embedding(self._check(tokens)) + self.pos_embedding(positions)[:, None]  # (B, 1, D)
        new = []
        for block, layer in zip(self.blocks, cache):
            x, layer = block.decode(x, layer, positions)
            new.append(layer)
        return self._logits(x)[:, 0], tuple(new)

    def encode_window(self, tokens, cache: KVCache, last) -> tuple[jax.Array, KVCache]:
        """Re-encodes a window at positions 0..T-1, refilling the cache, logits at index `last`.

        The notebook's step once the context is full: learned absolute positions shift with the
        window, so nothing cached can be reused. Only the final block's query at `last[b]`, and
        what follows it, is computed; every earlier block runs for all positions, whose keys and
        values the final block needs.

        Args:
          tokens: int `(B, T)` windows; positions after `last[b]` are ignored for the logits.
          cache: KV cache of B rows; positions 0..T-1 are overwritten.
          last: int `(B,)` index of each row's last real token.

        Returns:
          float32 logits `(B, V)` at `last`, and the refilled cache.
        """
        x = self._embed(tokens)
        new = []
        for i, (block, layer) in enumerate(zip(self.blocks, cache)):
            x, keys_values = block.last(x, last) if i == len(self.blocks) - 1 else block(x)
            new.append(_write_window(layer, keys_values))
        return self._logits(x)[:, 0], tuple(new)

    def _check(self, tokens):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        if not 1 <= tokens.shape[1] <= self.config.context_length:
            raise ValueError(f"sequence length {tokens.shape[1]} must be in 1..context_length="
                             f"{self.config.context_length}")
        return tokens

    def _embed(self, tokens):  # (B, T) -> (B, T, D) at positions 0..T-1
        tokens = self._check(tokens)
        return self.token_embedding(tokens) + self.pos_embedding(jnp.arange(tokens.shape[1]))[None]

    def _logits(self, x):  # (B, T, D) -> (B, T, V)
        return self.vocab_projection(self.final_norm(x))

    @property
    def training(self) -> bool:
        return not self.blocks[0].mlp_dropout.deterministic

    def num_params(self) -> int:
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def attention_weights(self, tokens) -> jax.Array:
        """Every block's and head's softmax attention probabilities, positions 0..T-1 (eval mode).

        Args:
          tokens: int `(B, T)`, 1 <= T <= context_length.

        Returns:
          float32 `(num_blocks, B, H, T, T)`: [i, b, h, t, s] is the weight the query at t gives
          the key at s in head h of block i; zero for s > t, each row sums to 1. Causal, so row t
          does not depend on the tokens after t: right-padding the input to a fixed length leaves
          rows < T as they are (one compiled shape serves every length).

        Raises:
          ValueError: in training mode (dropout would make the forward random), or a bad shape.
        """
        if self.training:
            raise ValueError("attention_weights needs eval mode: call model.eval() first")
        x = self._embed(tokens)  # (B, T, D)
        t = x.shape[1]
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # (T, T)
        weights = []
        for block in self.blocks:
            q, k, _ = block.attention._qkv(block.norm1(x)).transpose(2, 0, 3, 1, 4)  # (B, H, T, K) each
            scores = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(k.shape[-1])  # (B, H, T, T)
            weights.append(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1))
            x, _ = block(x)
        return jnp.stack(weights)  # (N, B, H, T, T)
