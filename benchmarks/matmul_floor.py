"""The matrix products of one training step, alone: a floor under any step built on XLA:CPU.

A training step multiplies, for every projection `x @ W` (B*T rows), three matrices: the
forward product, the input gradient `g @ W^T` and the weight gradient `x^T @ g`; and per block
six batched attention products `(B, H, T, K) x (B, H, T, T)`: two forward, four backward. This
program does exactly those products, on distinct random operands (so that XLA cannot share any
of them), and nothing else: no normalisation, softmax, dropout, loss or optimizer. Its time is
what the step's arithmetic alone costs with XLA:CPU's kernels on this machine, so no jaxgpt
step can be faster, and `torch step / this` bounds the speed-up any JAX step could show.
"""

from __future__ import annotations

import numpy as np


def projections(config) -> list[tuple[int, int]]:
    """(inputs, outputs) of every projection of a step, in model order: per block qkv, the
    output projection (drake), the MLP's two; then the vocabulary projection."""
    d, f = config.model_dim, config.hidden_dim
    block = [(d, 3 * d), *([(d, d)] if config.variant == "drake" else []), (d, f), (f, d)]
    return block * config.num_blocks + [(d, config.vocab_size)]


def flops(config, batch: int) -> int:
    """Multiply-adds x 2 of `matmuls_program` for (batch, context_length) tokens."""
    rows, t = batch * config.context_length, config.context_length
    linear = sum(3 * 2 * rows * i * o for i, o in projections(config))
    attention = config.num_blocks * 6 * 2 * batch * config.num_heads * t * t * config.head_size
    return linear + attention


def matmuls_program(config, batch: int, seed: int = 0):
    """Returns `(run, operands)`: `run(*operands)` (jitted) computes every product of a step.

    Args:
      config: a `GPTConfig`.
      batch: rows of the step's batch (each of context_length tokens).

    Returns:
      The jitted function and its operands (device arrays); it returns the list of products.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    rows = batch * config.context_length
    b, h, t, k = batch, config.num_heads, config.context_length, config.head_size
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    linear = [(normal(rows, i), normal(i, o), normal(rows, o)) for i, o in projections(config)]  # x, W, g
    attention = [(normal(b, h, t, k), normal(b, h, t, k), normal(b, h, t, t)) for _ in range(config.num_blocks)]

    def run(linear, attention):
        out = []
        for x, w, g in linear:
            out += [x @ w, g @ w.T, x.T @ g]  # forward, input gradient, weight gradient
        for a, c, p in attention:  # a, c: queries/keys/values/their gradients; p: probabilities/their gradient
            out += [jnp.einsum("bhtk,bhsk->bhts", a, c), jnp.einsum("bhts,bhsk->bhtk", p, c),  # forward
                    jnp.einsum("bhtk,bhsk->bhts", c, a), jnp.einsum("bhts,bhtk->bhsk", p, a),  # backward
                    jnp.einsum("bhts,bhsk->bhtk", p, a), jnp.einsum("bhts,bhtk->bhsk", p, c)]
        return out

    from jaxgpt.train import step_compiler_options

    # compiled as the training step of this size is (the same matrix-product library)
    return jax.jit(run, compiler_options=step_compiler_options(tokens=rows)), (linear, attention)
