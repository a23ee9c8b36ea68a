"""The scheduler: one thread drives the engine's continuous-batching core for every request.

Design. JetStream splits generation into prefill (a request's prompt alone, padded to a
bucket), insert (its KV cache and first token into a free slot of the decode state) and
generate (one step for every slot at once), and its orchestrator runs them on threads joined
by queues, with a queue of free slot ids as backpressure. jaxgpt's `batching.Batcher` already
is that engine over a fixed number of slots M (one compiled prefill / insert / generate-chunk
set), shared with `jaxgpt.complete(..., slots=M)`; so the server has no generation loop of its
own, only this scheduler:

    HTTP handlers (event loop)            scheduler thread (owns the Batcher)
    ------------------------------        -----------------------------------------------
    validate -> Job(rows) -> submit()  -> pending rows (FIFO, bounded: 429 when full)
                                          loop:
    client gone -> cancel(job)         ->   free the slots of cancelled jobs (Batcher.cancel)
                                            while a slot is free: Batcher.add(next pending row)
                                            events = Batcher.step(k)     # one chunk, all slots
    job.queue (asyncio) <- Event       <-   dispatch each Event to its row's job
                                            (loop.call_soon_threadsafe)

- A new request joins at the next chunk boundary: it never waits for the running rows to
  finish; a finished row's slot is free (and refilled) before the next chunk; a cancelled
  one is freed before the next chunk too, so a disconnected client holds its slot for at most
  the chunk in progress.
- Chunk length k (`chunk_steps`): a new row's first character waits for the chunk in progress
  when it arrives, its prefill and insert, and its own first chunk (tokens reach the host when
  a chunk ends). So k is `first_chunk` (1) right after rows join, then doubles up to `chunk`
  (`DEFAULT_CHUNK`): a burst's first rows stream at once and the rest of it joins within a
  short chunk; k is traced, so it never recompiles nor changes a row's bits.
- Row i of a request is added with the random stream (seed, i): since a row's output depends
  only on its prompt, options, stream and the slot count (every compiled piece has the same
  shape whatever the others do), its answer equals row i of `complete(..., seed=seed,
  slots=M)` whatever else the server is doing.
- Faults stay local: an exception while adding a row ends that request (500) and the others
  go on; an exception in a step ends the requests then in a slot (the engine cannot say
  which row caused it), the engine is rebuilt and queued requests go on.
- Shutdown (`drain`): queued requests end at once with 503, running ones get `grace` seconds
  to finish, then end with a final error event; new requests get 503.

Only the scheduler thread touches the Batcher; the event loop only appends to the pending
queue and the cancel list under a lock, and reads counters for /health.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from jaxgpt.serving.protocol import APIError, Plan

log = logging.getLogger("jaxgpt.serve")

# Most steps per chunk by default. Past a few steps a chunk costs about as much per step as the
# engine's longest one, while a short one bounds how long a request arriving mid-chunk waits to
# join and how long a row that finished mid-chunk holds its slot (see benchmarks/results/serving_cpu.md).
DEFAULT_CHUNK = 8


@dataclass(eq=False)
class Row:
    """One choice of a request: engine row `index` of its job, random stream `index`."""

    job: "Job"
    index: int
    prompt: str
    slot: int | None = None
    finished: bool = False


@dataclass(frozen=True)
class Failure:
    """Posted to a job's queue when it ends with an error instead of events."""

    status: int
    message: str
    type: str = "server_error"


