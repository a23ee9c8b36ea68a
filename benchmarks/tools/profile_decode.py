"""Profiling aid: what jaxgpt's compiled decode loop copies, and what that costs.

    python -m benchmarks.tools.profile_decode [--batch 1] [--steps 127] [--rounds 15]

Compiles `jaxgpt.engine.generate` (the generation loop) for the published configuration twice,
as shipped (`engine.LOOP_OPTIONS["cpu"]`: XLA:CPU copy insertion with region analysis, Eigen's
products) and without region analysis, and prints for each: the number of whole-cache copies per
iteration of the compiled decode loop (XLA copies every block's KV cache when it cannot prove the attention
read comes before the in-place write of the new position), and the time of
`--steps` decode steps from a one-token prompt (median over `--rounds` interleaved rounds).
Both programs must produce the same tokens; the script checks it.

This is how the cache copies were found (benchmarks/results/cpu.md tracks the end-to-end
effect). Before the fix the loop also transposed every key cache once per step, which the key
cache's `(B, H, K, C)` layout removed (see `jaxgpt.model.LayerCache`).
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np


def _loop_bodies(hlo: str) -> list[str]:
    """The bodies of the compiled program's while loops (the decode loops among them)."""
    names = set(re.findall(r"body=%([\w.\-]+)", hlo))
    return [c for c in re.split(r"\n(?=\S)", hlo) if c.split(" ", 1)[0].lstrip("%") in names]


def cache_copies(hlo: str, cache_elements: int) -> int:
    """Copies of arrays of `cache_elements` elements per iteration of the busiest while loop."""
    worst = 0
    for body in _loop_bodies(hlo):
        copies = 0
        for line in body.splitlines():
            m = re.search(r"= f32\[([\d,]+)\]\S* copy\(", line)
            if m and int(np.prod([int(d) for d in m.group(1).split(",")])) == cache_elements:
                copies += 1
        worst = max(worst, copies)
    return worst


def main(argv=None) -> None:
    import jax
    from flax import nnx

    from jaxgpt import GPT, PUBLISHED, Batcher, engine
    from jaxgpt.batching import Sampler

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.profile_decode")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=127)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    cfg, b = PUBLISHED, args.batch
    sampler = Sampler(GPT(cfg, rngs=nnx.Rngs(0)))
    cache_elements = b * cfg.num_heads * cfg.context_length * cfg.head_size
    shipped = engine.generate.__wrapped__

    variants = {}
    shipped_options = engine.LOOP_OPTIONS["cpu"]
    unordered = {k: v for k, v in shipped_options.items() if k != "xla_cpu_copy_insertion_use_region_analysis"}
    for name, options in [("as shipped", shipped_options), ("without region analysis", unordered or None)]:
        generate = jax.jit(shipped, compiler_options=options, static_argnames=("graphdef",), donate_argnames=("slots",))

        def run(generate=generate, lower=False):
            batcher = Batcher(sampler, b, devices=1)
            for r in range(b):
                batcher.add(np.zeros(0, np.int32), args.steps, seed=1, stream=r)
            batcher._insert_pending()
            tokens = []
            for first in range(0, args.steps, engine.CHUNK):
                call = (sampler.graphdef, batcher._params, batcher._state, np.int32(min(engine.CHUNK, args.steps - first)),
                        np.bool_(False))
                if lower:
                    return generate.lower(*call).compile().as_text()
                batcher._state, chunk = generate(*call)
                tokens.append(np.asarray(chunk.tokens))
            return np.concatenate(tokens, axis=1)

        variants[name] = (run, cache_copies(run(lower=True), cache_elements), run())
    tokens = [v[2] for v in variants.values()]
    if not all(np.array_equal(t, tokens[0]) for t in tokens):
        raise SystemExit("the two programs generated different tokens")

    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (run, _, _) in variants.items():
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    for name, (_, copies, _) in variants.items():
        ms = 1e3 * float(np.median(times[name]))
        print(f"batch {b}, {name}: {args.steps} decode steps {ms:.1f} ms ({1e3 * ms / args.steps:.0f} us/step); "
              f"whole-cache copies per step: {copies}")
    print("tokens identical: yes")


if __name__ == "__main__":
    main()
