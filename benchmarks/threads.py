"""torch's intra-op thread count: set it for a block, and probe which count is fastest here.

On a 2-core machine with other work running, torch's default (one thread per core) can be
several times slower than one thread for the small matmuls of this model: each op's threads
wait for a core the other processes hold. A careful torch user measures and picks; so does
the suite (and reports the probe's figures), so that the torch side is never handicapped by
a thread count chosen for it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Mapping


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Runs the body with `torch.set_num_threads(n)` (None: unchanged), then restores the count."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def probe_threads(work: Mapping[str, tuple[float, Callable[[], object]]], candidates, rounds: int = 3,
                  grad: bool = False) -> tuple[int, dict]:
    """Times each unit of `work` at torch's default thread count and at each candidate.

    Args:
      work: label -> (weight, fn): `fn()` runs one unit (synchronously); a count's score is
        sum(weight * median time of fn) over the labels, i.e. the cost of a representative run.
        The median, not the best: on a shared machine a count whose threads wait for a busy
        core is fast only when the other processes pause, and the best time would pick it for
        measured rounds that then run at its usual, slow speed. Units of weight 0 are not run.
      candidates: thread counts to try besides the default.
      rounds: timed rounds after one warm-up round; counts are interleaved within a round. A
        count over 3x slower than the best after the first timed round is not timed again
        (on a busy machine a bad count can cost seconds per unit).
      grad: run the units with autograd on (for training steps); default inference mode.

    Returns:
      (fastest thread count, {count: {label + "_s": median seconds, ..., "score_s": score}}).
      A count dropped after the first timed round has the median of the rounds it ran.
    """
    import torch

    work = {label: unit for label, unit in work.items() if unit[0] > 0}
    default = torch.get_num_threads()
    counts = [default] + [n for n in candidates if n != default]
    times = {n: {label: [] for label in work} for n in counts}
    median = lambda n, label: statistics.median(times[n][label])  # noqa: E731
    score = lambda n: sum(weight * median(n, label) for label, (weight, _) in work.items())  # noqa: E731
    active = list(counts)
    with contextlib.nullcontext() if grad else torch.inference_mode():
        for r in range(rounds + 1):
            for n in active:
                with torch_threads(n):
                    for label, (_, fn) in work.items():
                        begin = time.perf_counter()
                        fn()
                        if r:  # round 0 warms up
                            times[n][label].append(time.perf_counter() - begin)
            if r == 1:
                fastest = min(score(n) for n in active)
                active = [n for n in active if score(n) <= 3 * fastest]
    figures = {}
    for n in counts:
        figures[n] = {f"{label}_s": median(n, label) for label in work}
        figures[n]["score_s"] = score(n)
    return min(counts, key=lambda n: figures[n]["score_s"]), figures
