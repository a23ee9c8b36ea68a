"""How often a row's tokens change with the batch size alone (no `slots`): the README's figure.

Runs R sampled requests (default checkpoint, exact mode, N characters each) alone (batch 1) and
together (in batches of the given sizes, and all R padded to `--slots` slots), and reports per
row whether and where the texts first differ. With `slots` fixed they never do (tests/test_requests.py proves it bit for
bit); without, XLA's programs for different batch shapes may round differently.

    python -m benchmarks.tools.batch_divergence [--rows 16] [--chars 400] [--batches 8,17] [--slots 64]
        [--markdown OUT] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def first_difference(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--batches", default="", help="comma-separated batch sizes: the rows run in consecutive "
                   "batches of each size (default: all rows in one batch)")
    p.add_argument("--slots", type=int, default=64, help="also run all rows padded to this many slots (0: not)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)

    import jaxgpt
    from benchmarks.harness import device_description
    from porting import load_weights

    sampler = jaxgpt.Sampler(load_weights(jaxgpt.DEFAULT_WEIGHTS))
    prompts = [["ROMEO:", "", "To be", "KING.", "\n", "What"][r % 6] for r in range(args.rows)]
    seeds = list(range(100, 100 + args.rows))
    began = time.perf_counter()

    def together(size: int, slots=None) -> list[str]:
        return [c.text for i in range(0, args.rows, size)
                for c in jaxgpt.complete(sampler, prompts[i:i + size], args.chars, seed=seeds[i:i + size],
                                         temperature=1.0, slots=slots)]

    alone = [jaxgpt.complete(sampler, p, args.chars, seed=s)[0].text for p, s in zip(prompts, seeds)]
    sizes = [int(b) for b in args.batches.split(",") if b] or [args.rows]
    runs = {f"batches of {b}" if b < args.rows else f"batch {args.rows}": together(b) for b in sizes}
    if args.slots:
        runs[f"batch {args.rows} in {args.slots} slots"] = together(args.rows, args.slots)
    rows = []
    for name, texts in runs.items():
        diffs = [first_difference(a, b) for a, b in zip(alone, texts)]
        rows.append({"run": name, "rows_differing": sum(d is not None for d in diffs),
                     "first_difference_at": [d for d in diffs if d is not None]})
    doc = {"device": device_description(), "rows": args.rows, "chars": args.chars, "mode": "exact",
           "temperature": 1.0, "results": rows, "elapsed_s": round(time.perf_counter() - began, 1)}
    lines = [f"# Tokens that change with the batch size alone ({doc['device']})", "",
             f"{args.rows} requests x {args.chars} characters, default checkpoint, exact mode, temperature 1, "
             f"each compared with the same request alone (batch 1): {args.rows * args.chars:,} characters per run.", "",
             "| run | rows whose text differs | first differing character |", "| --- | ---: | --- |"]
    lines += [f"| {r['run']} | {r['rows_differing']} / {args.rows} | {r['first_difference_at'] or '-'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    from jaxgpt.atomic import write_json, write_text

    if args.json:
        write_json(args.json, doc)
    if args.markdown:
        write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
