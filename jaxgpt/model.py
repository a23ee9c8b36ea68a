"""The notebook's character-level GPT as a Flax NNX module.

Mirrors `../shared/SPEC.md` exactly (pre-norm blocks, ReLU MLP, learned absolute positions,
torch LayerNorm numerics) but computes all heads at once: the per-head torch projections are
fused into one `qkv` kernel by `porting.keymap`. Shapes use B batch, T query length, S key
length, D model_dim, H heads, K head_size, F hidden (4D), V vocab.

Modes: a freshly built GPT is in eval mode (dropout off, fully deterministic). `model.train()`
turns dropout on; a training call must then pass `rngs=` (an `nnx.Rngs` with a `dropout`
stream, or a key). `model.eval()` turns it off again.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import GPTConfig

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default
_init = nnx.initializers.normal(stddev=0.02)


class LayerCache(NamedTuple):
    """Keys and values of one block for every position of the context window.

    Keys are stored transposed, `(B, H, K, C)`, and values `(B, H, C, K)`: each is then in the
    layout its attention product reads (`q @ k` contracts K, `probs @ v` contracts C), so XLA
    multiplies the cache where it lies. A key cache laid out like the values made XLA:CPU
    transpose every block's whole key cache on every decode step.
    """

    k: jax.Array  # (B, H, K, C)
    v: jax.Array  # (B, H, C, K)


KVCache = tuple[LayerCache, ...]  # one LayerCache per block


def init_cache(config: GPTConfig, batch: int, dtype=jnp.float32) -> KVCache:
    """An all-zero cache per block, keys `(B, H, K, C)` and values `(B, H, C, K)`.

    Positions are masked out until written; see `LayerCache` for the layouts.
    """
    b, h, c, k = batch, config.num_heads, config.context_length, config.head_size
    return tuple(LayerCache(jnp.zeros((b, h, k, c), dtype), jnp.zeros((b, h, c, k), dtype))
                 for _ in range(config.num_blocks))


@jax.custom_vjp
def _project(x, kernel):
    """`x @ kernel` over the last axis: x `(..., I)`, kernel `(I, O)` -> `(..., O)`.

    Same forward and gradients as the einsum; only the backward's kernel-gradient product is
    written as activations^T @ output-gradient. JAX's default transpose rule computes it as
    output-gradient^T @ activations, and XLA:CPU then materialises the residual stream's
    gradient in transposed layout inside a fusion that recomputes its whole elementwise chain
    (once per consumer): measured ~15% of a training step at the published config.
    """
    return jnp.einsum("...i,io->...o", x, kernel)


def _project_fwd(x, kernel):
    return _project(x, kernel), (x, kernel)


def _project_bwd(residuals, g):
    x, kernel = residuals
    dx = jnp.einsum("...o,io->...i", g, kernel)
    dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dx, dkernel


_project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def causal_attention(qkv):
    """Causal softmax attention of every position to itself and the earlier ones.

    Args:
      qkv: `(B, T, 3, H, K)` queries, keys and values of positions 0..T-1, as the fused
        projection lays them out.

    Returns:
      `(B, T, H, K)`: row t of head h is softmax(q_t . k_s / sqrt(K) over s <= t) weighted
      sum of v_s.

    Same values as autodiff of the plain formula, with a hand-written backward that keeps the
    attention probabilities of the forward and computes the key and value gradients
    transposed, `(B, H, K, T)`: XLA:CPU's batched products run `dO^T @ P` about 1.7x as fast
    as `P^T @ dO` (measured at B=16, H=6, T=128, K=42). The optimization barriers stop XLA
    from folding the following transposes back into those products. The three gradients are
    stacked into `qkv`'s layout directly: the transpose of unpacking `qkv` would assemble
    them with a pad and a sum per slot. Measured on a published-size training step (batch
    16, interleaved rounds): 4% faster than autodiff, and 1.6% more from the stacking.
    Being a `jax.custom_vjp`, it supports reverse-mode differentiation only (no `jax.jvp`).
    """
    return _causal_attention_fwd(qkv)[0]


def _causal_attention_fwd(qkv):
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, K) each
    t = q.shape[2]
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    scores = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # (B, H, T, T), zero above the diagonal
    return jnp.einsum("bhts,bhsk->bthk", probs, v), (q, k, v, probs)


def _causal_attention_bwd(residuals, d_heads):  # d_heads (B, T, H, K)
    q, k, v, probs = residuals
    scale = 1 / math.sqrt(q.shape[-1])
    d_out = d_heads.transpose(0, 2, 1, 3)  # (B, H, T, K)
    d_v = jax.lax.optimization_barrier(jnp.einsum("bhtk,bhts->bhks", d_out, probs)).swapaxes(2, 3)  # (B, H, T, K)
    d_probs = jnp.einsum("bhtk,bhsk->bhts", d_out, v)  # (B, H, T, T)
    # softmax backward; masked entries have probs 0 and so get no gradient
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale
    d_q = jnp.einsum("bhts,bhsk->bhtk", d_scores, k)
    d_k = jax.lax.optimization_barrier(jnp.einsum("bhtk,bhts->bhks", q, d_scores)).swapaxes(2, 3)  # (B, H, T, K)
    return (jnp.stack([d_q, d_k, d_v], axis=2).transpose(0, 3, 2, 1, 4),)  # (B, T, 3, H, K)


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps=LAYER_NORM_EPS):
    """torch.nn.LayerNorm over the last axis: x `(..., D)`, scale and bias `(D,)` -> `(..., D)`.

    The variance is torch's biased mean((x - mean)^2), not mean(x^2) - mean^2, which loses
    precision and would cost the 1e-5 parity. The forward is flax's `nnx.LayerNorm` with
    `use_fast_variance=False`, operation for operation. The backward is written by hand,
    dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)) with g' = g * scale: autodiff of the
    forward gives XLA:CPU a chain of small terms per norm that it fuses into every consumer of
    the residual stream's gradient, recomputing the terms of all later blocks there (fusions of
    up to 94 inputs at the published config, quadratic in depth). Measured on a published-size
    training step (batch 16): 8% faster.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)  # (..., 1)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)  # (..., 1)
    return centred * (rstd * scale) + bias, (centred * rstd, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):  # g (..., D)
    x_hat, rstd, scale = residuals
    g_hat = g * scale
    d_x = rstd * (g_hat - g_hat.mean(-1, keepdims=True) - x_hat * (g_hat * x_hat).mean(-1, keepdims=True))
    batch_axes = tuple(range(g.ndim - 1))
    return d_x, (g * x_hat).sum(batch_axes), g.sum(batch_axes)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
    """torch's default LayerNorm (eps 1e-5, biased variance, affine) with `layer_norm`'s backward."""

    def __init__(self, dim: int, *, eps: float = LAYER_NORM_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,)))  # torch's `weight`
        self.bias = nnx.Param(jnp.zeros((dim,)))

    def __call__(self, x):  # (..., D) -> (..., D)
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
    """Causal multi-head self-attention, all heads in one einsum."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        d, h, k = config.model_dim, config.num_heads, config.head_size
        self.num_heads, self.head_size = h, k
        # Fused query/key/value projection, no bias (the notebook's heads have none).
        # Axis 1 is (query, key, value); torch head j's weight [K, D] is kernel[:, c, j, :].T.
        self.qkv = nnx.Param(_init(rngs.params(), (d, 3, h, k)))
        if config.variant == "drake":
            # `compute`: Linear(D, D) over the heads concatenated in order j = 0..H-1.
            self.out_kernel = nnx.Param(_init(rngs.params(), (h, k, d)) / math.sqrt(2 * config.num_blocks))
            self.out_bias = nnx.Param(jnp.zeros((d,)))
        else:
            self.out_kernel = None
            self.out_bias = None

    def __call__(self, x, positions, cache: LayerCache | None = None, start=0, last_only=False):
        """Attends each query to the keys at positions <= its own.

        Args:
          x: `(B, T, D)` normalised inputs.
          positions: `(T,)` int positions of the queries (start + 0..T-1).
          cache: optional `LayerCache`; the queries attend to its positions before `start` and
            to the new keys, whose keys and values are then written at `start`.
          start: first position of `x` in the cache (traced int allowed). The Python int 0
            means the cache holds nothing to attend to (prefill, refill): it is only written.
          last_only: query with the last position only (keys and values still come from, and
            are cached for, every position).

        Returns:
          `(B, T, D)` attention output (`(B, 1, D)` with last_only), and the updated
          `LayerCache` (or None without cache).
        """
        w = self.qkv[...]
        qkv = _project(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:2], *w.shape[1:])  # (B, T, 3, H, K)
        _, k, v = qkv.transpose(2, 0, 3, 1, 4)  # keys and values (B, H, T, K)
        fresh = cache is None or (isinstance(start, int) and start == 0)  # nothing cached to attend to
        if fresh and not last_only:  # training, evaluation, prefill
            heads = causal_attention(qkv)  # (B, T, H, K)
        else:
            q, query_positions = qkv[:, :, 0], positions  # (B, T, H, K), (T,)
            if last_only:
                q, query_positions = q[:, -1:], positions[-1:]  # (B, 1, H, K), (1,)
            scale = math.sqrt(self.head_size)
            scores = jnp.einsum("bthk,bhsk->bhts", q, k) / scale  # (B, H, T', T) over the new keys
            scores = jnp.where(positions[None, :] <= query_positions[:, None], scores, -jnp.inf)
            if fresh:
                heads = jnp.einsum("bhts,bhsk->bthk", jax.nn.softmax(scores, axis=-1), v)  # (B, 1, H, K)
            else:
                # The cached keys are read as they were before this call and the new ones are
                # written afterwards, not written first and read back: XLA can then update the
                # cache in place (with copy-insertion region analysis, see engine.py) instead
                # of copying every block's cache on every decode step.
                cached = jnp.einsum("bthk,bhks->bhts", q, cache.k) / scale  # (B, H, T', C)
                cached = jnp.where(jnp.arange(cached.shape[-1]) < start, cached, -jnp.inf)
                probs = jax.nn.softmax(jnp.concatenate([cached, scores], axis=-1), axis=-1)  # (B, H, T', C + T)
                c = cached.shape[-1]
                heads = (jnp.einsum("bhts,bhsk->bthk", probs[..., :c], cache.v)
                         + jnp.einsum("bhts,bhsk->bthk", probs[..., c:], v))  # (B, T', H, K)
        if cache is not None:
            cache = LayerCache(
                jax.lax.dynamic_update_slice(cache.k, k.swapaxes(2, 3).astype(cache.k.dtype), (0, 0, 0, start)),
                jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, start, 0)))
        if self.out_kernel is None:  # "learning": concat_j head_j goes straight to the residual
            out = heads.reshape(*heads.shape[:2], -1)  # (B, T, D)
        else:
            w = self.out_kernel[...]
            out = _project(heads.reshape(*heads.shape[:2], -1), w.reshape(-1, w.shape[-1])) + self.out_bias[...]
        return out, cache


class MLP(nnx.Module):
    """The notebook's `vanilla_nn`: Linear(D, 4D) -> ReLU -> Linear(4D, D)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        d, f = config.model_dim, config.hidden_dim
        self.up = nnx.Linear(d, f, kernel_init=_init, rngs=rngs)
        down_init = nnx.initializers.normal(stddev=0.02 / math.sqrt(2 * config.num_blocks))
        self.down = nnx.Linear(f, d, kernel_init=down_init, rngs=rngs)

    def __call__(self, x):  # (B, T, D) -> (B, T, D)
        h = jax.nn.relu(_project(x, self.up.kernel[...]) + self.up.bias[...])
        return _project(h, self.down.kernel[...]) + self.down.bias[...]


