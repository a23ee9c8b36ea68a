"""Interleaved repetitions, robust statistics and device-synchronised timers.

Every benchmark here is a *case*: a callable `case(warm)` that does one complete unit of
work (one generation, one forward, one training step) and returns a dict of named durations
in seconds (at least "seconds"; generation cases add e.g. "ttfc" or "t127" marks taken
inside the same run). The harness runs all cases of a group in one process, warm-up rounds
first (excluded from the statistics: they pay for compilation and cache warming), then
`reps` rounds in which every case runs once, in an order rotated each round, so that machine
noise (other processes, frequency changes) falls on all sides alike. Before each case it
waits until the process's threads are idle (`settle`): a framework's worker threads can keep
spinning after its call returns (ONNX Runtime's do by default), and on two cores
they would take a core from the case that runs next. With `lead_in_s`, a short case is then
run untimed for that long right before its timed run: on the project's VM a core left idle
for a fraction of a second runs the next few tens of milliseconds of work markedly slower
(`benchmarks/results/cpu_quiet.md`), which would bill every case shorter than that for the
pause before it, and ONNX Runtime, whose threads spin after each call, hides from it.

Timing must include the device work: jax dispatch is asynchronous, so a jax case calls
`jax.block_until_ready` on its outputs (or copies them to the host) before the clock stops;
a torch case copies its result to the host (`.cpu()`, `.item()`), which waits for queued
CUDA kernels.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from typing import Callable, Mapping

Case = Callable[[bool], Mapping[str, float]]
"""`case(warm)` runs once; `warm=True` is a discarded warm-up call and may do less work
(an eager torch loop needs no full-length warm-up; a compiled function must see its shapes)."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements: median and spread (interquartile range, min, max)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max, "n": self.n}


def summarize(values) -> Stats:
    """Median, quartiles (inclusive method; equal to the median for n <= 2), min, max."""
    values = sorted(float(v) for v in values)
    if not values:
        raise ValueError("summarize needs at least one measurement")
    median = statistics.median(values)
    if len(values) >= 3:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = median
    return Stats(median, q1, q3, values[0], values[-1], len(values))


@dataclasses.dataclass
class Measured:
    """A case's measurement dicts: `runs` (the `reps` measured rounds) and `warmups` (discarded)."""

    runs: list[dict[str, float]]
    warmups: list[dict[str, float]]


SETTLE_WINDOW_S = 0.005  # `settle` polls the process's CPU time over windows this long
SETTLE_BUSY = 0.1  # a window whose CPU time is below this fraction of it counts as idle
SETTLE_MAX_S = 0.5  # and gives up after this long (a thread that never idles)
LEAD_IN_MAX_CASE_S = 1.0  # cases at least this long warm the cores up themselves: no lead-in


def settle(window_s: float = SETTLE_WINDOW_S, busy: float = SETTLE_BUSY, max_s: float = SETTLE_MAX_S) -> float:
    """Sleeps until this process's threads have (nearly) stopped using CPU; returns the seconds waited.

    The process CPU clock counts every thread, so a thread pool still spinning after the last
    call shows up as CPU time used while the calling thread sleeps. Waits at least one window.
    """
    begin = time.perf_counter()
    while True:
        cpu = time.process_time()
        time.sleep(window_s)
        idle = time.process_time() - cpu < busy * window_s
        if idle or time.perf_counter() - begin >= max_s:
            return time.perf_counter() - begin


def _lead_in(case: Case, seconds: float) -> None:
    """Runs `case(True)` untimed, again and again, until `seconds` have passed (none if <= 0)."""
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        case(True)


def interleave(
    cases: Mapping[str, Case],
    reps: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    lead_in_s: float = 0.0,
) -> dict[str, Measured]:
    """Runs every case `warmup` times (discarded) then `reps` times, interleaved, without GC.

    Round r runs the cases in the given order rotated by r, so no case always runs first or
    right after an expensive neighbour. Before each run the process settles (`settle`).

    Args:
      cases: name -> `Case` returning a dict of durations (must contain "seconds").
      reps: measured rounds (>= 1).
      warmup: discarded rounds before the measured ones (>= 0); their durations are kept in
        `Measured.warmups` (the first one includes compilation).
      progress: optional callback given a short description before each run.
      lead_in_s: before each measured run of a case whose previous run took less than
        `LEAD_IN_MAX_CASE_S`, run it untimed (`case(True)`) until this many seconds have passed,
        then time it at once: the measurement of a core that is already busy, as in a loop of
        calls, instead of one after an idle pause (0: no lead-in).

    Returns:
      name -> `Measured`.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(cases)
    out = {name: Measured([], []) for name in names}
    for r in range(warmup + reps):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            label = f"warm-up {r + 1}/{warmup}" if r < warmup else f"rep {r - warmup + 1}/{reps}"
            if progress is not None:
                progress(f"{name} ({label})")
            # As timeit does: no garbage collection inside a timed run (the collector would bill
            # one case for the garbage of the cases before it), a full one before it.
            gc.collect()
            settle()
            gc.disable()
            try:
                previous = (out[name].runs or out[name].warmups or [{}])[-1].get("seconds", LEAD_IN_MAX_CASE_S)
                if r >= warmup and previous < LEAD_IN_MAX_CASE_S:
                    _lead_in(cases[name], lead_in_s)
                result = dict(cases[name](r < warmup))
            finally:
                gc.enable()
            if "seconds" not in result:
                raise KeyError(f"case {name!r} returned no 'seconds'")
            (out[name].warmups if r < warmup else out[name].runs).append(result)
    return out


def timed(run: Callable[[], object]) -> dict[str, float]:
    """Runs `run()` once: {"seconds": wall time, "page_faults": minor page faults of the process,
    "system_s": kernel CPU seconds}. On a VM a fault can cost ~10 us, so a run that lands on
    fresh memory (allocator growth) shows up in the last two, not only as a slower time."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    begin = time.perf_counter()
    run()
    seconds = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "page_faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime}


