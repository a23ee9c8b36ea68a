"""Which XLA:CPU matrix-product library suits each compiled loop: YNNPACK (the default) or Eigen.

    python -m benchmarks.tools.dot_library [--cases 1x1,1x127,8x127,1x400] [--rounds 9]
        [--beam-rounds 6] [--score-chars 600] [--lead-in 0.2]     (0 rounds / chars: no such case)

Compiles the generation loop (`jaxgpt.engine.generate`), beam search (`jaxgpt.beam.search`) and
the scoring windows (`jaxgpt.score`) twice each, with YNNPACK's products and with Eigen's
(`engine.EIGEN_DOTS`), and times them interleaved in one process (`benchmarks.harness`): a
generation case BxN is `generate_tokens` of N tokens for B rows from the seed token (1x1 is the
time to first character), beam search is 4 beams x 200 characters at batch 1, scoring is the
first `--score-chars` characters of the bundled corpus. Prints, per case, both medians and
YNNPACK's time over Eigen's (above 1: Eigen is faster), with the per-round spread, and checks
that both programs give the same tokens (scores to 1e-4). The shipped choice is
`engine.LOOP_OPTIONS`; results: benchmarks/results/decode_dots_cpu.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

LIBRARIES = ("ynnpack", "eigen")


def _programs(engine, beam, score_module):
    """library -> (generate, beam search, window scores) compiled with that library's products."""
    import jax

    raw_scores = score_module._window_scores.__wrapped__
    out = {}
    for library in LIBRARIES:
        extra = engine.EIGEN_DOTS if library == "eigen" else {}
        options = {"cpu": {**engine.COMPILER_OPTIONS["cpu"], **extra}}
        out[library] = (
            engine._for_platform(engine.generate.__wrapped__, donate_argnums=(2,), options=options),
            engine._for_platform(beam.search.__wrapped__, static_argnames=("beams",), options=options),
            jax.jit(raw_scores, static_argnames=("graphdef", "last_only", "top"), compiler_options=extra or None),
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1x1,8x1,1x127,8x127,1x400", help="generation cases BxN")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--beam-rounds", type=int, default=6, help="0: no beam search case")
    parser.add_argument("--score-chars", type=int, default=600, help="0: no scoring case")
    parser.add_argument("--lead-in", type=float, default=0.2)
    args = parser.parse_args(argv)
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",") if c]

    import jaxgpt
    import porting
    from benchmarks import harness
    from benchmarks.tools import ab
    from benchmarks.beam_score import CORPUS
    from jaxgpt import beam, engine
    from jaxgpt.cli import default_weights

    score_module = sys.modules["jaxgpt.score"]  # the package's `score` is the function
    model = porting.load_weights(default_weights())
    model.eval()
    sampler = jaxgpt.Sampler(model)
    programs = _programs(engine, beam, score_module)
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()[: args.score_chars]
    results = {}

    def use(library):
        engine.generate, beam.search, score_module._window_scores = programs[library]

    def case(library, work):
        return ab.variant_case(use, library, work, results)

    def generation(b, n):
        return ab.generation(sampler, b, n)

    def beam_work():
        result = jaxgpt.beam_search(sampler, np.zeros((1, 1), np.int32), 200, beams=4, devices=1)
        return result.tokens, result.scores
    beam_work.__name__ = "beam b1 x4 200"

    def score_work():
        return jaxgpt.score(sampler, text)
    score_work.__name__ = f"score {len(text)} chars"

    groups = [([generation(b, n) for b, n in cases], args.rounds, args.lead_in)]
    if args.beam_rounds:
        groups.append(([beam_work], args.beam_rounds, 0.0))
    if text:
        groups.append(([score_work], max(1, args.beam_rounds // 2), 0.0))
    try:
        for works, rounds, lead_in in groups:
            measured = harness.interleave({(lib, w.__name__): case(lib, w) for w in works for lib in LIBRARIES},
                                          rounds, lead_in_s=lead_in)
            for w in works:
                y, e = measured["ynnpack", w.__name__].runs, measured["eigen", w.__name__].runs
                r = harness.paired_ratio(y, e)
                print(f"{w.__name__}: YNNPACK {harness.stats_of(y).median * 1e3:.1f} ms, Eigen "
                      f"{harness.stats_of(e).median * 1e3:.1f} ms, YNNPACK / Eigen {r['ratio']:.3f} (per round "
                      f"{r['paired']['min']:.2f}-{r['paired']['max']:.2f}){_same(results, w.__name__)}", flush=True)
    finally:
        use("ynnpack")
    return 0


def _same(results, name) -> str:
    a, b = results["ynnpack", name], results["eigen", name]
    if isinstance(a, tuple):  # beam search: tokens, scores
        same = np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1], atol=1e-4)
    elif a.dtype.kind == "f":
        same = np.allclose(a, b, atol=1e-4)
    else:
        same = np.array_equal(a, b)
    return "" if same else "  RESULTS DIFFER"


if __name__ == "__main__":
    raise SystemExit(main())
