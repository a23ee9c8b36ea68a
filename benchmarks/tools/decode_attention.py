"""Decode-step attention: the whole KV cache in two batched products, or only the blocks needed.

    python -m benchmarks.tools.decode_attention [--cases 1x1,8x1,64x1,1x127,8x64,64x16] [--rounds 9]
        [--ragged-rounds 3] [--threshold ROWS | --baseline GIT_REF] [--lead-in 0.2]
        (0 ragged rounds: no ragged case)

`jaxgpt.model` picks a decode step's attention by its row count: from `BLOCKED_DECODE_ROWS` rows
on, `_attend_in_blocks` reads only the cache blocks below the furthest live row's position;
below it, `_attend_whole_cache` reads all C positions. This compiles the generation loop
(`jaxgpt.engine.generate`) twice, once with the shipped threshold and once with the blocked
attention switched off (the threshold out of reach), and times both interleaved in one process
(`benchmarks.harness`); `--threshold 1` makes the blocked variant block at every row count, to
see what it does below the shipped threshold. `--baseline REF` instead compares the whole
shipped engine with the generation loop of `jaxgpt/engine.py` at git revision REF (loaded beside
it, run with the whole-cache attention: e.g. the revision before the blocked attention).

A generation case BxN is `generate_tokens` of N tokens for B rows from the seed token (Bx1 is the
time to first character at batch B); the ragged case is the benchmark suite's 32 ragged requests
(`benchmarks.requests_bench`) in one `complete` call. Prints, per case, both medians and the first variant's time over the second's (above 1: the
shipped one is faster), with the per-round spread, and whether both gave the same tokens
(the two attentions round differently, so a near-tie may rarely flip a sampled token).
Results: benchmarks/results/decode_attention_cpu.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile

import numpy as np


def _engine_at(ref: str):
    """`jaxgpt/engine.py` as it was at git revision `ref`, as a module beside the shipped one."""
    from jaxgpt import engine

    source = subprocess.run(["git", "show", f"{ref}:jaxgpt/engine.py"], check=True, capture_output=True,
                            text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"jaxgpt._engine_{ref}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    # The Batcher hands it the shipped engine's types.
    module.StaticGraph, module.Slots, module.Chunk = engine.StaticGraph, engine.Slots, engine.Chunk
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1x1,8x1,64x1,1x127,8x64,64x16", help="generation cases BxN")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ragged-rounds", type=int, default=3, help="0: no ragged-requests case")
    parser.add_argument("--threshold", type=int, default=None,
                        help="rows from which the blocked variant blocks (default: the shipped BLOCKED_DECODE_ROWS)")
    parser.add_argument("--baseline", default=None, help="git revision whose generation loop to compare against")
    parser.add_argument("--lead-in", type=float, default=0.2)
    args = parser.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]

    import jaxgpt
    import porting
    from benchmarks import harness, requests_bench
    from benchmarks.tools import ab
    from benchmarks.beam_score import _text
    from jaxgpt import engine
    from jaxgpt import model as model_module
    from jaxgpt.cli import default_weights

    model = porting.load_weights(default_weights())
    model.eval()
    sampler = jaxgpt.Sampler(model)
    shipped = model_module.BLOCKED_DECODE_ROWS
    # Each program is traced at its first call, with the threshold set just before it.
    loop = engine._for_platform(engine.generate.__wrapped__, donate_argnums=(2,), options=engine.LOOP_OPTIONS)
    if args.baseline:
        variants = {f"{args.baseline} engine": (_engine_at(args.baseline).generate, 1 << 30), "shipped": (loop, shipped)}
    else:
        blocked = engine._for_platform(engine.generate.__wrapped__, donate_argnums=(2,), options=engine.LOOP_OPTIONS)
        variants = {"whole cache": (loop, 1 << 30),
                    "blocked": (blocked, shipped if args.threshold is None else args.threshold)}
    first, second = variants
    results = {}

    def use(variant):
        engine.generate, model_module.BLOCKED_DECODE_ROWS = variants[variant]

    def case(variant, work):
        return ab.variant_case(use, variant, work, results)

    def generation(b, n):
        return ab.generation(sampler, b, n)

    vocab = jaxgpt.default_vocab()
    requests = requests_bench.ragged_requests(vocab, _text(20_000, vocab))

    def ragged():
        return np.concatenate([c.tokens for c in requests_bench._complete_all(sampler, requests)])
    ragged.__name__ = f"{len(requests)} ragged requests"

    groups = [([generation(b, n) for b, n in cases], args.rounds, args.lead_in)]
    if args.ragged_rounds:
        groups.append(([ragged], args.ragged_rounds, 0.0))
    original = engine.generate
    try:
        for works, rounds, lead_in in groups:
            measured = harness.interleave({(v, w.__name__): case(v, w) for w in works for v in variants},
                                          rounds, lead_in_s=lead_in)
            for w in works:
                a, b = measured[first, w.__name__].runs, measured[second, w.__name__].runs
                r = harness.paired_ratio(a, b)
                same = np.array_equal(results[first, w.__name__], results[second, w.__name__])
                print(f"{w.__name__}: {first} {harness.stats_of(a).median * 1e3:.1f} ms, {second} "
                      f"{harness.stats_of(b).median * 1e3:.1f} ms, ratio {r['ratio']:.3f} (per round "
                      f"{r['paired']['min']:.2f}-{r['paired']['max']:.2f}), tokens {'identical' if same else 'DIFFER'}",
                      flush=True)
    finally:
        engine.generate, model_module.BLOCKED_DECODE_ROWS = original, shipped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
