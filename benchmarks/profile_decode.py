"""Profiling aid: what one cached decode step of jaxgpt costs, and what the cache layout costs.

    python -m benchmarks.profile_decode [--batch 64]

Prints, for the published configuration at the given batch size: the median time of one
cached decode step of `jaxgpt.GPT.forward` (jitted, cache donated); the number of copies or
transposes of whole cache-sized arrays in its compiled program; and the same step computed
with the cache in `(B, H, C, K)` layout (the layout whose batch dims (B, H) lead, as
attention's dot products want it; torch's SDPA uses it too), from the same weights, with the
max |logit difference| between the two. It is the evidence for the cache-layout suggestion
in the benchmark report; if jaxgpt's layout changes, the two lines simply agree.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from functools import partial

import numpy as np


def _layer_norm(x, norm):
    """torch's LayerNorm (biased variance, eps 1e-5) with an nnx.LayerNorm's parameters."""
    import jax

    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * norm.scale[...] + norm.bias[...]


def main(argv=None) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt import GPT, PUBLISHED, init_cache

    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    cfg, b = PUBLISHED, args.batch
    c, h, k = cfg.context_length, cfg.num_heads, cfg.head_size
    graphdef, state = nnx.split(GPT(cfg))

    @partial(jax.jit, donate_argnums=(1,))
    def step_model(st, cache, tok, pos):
        logits, cache = nnx.merge(graphdef, st).forward(tok, cache, pos)
        return logits[:, -1], cache

    @partial(jax.jit, donate_argnums=(1,))
    def step_bhck(st, cache, tok, pos):
        model = nnx.merge(graphdef, st)
        x = model.token_embedding.embedding[...][tok[:, 0]] + model.pos_embedding.embedding[...][pos]  # (B, D)
        new = []
        for block, (kc, vc) in zip(model.blocks, cache):
            qkv = jnp.einsum("bd,dchk->bchk", _layer_norm(x, block.norm1), block.attention.qkv[...])
            kc = jax.lax.dynamic_update_slice(kc, qkv[:, 1, :, None, :], (0, 0, pos, 0))  # (B, H, C, K)
            vc = jax.lax.dynamic_update_slice(vc, qkv[:, 2, :, None, :], (0, 0, pos, 0))
            scores = jnp.einsum("bhk,bhsk->bhs", qkv[:, 0], kc) / math.sqrt(k)
            probs = jax.nn.softmax(jnp.where(jnp.arange(c) <= pos, scores, -jnp.inf), -1)
            heads = jnp.einsum("bhs,bhsk->bhk", probs, vc)
            out = jnp.einsum("bhk,hkd->bd", heads, block.attention.out_kernel[...]) + block.attention.out_bias[...]
            x = x + out
            x = x + block.mlp(_layer_norm(x, block.norm2))
            new.append((kc, vc))
        return model.vocab_projection(_layer_norm(x, model.final_norm)), tuple(new)

    tok = jnp.zeros((b, 1), jnp.int32)
    hlo = step_model.lower(state, init_cache(cfg, b), tok, jnp.int32(0)).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):].splitlines()  # top-level instructions only
    transposes = [line for line in entry if re.search(rf"= f32\[{b},{h},{k},{c}\]", line) and "transpose" in line]

    def timed(fn, cache):
        for i in range(3):
            logits, cache = fn(state, cache, tok, jnp.int32(i))
        logits.block_until_ready()
        times = []
        for i in range(args.steps):
            begin = time.perf_counter()
            logits, cache = fn(state, cache, tok, jnp.int32(3 + i))
            logits.block_until_ready()
            times.append(time.perf_counter() - begin)
        return 1e3 * float(np.median(times))

    zeros = lambda: tuple((jnp.zeros((b, h, c, k)), jnp.zeros((b, h, c, k))) for _ in range(cfg.num_blocks))
    t_model, t_bhck = timed(step_model, init_cache(cfg, b)), timed(step_bhck, zeros())
    c1, c2 = init_cache(cfg, b), zeros()
    rng = np.random.default_rng(0)
    for pos in range(4):
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 1)), jnp.int32)
        l1, c1 = step_model(state, c1, tokens, jnp.int32(pos))
        l2, c2 = step_bhck(state, c2, tokens, jnp.int32(pos))
    print(f"batch {b}: jaxgpt decode step {t_model:.2f} ms; whole-cache transposes to (B, H, K, C) per step: "
          f"{len(transposes)} ({len(transposes) * b * c * cfg.model_dim * 4 / 1e6:.0f} MB written)")
    print(f"batch {b}: same step, cache in (B, H, C, K): {t_bhck:.2f} ms; "
          f"max |logit difference| {float(jnp.abs(l1 - l2).max()):.2e}")


if __name__ == "__main__":
    main()
