"""Pieces the same-process A/B tools share: a case that switches variant, then times one piece of work."""

from __future__ import annotations

import numpy as np


def variant_case(use, variant, work, results: dict):
    """A `harness.interleave` case: `use(variant)`, then time `work()`, its result kept in
    `results[variant, work.__name__]` (to check that the variants agree)."""
    from benchmarks import harness

    def run(warm):
        use(variant)
        return harness.timed(lambda: results.__setitem__((variant, work.__name__), work()))
    return run


def generation(sampler, b: int, n: int):
    """Work: `generate_tokens` of n tokens for b rows from the seed token, named "generate bB nN"."""
    import jaxgpt

    def work():
        return jaxgpt.generate_tokens(sampler, np.zeros((b, 1), np.int32), n)
    work.__name__ = f"generate b{b} n{n}"
    return work
