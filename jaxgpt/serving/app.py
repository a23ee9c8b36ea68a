"""The FastAPI application of `jaxgpt serve`: routes, auth, body limit, errors, streaming.

    POST /v1/completions   OpenAI completions (protocol.py), JSON or server-sent events
    GET  /v1/models        the one model served
    GET  /health           status, model configuration, slots busy / free, queue (no auth)
    GET  /metrics          Prometheus text format (metrics.py)
    GET  /, /static/...    the web page, when jaxgpt/serving/static/ is installed (no auth:
                           static files; the API calls the page makes need the key)

Every error is OpenAI's error body with the right status (400, 401, 404, 413, 422, 429, 500,
503). Generation happens only in the scheduler's thread (scheduler.py); handlers validate,
queue a job and relay its events.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxgpt.serving import protocol
from jaxgpt.serving.metrics import Metrics
from jaxgpt.serving.protocol import APIError, Plan
from jaxgpt.serving.scheduler import Failure, Job, Scheduler

log = logging.getLogger("jaxgpt.serve")

MAX_BODY = 1 << 20  # bytes; larger request bodies are refused with 413 before they are read whole
STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
OPEN_PATHS = ("/health",)  # never need the API key
STATIC_PATHS = ("/", "/index.html")  # with /static/..., open when the page is installed


def _json_error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Guard:
    """ASGI middleware: API key (401) and body size (413) checks before any route runs.

    The body is read here, up to MAX_BODY bytes, and replayed to the application, so no route
    (including ones added later, like the web page's) can be made to buffer more.
    """

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY, open_static: bool = True):
        self.app, self.api_key, self.max_body, self.open_static = app, api_key, max_body, open_static

    def _open(self, path: str) -> bool:
        return path in OPEN_PATHS or self.open_static and (path in STATIC_PATHS or path.startswith("/static/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and not self._open(scope["path"]) and not self._authorized(scope):
            return await _json_error(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                              type="authentication_error", code="invalid_api_key",
                                              headers={"WWW-Authenticate": "Bearer"}))(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than {self.max_body} bytes",
                             code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _json_error(too_large)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _json_error(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def create_app(model, *, vocab=None, max_batch: int = 32, max_queue: int = 256, max_tokens: int = 4096,
               api_key: str | None = None, devices=None, model_name: str = "jaxgpt",
               warm_up: bool = True, shutdown_grace: float = 3.0, chunk: int | None = None,
               first_chunk: int = 1) -> FastAPI:
    """The server's application around one model.

    Args:
      model: a `jaxgpt.GPT` in eval mode or a `jaxgpt.Sampler` of one.
      vocab: the model's `Vocab` (default: the published 104 characters).
      max_batch: slots of the engine (rows generated together); part of the determinism
        contract: answers equal `jaxgpt.complete(..., slots=max_batch)`.
      max_queue: rows that may wait for a slot; beyond it requests get 429.
      max_tokens: cap on a request's max_tokens.
      api_key: when set, every route but /health (and the page's static files) needs
        `Authorization: Bearer KEY`.
      devices: local devices the engine shards the slots over (see `jaxgpt.complete`).
      model_name: the id in /v1/models and in responses.
      warm_up: compile the engine's programs now (else on the first requests).
      shutdown_grace: seconds running requests get to finish once a shutdown starts.
      chunk, first_chunk: most steps per engine call (None: the scheduler's default), and steps
        of the call right after requests join, the calls then doubling back up to `chunk` (see
        `Scheduler.chunk_steps`); they never change an answer.
    """
    from jaxgpt.serving import backend
    from jaxgpt.vocab import default_vocab

    vocab = vocab if vocab is not None else default_vocab()
    sampler = backend.as_sampler(model)
    config = sampler.config
    if vocab.size != config.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.size} characters but the model has vocab_size {config.vocab_size}")
    limits = protocol.Limits(vocab=vocab, max_batch=max_batch, max_tokens=max_tokens,
                             context_length=config.context_length, model_name=model_name,
                             **backend.stop_limits())
    metrics = Metrics()
    scheduler = Scheduler(lambda: backend.make_batcher(sampler, max_batch, vocab, devices),
                          max_queue=max_queue, metrics=metrics, chunk=chunk, first_chunk=first_chunk)
    metrics.gauge("slots_busy", "Engine slots generating now.", lambda: scheduler.busy)
    metrics.gauge("slots_total", "Engine slots (--max-batch).", lambda: scheduler.slots)
    metrics.gauge("queue_rows", "Rows waiting for a slot.", lambda: scheduler.queued)
    if warm_up:
        backend.warm_up(scheduler.batcher, vocab, config.context_length)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.drain(0.0)
            await asyncio.get_running_loop().run_in_executor(None, scheduler.stop)

    app = FastAPI(title="jaxgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key)
    app.state.sampler, app.state.vocab, app.state.config = sampler, vocab, config
    app.state.scheduler, app.state.metrics, app.state.limits = scheduler, metrics, limits
    app.state.shutdown_grace = shutdown_grace
    started = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        metrics.inc("requests_total", status=str(error.status))
        return _json_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _json_error(APIError(error.status_code, str(error.detail), headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unhandled error on %s", request.url.path)
        metrics.inc("requests_total", status="500")
        return _json_error(APIError(500, f"internal error: {type(error).__name__}", type="server_error"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        plan = protocol.plan(protocol.parse_request(protocol.parse_body(await request.body())), limits)
        options = backend.make_options(plan.options, config, vocab)
        echoed = await _echo(sampler, vocab, plan) if plan.echo else None
        job = Job(plan, options, asyncio.get_running_loop())
        scheduler.submit(job)
        metrics.inc("prompt_characters_total", sum(len(p) for p in plan.prompts[::plan.n]))
        if plan.stream:
            metrics.inc("requests_total", status="200")
            return StreamingResponse(_stream(job, echoed, vocab, scheduler, metrics, model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(job, echoed, vocab, request, scheduler, metrics, model_name)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "jaxgpt"}]}

    @app.get("/health")
    async def health():
        return {"status": "draining" if scheduler.draining else "ok",
                "model": {"id": model_name, "variant": config.variant, "vocab_size": config.vocab_size,
                          "context_length": config.context_length, "model_dim": config.model_dim,
                          "num_blocks": config.num_blocks, "num_heads": config.num_heads},
                "slots": {"total": scheduler.slots, "busy": scheduler.busy, "free": scheduler.slots - scheduler.busy},
                "queue": {"rows": scheduler.queued, "capacity": scheduler.max_queue},
                "steps": scheduler.steps}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    _mount_page(app)
    return app


def _mount_page(app: FastAPI) -> None:
    """The web page (issue 15): GET / and /static from jaxgpt/serving/static, and its /v1/attention router."""
    if os.path.isfile(os.path.join(STATIC_DIR, "index.html")):
        from fastapi.responses import FileResponse
        from fastapi.staticfiles import StaticFiles

        @app.get("/", include_in_schema=False)
        async def page():
            return FileResponse(os.path.join(STATIC_DIR, "index.html"))

        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    import importlib

    try:
        attention = importlib.import_module("jaxgpt.serving.attention")
    except ModuleNotFoundError as e:
        if e.name != "jaxgpt.serving.attention":
            raise
    else:
        app.include_router(attention.router)


# ----------------------------------------------------------------------------- answering
class _Choices:
    """Per-choice text, log-probabilities and offsets, built from the prompt echo and the events."""

    def __init__(self, plan: Plan, echoed, vocab):
        self.plan, self.vocab = plan, vocab
        self.text = [[] for _ in plan.prompts]
        self.logprobs = [[] for _ in plan.prompts]
        self.top = [[] for _ in plan.prompts]
        self.offset = [0] * plan.rows
        self.finish = [None] * plan.rows
        self.generated = 0
        if echoed is not None:
            for i, (prompt, lps, tops) in enumerate(echoed):
                self.add(i, prompt, lps, tops, generated=False)

    def add_event(self, event) -> dict | None:
        """Appends a `batching.Event`'s characters to its choice; returns their `logprobs` block."""
        from jaxgpt.serving.backend import top_dicts

        if event.logprobs is None:
            return self.add(event.tag.index, event.text, None, None)
        top = top_dicts(self.vocab, event.top_ids, event.top_logprobs) if self.plan.logprobs else None
        return self.add(event.tag.index, event.text, event.logprobs, top)

    def add(self, i: int, text: str, logprobs, top, *, generated: bool = True) -> dict:
        """Appends characters to choice i; returns their `logprobs` block (or None)."""
        block = None
        if self.plan.logprobs is not None:
            logprobs = list(logprobs)[:len(text)] if logprobs is not None else [None] * len(text)
            top = list(top)[:len(text)] if top is not None else None
            block = protocol.logprobs_block(text, logprobs, top, self.offset[i], self.plan.logprobs)
            self.logprobs[i] += block["token_logprobs"]
            self.top[i] += block["top_logprobs"] or []
        self.text[i].append(text)
        self.offset[i] += len(text)
        if generated:
            self.generated += len(text)
        return block

    def body(self, i: int) -> dict:
        block = None
        if self.plan.logprobs is not None:
            text = "".join(self.text[i])
            block = {"tokens": list(text), "token_logprobs": self.logprobs[i],
                     "top_logprobs": self.top[i] if self.plan.logprobs > 0 else None,
                     "text_offset": list(range(len(text)))}
        return protocol.choice(i, "".join(self.text[i]), self.finish[i], block)


async def _echo(sampler, vocab, plan: Plan):
    """(prompt, logprobs, top_logprobs) per choice for `echo`; log-probabilities from jaxgpt.score."""
    if plan.logprobs is None:
        return [(p, None, None) for p in plan.prompts]
    from jaxgpt.serving import backend

    loop = asyncio.get_running_loop()
    scored = {}
    for prompt in dict.fromkeys(plan.prompts):
        scored[prompt] = await loop.run_in_executor(None, backend.prompt_logprobs, sampler, vocab, prompt,
                                                    plan.logprobs, plan.options["mode"], plan.options["stride"])
    return [(p, *scored[p]) for p in plan.prompts]


def _chunk(plan: Plan, model_name: str, choices: list[dict]) -> bytes:
    return protocol.sse(protocol.completion_body(plan, model_name, choices, None))


async def _stream(job: Job, echoed, vocab, scheduler: Scheduler, metrics: Metrics, model_name: str):
    """Server-sent events: one chunk per event (a few characters of one choice), then [DONE]."""
    plan, state = job.plan, _Choices(job.plan, None, vocab)
    first = None
    try:
        if echoed is not None:
            yield _chunk(plan, model_name, [protocol.choice(i, p, None, state.add(i, p, lps, tops, generated=False))
                                            for i, (p, lps, tops) in enumerate(echoed)])
        remaining = plan.rows
        while remaining:
            item = await job.queue.get()
            if isinstance(item, Failure):
                yield protocol.sse(protocol.error_body(item.message, type=item.type, code=str(item.status)))
                break
            i = item.tag.index
            block = state.add_event(item)
            if item.text and first is None:
                first = time.perf_counter()
                metrics.observe("first_character_seconds", first - job.arrived)
            if item.finish_reason is not None:
                remaining -= 1
            if item.text or item.finish_reason is not None:
                yield _chunk(plan, model_name, [protocol.choice(i, item.text, item.finish_reason, block)])
        else:
            if plan.include_usage:
                body = protocol.completion_body(plan, model_name, [], protocol.usage(plan, state.generated))
                yield protocol.sse(body)
            metrics.observe("request_seconds", time.perf_counter() - job.arrived)
        yield protocol.sse("[DONE]")
    except Exception as e:  # noqa: BLE001 - this request ends, the server goes on
        log.exception("request %s failed while streaming", plan.id)
        metrics.inc("errors_total", kind="500")
        yield protocol.sse(protocol.error_body(f"internal error: {type(e).__name__}", type="server_error", code="500"))
        yield protocol.sse("[DONE]")
    finally:
        metrics.inc("generated_characters_total", state.generated)
        scheduler.cancel(job)  # frees the slots of a client that went away; a no-op when all finished


async def _collect(job: Job, echoed, vocab, request: Request, scheduler: Scheduler, metrics: Metrics,
                   model_name: str):
    """The whole answer as one JSON body; a client that disconnects first frees its slots."""
    plan, state = job.plan, _Choices(job.plan, echoed, vocab)
    watcher = asyncio.create_task(_watch_disconnect(request, job, scheduler))
    first = None
    try:
        remaining = plan.rows
        while remaining:
            item = await job.queue.get()
            if item is _GONE:
                return Response(status_code=499)  # nobody reads it; frees the handler
            if isinstance(item, Failure):
                raise APIError(item.status, item.message, type=item.type)
            state.add_event(item)
            if item.text and first is None:
                first = time.perf_counter()
                metrics.observe("first_character_seconds", first - job.arrived)
            if item.finish_reason is not None:
                state.finish[item.tag.index] = item.finish_reason
                remaining -= 1
        body = protocol.completion_body(plan, model_name, [state.body(i) for i in range(plan.rows)],
                                        protocol.usage(plan, state.generated))
        metrics.inc("requests_total", status="200")
        metrics.observe("request_seconds", time.perf_counter() - job.arrived)
        return JSONResponse(body)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001
        log.exception("request %s failed", plan.id)
        metrics.inc("errors_total", kind="500")
        raise APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error") from None
    finally:
        watcher.cancel()
        metrics.inc("generated_characters_total", state.generated)
        scheduler.cancel(job)


_GONE = object()


async def _watch_disconnect(request: Request, job: Job, scheduler: Scheduler) -> None:
    """Waits for the client to go away (the body is already read), then cancels its job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(job)
            job.queue.put_nowait(_GONE)
            return