class Job:
    """One HTTP request: its rows, its engine options and the asyncio queue its handler reads.

    The scheduler posts each `batching.Event` of its rows (its `tag` is the `Row`), or one
    `Failure`, to `queue` from its own thread.
    """

    def __init__(self, plan: Plan, options, loop: asyncio.AbstractEventLoop):
        self.plan, self.options, self.loop = plan, options, loop
        self.rows = [Row(self, i, p) for i, p in enumerate(plan.prompts)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.admitted: float | None = None
        self.closed = False  # cancelled or failed: no more events, its slots are freed

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _deliver(events) -> None:
    """(In the event loop.) Hands each event to its job's queue."""
    for event in events:
        event.tag.job.queue.put_nowait(event)


class Scheduler:
    """Admits queued rows into the Batcher's free slots at chunk boundaries and dispatches events.

    Args:
      make_batcher: builds the engine (called once, and again after a failed step).
      max_queue: most rows waiting for a slot; beyond it `submit` answers 429.
      metrics: a `serving.metrics.Metrics` or None.
      chunk: most steps per `Batcher.step` (None: `DEFAULT_CHUNK`; at most the engine's
        `CHUNK`). Shorter chunks let new requests in sooner and stream in smaller pieces;
        longer ones cost less per character.
      first_chunk: steps of the chunk right after rows are admitted; the chunks then double
        back up to `chunk` (see `chunk_steps`). Chunking never changes the output.
    """

    def __init__(self, make_batcher: Callable[[], object], *, max_queue: int, metrics=None,
                 chunk: int | None = None, first_chunk: int = 1):
        from jaxgpt.engine import CHUNK  # Batcher.step's most steps

        self._make_batcher = make_batcher
        self.chunk = min(DEFAULT_CHUNK if chunk is None else chunk, CHUNK)
        self.first_chunk = min(first_chunk, self.chunk)
        self._fresh = False  # a row was admitted since the last step
        self._last_steps = self.chunk  # steps of the last chunk
        self.batcher = make_batcher()
        self.slots = self.batcher.free_slots()
        self.max_queue = max_queue
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[Row] = deque()
        self._closing: list[Job] = []
        self._running: dict[int, Row] = {}  # slot -> row (scheduler thread only)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._drain_deadline: float | None = None
        self.busy = 0  # slots in use, as of the last loop iteration
        self.steps = 0  # Batcher.step calls so far

    # ------------------------------------------------------------------ event-loop side
    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def submit(self, job: Job) -> None:
        """Queues a job's rows; APIError 429 (queue full) or 503 (shutting down)."""
        with self._cond:
            if self._drain_deadline is not None or self._stop:
                raise APIError(503, "the server is shutting down", type="server_error")
            if len(self._pending) + len(job.rows) > self.max_queue:
                raise APIError(429, f"the queue is full ({len(self._pending)} rows waiting for "
                               f"{self.slots} slots); retry later", type="rate_limit_error",
                               headers={"Retry-After": "1"})
            self._pending.extend(job.rows)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Ends a job (its client went away or its handler failed): frees its slots before the next chunk."""
        with self._cond:
            if job.closed:
                return
            job.closed = True
            self._closing.append(job)
            self._cond.notify()

    def drain(self, grace: float) -> None:
        """Starts the shutdown: 503 for queued and new requests, `grace` seconds for running ones."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace
                self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jaxgpt-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._pending or self._closing or self._running):
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    break
                closing, self._closing = self._closing, []
                if closing or self._drain_deadline is not None:
                    closing += self._drop_pending()
            self._free(closing)
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._fail({row.job for row in self._running.values()},
                           Failure(503, "the server is shutting down"), log_it=False)
            self._admit()
            self.busy = len(self._running)
            if self._running:
                self._step()
            self.busy = len(self._running)
        self._fail({row.job for row in self._running.values()} | {row.job for row in self._pending},
                   Failure(503, "the server stopped"), log_it=False)

    def _drop_pending(self) -> list[Job]:
        """(Lock held.) Removes rows of closed jobs; when draining, fails every queued job.

        Returns the jobs it failed: their rows already in a slot must be freed too.
        """
        failed = []
        if self._drain_deadline is not None:
            for job in {row.job for row in self._pending}:
                if not job.closed:
                    job.closed = True
                    job.post(Failure(503, "the server is shutting down"))
                    failed.append(job)
            self._pending.clear()
        elif any(row.job.closed for row in self._pending):
            self._pending = deque(row for row in self._pending if not row.job.closed)
        return failed

    def _free(self, jobs) -> None:
        for job in jobs:
            for row in job.rows:
                if row.slot is not None and not row.finished:
                    self._release(row)
                    if self.metrics:
                        self.metrics.inc("cancelled_total")

    def _release(self, row: Row) -> None:
        slot, row.slot, row.finished = row.slot, None, True
        del self._running[slot]
        try:
            self.batcher.cancel(slot)
        except Exception as e:  # noqa: BLE001 - a broken engine is replaced, the server keeps going
            log.exception("cancelling slot %d failed; rebuilding the engine", slot)
            self._rebuild(Failure(500, f"internal error while freeing a slot: {type(e).__name__}: {e}"))

    def _admit(self) -> None:
        started = time.perf_counter()
        try:
            self._admit_rows()
        finally:
            if self.metrics:
                self.metrics.inc("engine_seconds_total", time.perf_counter() - started)

    def _admit_rows(self) -> None:
        while self.batcher.free_slots() > 0:
            with self._cond:
                if not self._pending:
                    return
                row = self._pending.popleft()
            job = row.job
            if job.closed:
                continue
            try:
                row.slot = self.batcher.add(row.prompt, job.plan.max_chars, job.options, seed=job.plan.seed,
                                            stream=row.index, tag=row)
            except Exception as e:  # noqa: BLE001 - one request's fault ends that request only
                log.exception("request %s: adding row %d failed", job.plan.id, row.index)
                self._fail([job], Failure(500, f"internal error while starting the request: {type(e).__name__}: {e}"))
                continue
            self._running[row.slot] = row
            self._fresh = True
            if job.admitted is None:
                job.admitted = time.perf_counter()
                if self.metrics:
                    self.metrics.observe("queue_seconds", job.admitted - job.arrived)

    def chunk_steps(self) -> int:
        """Steps of the next chunk: `first_chunk` right after rows joined, else twice the last, up to `chunk`.

        A new row's first character reaches the host only when a chunk ends, and a request
        arriving during a chunk waits for its end; rows often join in bursts. So right after
        rows join the chunks are short (first characters out at once, the rest of a burst in
        soon after) and they grow back to `chunk` while nobody joins.
        """
        steps = self.first_chunk if self._fresh else min(2 * self._last_steps, self.chunk)
        self._fresh, self._last_steps = False, steps
        return steps

    def _step(self) -> None:
        steps = self.chunk_steps()
        started = time.perf_counter()
        try:
            events = self.batcher.step(steps)
            if self.metrics:
                self.metrics.inc("engine_seconds_total", time.perf_counter() - started)
        except Exception as e:  # noqa: BLE001
            log.exception("a generation step failed; ending the %d requests in it", len(self._running))
            self._rebuild(Failure(500, f"internal error during generation: {type(e).__name__}: {e}"))
            return
        self.steps += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for event in events:
            row = event.tag
            if event.finish_reason is not None and self._running.get(event.slot) is row:
                row.finished = True
                row.slot = None
                del self._running[event.slot]
            if not row.job.closed:
                by_loop.setdefault(row.job.loop, []).append(event)
        for loop, batch in by_loop.items():  # one wake-up of each event loop per chunk, not one per row
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                pass

    def _fail(self, jobs, failure: Failure, *, log_it: bool = True) -> None:
        """Ends `jobs` with `failure`, freeing their slots and dropping their queued rows."""
        for job in jobs:
            if job.closed:
                continue
            job.closed = True
            for row in job.rows:
                if row.slot is not None and not row.finished:
                    self._release(row)
            job.post(failure)
            if self.metrics:
                self.metrics.inc("errors_total", kind=str(failure.status))
            if log_it:
                log.error("request %s ended with %d: %s", job.plan.id, failure.status, failure.message)
        with self._cond:
            if any(row.job.closed for row in self._pending):
                self._pending = deque(row for row in self._pending if not row.job.closed)

    def _rebuild(self, failure: Failure) -> None:
        """Replaces a failed engine; the requests that were in its slots end with `failure`."""
        jobs = {row.job for row in self._running.values()}
        for row in self._running.values():
            row.slot, row.finished = None, True
        self._running.clear()
        self.batcher = self._make_batcher()
        self._fail(jobs, failure, log_it=False)
