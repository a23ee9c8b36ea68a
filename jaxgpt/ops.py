"""Three kernels with hand-written backward passes, used by `jaxgpt.model`.

Each computes what its plain formula computes (`project` optionally sums its product in parts,
for float32 accuracy); the gradients are written by hand, because autodiff's versions made
XLA:CPU produce slow training steps (the README's benchmark section and
`benchmarks/results/train_step_cpu.md` have the figures):

* `project`: `x @ kernel` whose kernel gradient is activations^T @ output-gradient. JAX's
  default transpose computes output-gradient^T @ activations, and XLA:CPU then materialises the
  residual stream's gradient transposed, inside a fusion that recomputes its elementwise chain.
* `causal_attention`: keeps the forward's probabilities, computes the key and value gradients
  transposed (the faster batched-product orientation on CPU) and stacks the three gradients in
  the packed `qkv` layout directly (the transpose of unpacking would pad and sum per slot).
* `layer_norm`: torch's LayerNorm; autodiff's chain of small terms per norm was fused into every
  consumer of the residual stream's gradient, recomputing all later blocks' terms there.

Being `jax.custom_vjp`s, they support reverse-mode differentiation only (no `jax.jvp`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x, kernel, parts: int = 1):
    """`x @ kernel` over the last axis: x `(..., I)`, kernel `(I, O)` -> `(..., O)`.

    With `parts` > 1 the forward sums `parts` products over consecutive slices of the
    contraction (in order), unless x holds one position per row (`x.shape[-2] == 1`: a decode
    step). XLA:CPU accumulates each output in one float32 chain over all I terms, whose rounding
    error grows with I; shorter chains are more accurate (torch's MKL accumulates in blocks
    too). Each part copies its slice of the kernel, which a decode step's few rows cannot
    amortise, so those keep one chain; the choice depends on the positions per row, not on the
    batch, so a row's result does not change with the rows beside it. The gradient is the same
    either way.
    """
    if parts > 1 and x.ndim >= 2 and x.shape[-2] > 1:
        return contract_in_parts(x, kernel, parts)
    return jnp.einsum("...i,io->...o", x, kernel)


def contract_in_parts(x, kernel, parts: int):
    """`x @ kernel` as the sum of `parts` (at most I) products over consecutive slices of I."""
    size = kernel.shape[0]
    step = -(-size // min(parts, size))
    out = None
    for start in range(0, size, step):
        part = jnp.einsum("...i,io->...o", x[..., start : start + step], kernel[start : start + step])
        out = part if out is None else out + part
    return out


def _project_fwd(x, kernel, parts):
    return project(x, kernel, parts), (x, kernel)


def _project_bwd(parts, residuals, g):
    x, kernel = residuals
    dx = jnp.einsum("...o,io->...i", g, kernel)
    dkernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dx, dkernel


project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def causal_attention(qkv):
    """Causal softmax attention of every position to itself and the earlier ones.

    Args:
      qkv: `(B, T, 3, H, K)` queries, keys and values of positions 0..T-1, as the fused
        projection lays them out.

    Returns:
      `(B, T, H, K)`: row t of head h is softmax(q_t . k_s / sqrt(K) over s <= t) weighted
      sum of v_s.
    """
    return _causal_attention_fwd(qkv)[0]


def causal_probs(q, k):
    """Attention probabilities `(B, H, T, T)` of queries and keys `(B, H, T, K)`, zero above the diagonal."""
    t = q.shape[2]
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    scores = jnp.where(jnp.arange(t)[None, :] <= jnp.arange(t)[:, None], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def _causal_attention_fwd(qkv):
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, K) each
    probs = causal_probs(q, k)  # (B, H, T, T)
    return jnp.einsum("bhts,bhsk->bthk", probs, v), (q, k, v, probs)


def _causal_attention_bwd(residuals, d_heads):  # d_heads (B, T, H, K)
    q, k, v, probs = residuals
    scale = 1 / math.sqrt(q.shape[-1])
    d_out = d_heads.transpose(0, 2, 1, 3)  # (B, H, T, K)
    # The barriers stop XLA from folding the transposes back into the products.
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
    precision and would cost the 1e-5 parity; the forward is flax's `nnx.LayerNorm` with
    `use_fast_variance=False`, operation for operation. The backward is
    dx = rstd * (g' - mean(g') - x_hat * mean(g' * x_hat)) with g' = g * scale.
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