def paired_ratio(slow: list[dict[str, float]], fast: list[dict[str, float]], slow_key="seconds",
                 fast_key="seconds", slow_scale: float = 1.0) -> dict[str, float]:
    """Speed-up of `fast` over `slow`: ratio of medians, and the spread of per-round ratios.

    Rounds are interleaved, so round i of both sides saw the same machine state: the per-round
    ratios slow_i / fast_i show how stable the speed-up is.

    Args:
      slow, fast: measured runs of the two cases (same number of rounds).
      slow_key, fast_key: which duration of each to compare.
      slow_scale: multiplies the slow side (e.g. to compare different amounts of work per second).

    Returns:
      {"ratio": median(slow) / median(fast), "paired": per-round ratio statistics}.
    """
    a = [r[slow_key] * slow_scale for r in slow]
    b = [r[fast_key] for r in fast]
    paired = summarize([x / y for x, y in zip(a, b)]).as_dict()
    return {"ratio": statistics.median(a) / statistics.median(b), "paired": paired}


def stats_of(runs: list[dict[str, float]], key: str = "seconds") -> Stats:
    """Statistics of one named duration over a case's measured runs."""
    return summarize([run[key] for run in runs])


def loop_result(seconds: float, done: list[float], marks, partial: bool = False) -> dict[str, float]:
    """A generation loop's measurement: its time, time to first character ("ttfc") and "t<m>",
    the time at which m characters existed, for each mark m it reached (`done[k - 1]`: the
    time k characters existed). `partial` marks a shortened warm-up run."""
    row = {"seconds": seconds, "ttfc": done[0]}
    row.update({f"t{m}": done[m - 1] for m in marks if m <= len(done)})
    if partial:
        row["partial"] = 1
    return row


def make_result(name: str, framework: str, impl: str, batch: int, steps: int, measured: Measured,
                key: str = "seconds", **extra) -> dict:
    """One JSON result row: median seconds of `key`, its spread, characters and characters/s.

    `chars` counts every generated (or processed) character: batch x steps.
    """
    st = stats_of(measured.runs, key)
    chars = batch * steps
    row = {
        "name": name,
        "framework": framework,
        "impl": impl,
        "batch": batch,
        "steps": steps,
        "chars": chars,
        "seconds": st.median,
        "chars_per_s": chars / st.median if st.median > 0 else float("inf"),
        "spread": st.as_dict(),
    }
    # A shortened warm-up (marked "partial") says nothing about the first full run.
    if measured.warmups and key in measured.warmups[0] and not measured.warmups[0].get("partial"):
        row["first_run_s"] = measured.warmups[0][key]
    row.update(extra)
    return row


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """"cpu: <model name> (family F model M, <widest SIMD>), <n> cores" from /proc/cpuinfo.

    A bare model name is not enough: cloud machines of one name ("AMD EPYC") differ by
    generation, and with it by vector width (matrix products on 512-bit AVX-512 cores run at
    twice the rate of 256-bit ones), so results are only comparable on the same family/model.
    """
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block describes them all
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        import platform

        return f"cpu: {platform.processor() or 'unknown cpu'}, {os.cpu_count()} cores"
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    details = [f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else None, simd]
    detail = ", ".join(d for d in details if d)
    return f"cpu: {fields['model name']}{f' ({detail})' if detail else ''}, {os.cpu_count()} cores"


def device_description() -> str:
    """What the suite ran on: `cpu_description()` on a CPU, else "<platform>: <n> x <device kind>"."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return cpu_description()
    return f"{device.platform}: {jax.device_count()} x {device.device_kind}"


def versions(*extra: str) -> dict[str, str]:
    """Versions of Python, jax, jaxlib, flax, the `extra` packages (e.g. "torch") and numpy."""
    import importlib
    import platform

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", *extra, "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out
