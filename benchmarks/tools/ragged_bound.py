"""The most batching can gain on the suite's ragged workload, from measured step costs.

The requests group times 32 ragged requests (prompts of 1-100 characters, 20-200 new ones) in
one `complete` call against the same requests one by one. In exact mode every step of a row
whose window is full re-encodes its last C tokens (learned absolute positions shift), so that
work is the same whether rows run together or alone, up to how much cheaper a window is per row
in a group of `engine.REFILL_GROUP` than alone. This tool counts the workload's cached and
full-window steps, times a cached decode step and a window re-encode at the sizes the two runs
use, and prints the ratio an ideal engine would reach: one by one = every row's steps at batch
1; together = one decode step of all rows per step plus the full rows' windows, REFILL_GROUP per
pass (padding included).

    python -m benchmarks.tools.ragged_bound [--rounds 10]
"""

from __future__ import annotations

import argparse
import functools
import math
import time


def step_counts(requests, context: int) -> tuple[list[int], list[list[bool]]]:
    """Per request: its steps, and for each step whether its window is full (prompt + j >= C)."""
    steps = [q["max_chars"] for q in requests]
    full = [[len(q["prompt"]) + j >= context for j in range(q["max_chars"])] for q in requests]
    return steps, full


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxgpt
    import porting
    from benchmarks.beam_score import _text
    from benchmarks.requests_bench import ragged_requests
    from jaxgpt import engine
    from jaxgpt.model import init_cache

    jaxgpt.reuse_host_memory()
    model = porting.load_weights(jaxgpt.DEFAULT_WEIGHTS)
    graphdef, state = nnx.split(model)
    c = model.config.context_length
    vocab = jaxgpt.default_vocab()
    requests = ragged_requests(vocab, _text(20_000, vocab))
    n, group = len(requests), min(len(requests), engine.REFILL_GROUP)

    @jax.jit
    def encode(state, tokens):
        m = nnx.merge(graphdef, state)
        return m.encode_window(tokens, init_cache(m.config, tokens.shape[0], jnp.float32),
                               jnp.full((tokens.shape[0],), c - 1))

    @functools.partial(jax.jit, donate_argnums=2)
    def decode(state, tokens, cache):
        return nnx.merge(graphdef, state).decode(tokens, cache, jnp.full((tokens.shape[0],), c // 2))

    def best(fn, make_args):
        times = []
        for _ in range(args.rounds + 1):
            call = make_args()
            begin = time.perf_counter()
            jax.block_until_ready(fn(*call))
            times.append(time.perf_counter() - begin)
        return float(np.median(times[1:]))

    cost = {
        "window_1": best(encode, lambda: (state, jnp.zeros((1, c), jnp.int32))),
        f"window_{group}": best(encode, lambda: (state, jnp.zeros((group, c), jnp.int32))),
        "decode_1": best(decode, lambda: (state, jnp.zeros((1, 1), jnp.int32), init_cache(model.config, 1, jnp.float32))),
        f"decode_{n}": best(decode, lambda: (state, jnp.zeros((n, 1), jnp.int32), init_cache(model.config, n, jnp.float32))),
    }
    steps, full = step_counts(requests, c)
    windows = sum(map(sum, full))
    alone = sum(len(f) - sum(f) for f in full) * cost["decode_1"] + windows * cost["window_1"]
    together = 0.0
    for j in range(max(steps)):
        live = [f[j] for f in full if j < len(f)]
        k = sum(live)
        together += (cost[f"decode_{n}"] if k < len(live) else 0.0) + math.ceil(k / group) * cost[f"window_{group}"]
    ideal = windows * cost[f"window_{group}"] / group
    print(f"{n} requests, {sum(steps)} steps, {windows} of them full-window ({windows / sum(steps):.0%})")
    for name, seconds in cost.items():
        print(f"  {name}: {seconds * 1e3:.2f} ms")
    print(f"one by one: {alone:.2f} s; together: {together:.2f} s; bound on the ratio: {alone / together:.2f}x")
    print(f"(without any group padding or decode cost the windows alone take {ideal:.2f} s: "
          f"at most {alone / ideal:.2f}x)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