class Block(nnx.Module):
    """Pre-norm transformer block with two residual branches."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        d = config.model_dim
        self.norm1 = LayerNorm(d)
        self.attention = Attention(config, rngs=rngs)
        self.norm2 = LayerNorm(d)
        self.mlp = MLP(config, rngs=rngs)
        # The "learning" notebook has no dropout on the attention branch.
        self.attention_dropout = (
            nnx.Dropout(config.dropout, deterministic=True) if config.variant == "drake" else None
        )
        self.mlp_dropout = nnx.Dropout(config.dropout, deterministic=True)

    def __call__(self, x, positions, cache=None, start=0, rngs=None, last_only=False):
        """`(B, T, D)` -> `(B, T, D)`, or `(B, 1, D)` for the last position only with last_only."""
        a, cache = self.attention(self.norm1(x), positions, cache, start, last_only)
        if self.attention_dropout is not None:
            a = self.attention_dropout(a, rngs=rngs)
        x = (x[:, -1:] if last_only else x) + a
        x = x + self.mlp_dropout(self.mlp(self.norm2(x)), rngs=rngs)
        return x, cache


class GPT(nnx.Module):
    """Character-level GPT. `model(tokens)` maps int tokens `(B, T)` to logits `(B, T, V)`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        d = config.model_dim
        self.token_embedding = nnx.Embed(config.vocab_size, d, embedding_init=_init, rngs=rngs)
        self.pos_embedding = nnx.Embed(config.context_length, d, embedding_init=_init, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_blocks)])
        self.final_norm = LayerNorm(d)
        self.vocab_projection = nnx.Linear(d, config.vocab_size, kernel_init=_init, rngs=rngs)

    def __call__(self, tokens, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """Logits of every position.

        Args:
          tokens: int `(B, T)`, numpy or jax, T <= context_length, ids in [0, vocab_size).
          rngs: dropout randomness, required in training mode only.

        Returns:
          float32 logits `(B, T, V)`.
        """
        logits, _ = self.forward(tokens, rngs=rngs)
        return logits

    def forward(self, tokens, cache: KVCache | None = None, start=0, *, rngs=None, last_only=False):
        """Forward pass at positions start..start+T-1, optionally reading and writing a KV cache.

        Args:
          tokens: int `(B, T)`.
          cache: optional KV cache from `init_cache`; keys/values of `tokens` are written at
            `start` and the queries attend to every cached position up to their own.
          start: position of `tokens[:, 0]` (a traced int is fine; must be 0 without cache).
          rngs: dropout randomness (training mode only).
          last_only: return logits of the last position only, `(B, 1, V)`: the last block's
            queries and MLP, the final norm and the vocabulary projection are then skipped for
            the other positions (the cache is still written for all of them).

        Returns:
          logits `(B, T, V)` (or `(B, 1, V)`), and the updated cache (None without one).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        t = tokens.shape[1]
        if t > self.config.context_length or t == 0:
            raise ValueError(f"sequence length {t} must be in 1..context_length={self.config.context_length}")
        if isinstance(rngs, jax.Array):
            rngs = nnx.Rngs(dropout=rngs)
        if self.training and rngs is None and self.config.dropout > 0:
            raise ValueError("GPT is in training mode: pass rngs= for dropout, or call model.eval()")
        positions = start + jnp.arange(t)  # (T,)
        x = self.token_embedding(tokens) + self.pos_embedding(positions)[None]  # (B, T, D)
        new_cache = []
        last_block = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            # With last_only the final block's queries, attention output and MLP run for the
            # last position alone (~14% of a full-window step at the published config); every
            # earlier block must still run for all positions, whose keys and values it needs.
            x, layer_cache = block(x, positions, None if cache is None else cache[i], start, rngs,
                                   last_only=last_only and i == last_block)
            new_cache.append(layer_cache)
        logits = self.vocab_projection(self.final_norm(x))  # (B, T, V)
        return logits, (tuple(new_cache) if cache is not None else None)

    @property
    def training(self) -> bool:
        return not self.blocks[0].mlp_dropout.deterministic

    def num_params(self) -> int:
        return sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
