"""The OpenAI-compatible web app: routes, errors in OpenAI's format, API key, request metrics.

Why FastAPI on uvicorn: the requests are typed pydantic models, so every bad field is refused with
its name before it reaches the model (and ``/docs`` comes for free); uvicorn is the maintained
ASGI server under it, with graceful shutdown on SIGTERM. Handlers never touch the model: they hand
a :class:`~gptedge.runtime.serve.scheduler.Job` to the scheduler thread and await its updates.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptedge.runtime.backend import availability, create_backend
from gptedge.runtime.bundle import load_bundle
from gptedge.runtime.errors import GenerationError, GptEdgeError
from gptedge.runtime.generate import Generator
from gptedge.runtime.sampling import SamplingOptions
from gptedge.runtime.serve.metrics import Metrics
from gptedge.runtime.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Envelope,
    error_body,
    logprobs_body,
)
from gptedge.runtime.serve.scheduler import Job, QueueFullError, Scheduler, ShuttingDownError, Update

log = logging.getLogger(__name__)

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class ServeConfig:
    """``max_batch`` rows decode together, ``max_queue`` requests wait (more: 429); ``api_key``
    (None: no key) guards every route but /health; ``backend`` ``auto`` picks ort-cuda when it can
    run the bundle, else ort-cpu; ``model_name`` defaults to the bundle folder's name;
    ``drain_timeout_s``: how long a stopping server lets running requests finish; ``portable_batch``:
    decode the batch on the portable graph with padding even where the onnxruntime variant with
    per-row lengths could run it (see :class:`~gptedge.runtime.serve.scheduler.Scheduler`)."""

    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    backend: str = "auto"
    threads: int | None = None
    model_name: str | None = None
    drain_timeout_s: float = 30.0
    portable_batch: bool = False


def open_generator(bundle_dir: str | os.PathLike[str], config: ServeConfig) -> Generator:
    """The bundle on an onnxruntime backend (the batch cache takes onnxruntime states apart)."""
    bundle = load_bundle(bundle_dir)
    name = config.backend
    if name == "auto":
        name = "ort-cuda" if availability("ort-cuda", bundle) is None else "ort-cpu"
    return Generator(bundle, create_backend(name, bundle, config.threads))


def create_app(bundle_dir: str | os.PathLike[str], config: ServeConfig | None = None) -> FastAPI:
    """The app serving ``bundle_dir``; the scheduler thread runs while the app's lifespan does."""
    config = config or ServeConfig()
    generator = open_generator(bundle_dir, config)
    metrics = Metrics()
    scheduler = Scheduler(generator, config.max_batch, config.max_queue, metrics, config.portable_batch)
    model = config.model_name or Path(bundle_dir).resolve().name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        log.info("serving %s as %r on %s", bundle_dir, model, generator.backend_name)
        yield
        await asyncio.to_thread(scheduler.stop, config.drain_timeout_s)
        generator.close()

    app = FastAPI(title="gptedge", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.generator = scheduler, metrics, generator
    app.add_middleware(_Gate, api_key=config.api_key, metrics=metrics)
    _error_handlers(app)
    _routes(app, generator, scheduler, metrics, model)
    return app


def _routes(app: FastAPI, generator: Generator, scheduler: Scheduler, metrics: Metrics, model: str) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": scheduler.running, "queued": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "gptedge"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ids = generator.encode(body.prompt)
        max_new = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        _check_fits(generator, ids, max_new)
        bridge = _Bridge()
        job = Job(ids, _options(body, max_new), bridge.sink, logprobs=body.logprobs)
        return await _respond(request, scheduler, job, bridge, Envelope("text_completion", model),
                              body.include_usage, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        from gptedge.runtime.chat import chat_ids

        ids = chat_ids(generator, body.template_messages())
        # without a limit a reply may fill the context (OpenAI's chat default)
        max_new = body.max_completion_tokens or body.max_tokens or max(generator.max_context - len(ids), 1)
        _check_fits(generator, ids, max_new)
        bridge = _Bridge()
        job = Job(ids, _options(body, max_new), bridge.sink)
        return await _respond(request, scheduler, job, bridge, Envelope("chat.completion", model),
                              body.include_usage, body.stream)


def _check_fits(generator: Generator, ids: list[int], max_new: int) -> None:
    """A GenerationError (answered 400) when the prompt is empty or prompt + max_tokens exceed the
    model's context."""
    if not ids:
        raise GenerationError("the prompt encodes to no tokens; send some text or token ids")
    if len(ids) + max_new > generator.max_context:
        raise GenerationError(f"the prompt has {len(ids)} tokens and max_tokens is {max_new}: together more than "
                              f"the model's context of {generator.max_context} tokens; shorten the prompt or "
                              f"lower max_tokens (at most {max(generator.max_context - len(ids), 0)})")


def _options(body: CompletionRequest | ChatRequest, max_new: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new, temperature=body.temperature,
                           top_p=None if body.top_p >= 1 else body.top_p, seed=body.seed,
                           stop=body.stop or (), ignore_eos=body.ignore_eos)


class _Bridge:
    """Hands a job's updates from the scheduler thread to this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Update] = asyncio.Queue()

    def sink(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, update)


async def _respond(request: Request, scheduler: Scheduler, job: Job, bridge: _Bridge, envelope: Envelope,
                   include_usage: bool, stream: bool) -> Response:
    """Queue ``job`` and answer with its stream, or with the whole completion once it is done."""
    scheduler.submit(job)
    if stream:
        return StreamingResponse(_events(job, bridge, envelope, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        updates = await _collect(request, job, bridge)
    finally:
        job.cancel()  # a no-op when it finished; frees the row when the client went away
    if updates is None:
        return Response(status_code=499)  # the client closed the connection: nobody reads this
    last = updates[-1]
    if last.error is not None:
        return JSONResponse(error_body(last.error, "server_error"), status_code=500)
    text = "".join(u.text for u in updates)
    logprobs = None
    if job.logprobs is not None:
        logprobs = logprobs_body([lp for u in updates for lp in u.logprobs], 0)
    return JSONResponse(envelope.whole(text, last, logprobs))


async def _collect(request: Request, job: Job, bridge: _Bridge) -> list[Update] | None:
    """Every update of ``job`` up to its last; None when the client disconnects first (checked
    at least every 0.1 s, whether or not updates arrive)."""
    loop = asyncio.get_running_loop()
    updates: list[Update] = []
    checked = loop.time()
    while True:
        try:
            update = await asyncio.wait_for(bridge.queue.get(), timeout=0.1)
        except TimeoutError:
            update = None
        if loop.time() - checked >= 0.1:
            if await request.is_disconnected():
                return None
            checked = loop.time()
        if update is None:
            continue
        updates.append(update)
        if update.error is not None or update.finish_reason is not None:
            return updates


async def _events(job: Job, bridge: _Bridge, envelope: Envelope, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per step with new text (or logprobs), the finish, [DONE].
    Starlette cancels this generator when the client disconnects; ``finally`` frees the row."""
    sent = 0  # characters streamed so far (logprobs text offsets)
    try:
        if envelope.kind == "chat.completion":
            yield _sse(envelope.chunk("", None, role=True))
        while True:
            update = await bridge.queue.get()
            if update.error is not None:
                yield _sse(error_body(update.error, "server_error"))
                break
            logprobs = logprobs_body(update.logprobs, sent) if job.logprobs is not None else None
            if update.text or logprobs or update.finish_reason:
                yield _sse(envelope.chunk(update.text, update.finish_reason, logprobs))
            sent += len(update.text)
            if update.finish_reason is not None:
                if include_usage:
                    yield _sse(envelope.usage_chunk(update))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        fields = [".".join(str(p) for p in e.get("loc", ())[1:]) or "body" for e in errors]
        message = "; ".join(f"{f}: {e.get('msg', 'invalid')}" for f, e in zip(fields, errors))
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        return JSONResponse(error_body(message, param=fields[0] if fields else None), status_code=status)

    @app.exception_handler(QueueFullError)
    async def full(request: Request, exc: QueueFullError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "rate_limit_error", code="queue_full"), status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDownError)
    async def stopping(request: Request, exc: ShuttingDownError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(GptEdgeError)
    async def refused(request: Request, exc: GptEdgeError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


class _Gate:
    """ASGI middleware: the API key check (every route but /health) and the request counter. Pure
    ASGI rather than BaseHTTPMiddleware so that streaming responses see client disconnects."""

    def __init__(self, app: Callable[..., Awaitable[None]], api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        if self.expected is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>' (the server's "
                                  "--api-key or GPTEDGE_API_KEY)", code="invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                self.metrics.request(route, 401)
                return
        status = [500]

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.request(route, status[0])
