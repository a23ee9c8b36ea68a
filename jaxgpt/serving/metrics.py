"""The server's counters and histograms, written in the Prometheus text exposition format 0.0.4.

Small enough to keep here rather than add a dependency: counters with labels, histograms
with fixed buckets, gauges read at scrape time. Thread-safe (the scheduler thread and the
event loop both record).
"""

from __future__ import annotations

import math
import threading
from typing import Callable

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Everything `GET /metrics` reports, under the `jaxgpt_` prefix."""

    COUNTERS = {
        "requests_total": "Completion requests answered, by HTTP status.",
        "prompt_characters_total": "Prompt characters of accepted requests.",
        "generated_characters_total": "Characters generated and sent.",
        "errors_total": "Requests that ended with an error, by kind.",
        "cancelled_total": "Rows stopped before their end: the client went away, or a shutdown.",
        "engine_seconds_total": "Time the scheduler spent in the engine (prefill and insert, chunks).",
    }
    HISTOGRAMS = {
        "queue_seconds": "Time from a request's arrival until its first row got a slot.",
        "first_character_seconds": "Time from a request's arrival to its first generated character.",
        "request_seconds": "Time from a request's arrival to its last character.",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {name: {} for name in self.COUNTERS}
        self._histograms = {name: ([0] * (len(SECONDS_BUCKETS) + 1), [0.0]) for name in self.HISTOGRAMS}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives at each scrape."""
        self._gauges[name] = (help_, read)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, seconds: float) -> None:
        counts, total = self._histograms[name]
        index = next((i for i, b in enumerate(SECONDS_BUCKETS) if seconds <= b), len(SECONDS_BUCKETS))
        with self._lock:
            counts[index] += 1
            total[0] += seconds

    def value(self, name: str, **labels) -> float:
        """A counter's current value (for tests and /health)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, help_ in self.COUNTERS.items():
                lines += [f"# HELP jaxgpt_{name} {help_}", f"# TYPE jaxgpt_{name} counter"]
                series = self._counters[name] or {(): 0.0}
                for key, value in sorted(series.items()):
                    lines.append(f"jaxgpt_{name}{_labels(key)} {_format(value)}")
            for name, help_ in self.HISTOGRAMS.items():
                counts, total = self._histograms[name]
                lines += [f"# HELP jaxgpt_{name} {help_}", f"# TYPE jaxgpt_{name} histogram"]
                cumulative = 0
                for bound, count in zip((*SECONDS_BUCKETS, math.inf), counts):
                    cumulative += count
                    le = "+Inf" if bound == math.inf else repr(bound)
                    lines.append(f'jaxgpt_{name}_bucket{{le="{le}"}} {cumulative}')
                lines += [f"jaxgpt_{name}_sum {_format(total[0])}", f"jaxgpt_{name}_count {cumulative}"]
        for name, (help_, read) in self._gauges.items():
            lines += [f"# HELP jaxgpt_{name} {help_}", f"# TYPE jaxgpt_{name} gauge",
                      f"jaxgpt_{name} {_format(read())}"]
        return "\n".join(lines) + "\n"


def _labels(key: tuple) -> str:
    if not key:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in key)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(key, escaped)) + "}"


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
