"""The OpenAI-compatible HTTP gateway: `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/models`, and `/v1/rerank` (Cohere's and Jina's shape).

It enqueues onto the same per-model queues as the SDK (it is an AsyncClient behind FastAPI).
Its parts: the request bodies (gateway_models.py), streamed replies (gateway_sse.py), errors
in OpenAI's shape (gateway_errors.py), resuming a stream (gateway_resume.py) and the OpenAPI
document (gateway_openapi.py), virtual keys' admin API (gateway_keys.py); here are the routes,
API keys and the request counter.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass
from functools import partial
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import prometheus_client
import redis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import chat_fields, gateway_choices, gateway_openapi, logs, metrics, redis_clients, registry, tracing
from .client import AsyncClient
from .config import SmmfConfig, load_config
from .errors import RateLimited, RequestError, SmmfError, validation_message
from .gateway_errors import classify, error_response
from .gateway_keys import admin_router
from .gateway_models import (
    COMPLETION_REFUSES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    RerankRequest,
)
from .gateway_resume import (
    LAST_EVENT_ID,
    NOTHING_SEEN,
    LeftStreams,
    parse_last_event_id,
)
from .gateway_sse import COMPLETION, EventStream, next_or_none, observe_ttft, queued_stream, sse, whole_choice
from .gateway_usage import Accounting, Ticket
from .jobs import JOB_ID_PATTERN, StreamEvent, Usage, new_job_id, vector_rows
from .virtual_keys import KEY_PREFIX, KeyStore, may_call

log = logging.getLogger("smmf_queue.gateway")
#: one line per API request at INFO (`_log_access`); `smmf-queue gateway --loglevel info` shows it.
ACCESS_LOG = logging.getLogger("smmf_queue.access")

#: the longest deadline a request may carry, seconds.
MAX_DEADLINE_S = 7 * 24 * 3600
#: a job id that may go out in a header as it is.
_HEADER_SAFE_ID = re.compile(JOB_ID_PATTERN)
#: the paths that take API keys and count requests: the API, and Cohere's rerank path.
GUARDED = ("/v1/", "/rerank")
#: the admin API of virtual keys, for the master key only.
ADMIN = ("/key/", "/usage")


def master_key(config: SmmfConfig) -> str | None:
    """The master key: `[gateway] master_key`, else SMMF_MASTER_KEY. With one, the gateway
    serves virtual keys and their admin API."""
    configured = config.gateway.master_key
    return configured.get_secret_value() if configured else os.environ.get("SMMF_MASTER_KEY") or None


def create_app(config: SmmfConfig) -> FastAPI:
    """The gateway for one config; its AsyncClient lives as long as the app."""

    master = master_key(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncClient(config)
        app.state.left_streams = LeftStreams(app.state.client, config.gateway.resume_grace_s)
        app.state.accounting = Accounting(config, master)
        app.state.accounting.start()
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            # (a TestClient runs the app in another thread, where no signal can be handled)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        yield
        await app.state.left_streams.aclose()
        await app.state.client.aclose()
        await app.state.accounting.aclose()

    app = FastAPI(title="smmf-queue gateway", lifespan=lifespan)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = gateway_openapi.complete(get_openapi(
                title=app.title, version=app.version, routes=app.routes), config)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    fail_fast = not config.gateway.wait_for_worker
    #: when this gateway started: `created` of the models it lists.
    started = int(time.time())

    guarded = _GuardSettings.of(config)
    app.add_middleware(_Guard, settings=guarded, master=master)

    def reload() -> None:
        """SIGHUP: read the config file again. New models are served and removed ones answer
        404 from the next request; streams under way go on. A new [queue] section, master key
        or ledger needs a restart: a config that changes [queue] (or does not load) is refused
        and the old one stays."""
        nonlocal config, fail_fast
        try:
            new = load_config(config.source)
        except SmmfError as exc:
            log.error("config not reloaded, the running one stays: %s", exc.message)
            return
        if new.queue != config.queue:
            log.error("config not reloaded: its [queue] section changed, which needs a restart")
            return
        before, after = {m.name for m in config.models}, {m.name for m in new.models}
        config = app.state.client.config = new
        fail_fast = not new.gateway.wait_for_worker
        guarded.update(new)
        app.openapi_schema = None
        log.warning("config reloaded from %s: models added %s, removed %s", new.source,
                    sorted(after - before) or "none", sorted(before - after) or "none")
    if master:
        app.include_router(admin_router(KeyStore(redis_clients.connect(config.queue))))

    def accounting() -> Accounting:
        return app.state.accounting  # type: ignore[no-any-return]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"] if p != "body")
        message = validation_message(error)
        return error_response(400, f"{param}: {message}" if param else message,
                              "invalid_request_error", None, param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, wrong method, a body that is not UTF-8)."""
        error = error_response(exc.status_code, str(exc.detail), "invalid_request_error", None)
        error.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return error

    @app.exception_handler(SmmfError)
    async def smmf_error(request: Request, exc: SmmfError) -> JSONResponse:
        status, kind, code = classify(exc)
        return error_response(status, exc.message, kind, code, getattr(exc, "param", None),
                              getattr(exc, "retry_after_s", None),
                              exc.headers if isinstance(exc, RateLimited) else None)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        """Redis unreachable where a route reads it directly (models, metrics): a 503 too."""
        return error_response(503, f"cannot reach Redis: {type(exc).__name__}: {exc}", "server_error",
                              "broker_unavailable")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               deadlines: Deadlines) -> Any:
        client: AsyncClient = app.state.client
        request.state.model = body.model
        arrived = time.perf_counter()
        dropped = _refuse_or_drop(body)
        headers = {"x-smmf-dropped-params": ",".join(dropped)} if dropped else {}
        messages = [m.wire() for m in body.messages]
        fields = {name: value for name, value in body.fields().items() if name not in dropped}
        request.state.request_id = job_id = new_job_id()
        n = fields.pop("n", 1)
        if n > config.gateway.max_n:
            raise RequestError(f"n: at most {config.gateway.max_n} choices (gateway.max_n)",
                               model=body.model)
        ticket = await accounting().admit(request.state, body.model, job_id,
                                          reserve=n * fields.get("max_tokens", 0))
        fallbacks = ticket.fallbacks(config.model(body.model).fallbacks)
        call: dict[str, Any] = {**deadlines, "fallbacks": fallbacks}
        if n > 1:
            return await _choices(body, messages, fields, n, call, headers, ticket)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            # Resumable (a fallback's job has another id): its job runs on when its reader leaves.
            resumable = not fallbacks
            follow = partial(client.replay, job_id, body.model) if resumable else None
            stream, first = await queued_stream(client, body.model, messages, fail_fast=fail_fast,
                                                job_id=job_id, cancel_on_leave=False,
                                                on_end=accounting().on_end(ticket, follow), **call, **fields)
            first.add_done_callback(partial(observe_ttft, body.model, arrived))
            if resumable:
                headers["x-smmf-resume"] = (f"/v1/chat/completions/chatcmpl-{job_id}/stream?"
                                            f"model={quote(body.model)}"
                                            + ("&include_usage=true" if include_usage else ""))
            return EventStream(
                sse(body.model, job_id, first, stream, include_usage, NOTHING_SEEN,
                    lambda: app.state.left_streams.left(job_id, None), config.gateway.keepalive_s),
                headers)
        result = await accounting().settled(ticket, client.chat(
            body.model, messages, fail_fast=fail_fast, job_id=job_id, **call, **fields))
        return JSONResponse({
            "id": f"chatcmpl-{result.job_id}", "object": "chat.completion",
            "created": int(time.time()), "model": result.model,
            "choices": [whole_choice(result, bool(fields.get("logprobs")))],
            "usage": result.usage.model_dump(),
        }, headers={"x-smmf-model": result.model, **headers})

    async def _choices(body: ChatCompletionRequest, messages: list[dict[str, Any]],
                       fields: dict[str, Any], n: int, call: dict[str, Any],
                       headers: dict[str, str], ticket: Ticket) -> Response:
        """n choices, one job each (gateway_choices.py); a virtual key is charged their usage."""
        client: AsyncClient = app.state.client
        call = {"fail_fast": fail_fast, **call}
        if not body.stream:
            try:
                answer = await gateway_choices.whole(client, body.model, messages, fields, n, **call)
            except BaseException:
                await accounting().settle(ticket, None)
                raise
            await accounting().settle(ticket, Usage(**answer["usage"]))
            return JSONResponse(answer, headers=headers)
        try:
            streams, firsts = await gateway_choices.start(client, body.model, messages, fields, n, **call)
        except BaseException:
            await accounting().settle(ticket, None)
            raise
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return EventStream(
            gateway_choices.streamed(body.model, streams, firsts, include_usage,
                                     config.gateway.keepalive_s, accounting().on_end(ticket)),
            headers)

    def _refuse_or_drop(body: ChatCompletionRequest) -> list[str]:
        """The fields of `body` to drop (its model's drop_params); UnsupportedParameter for one
        its model cannot honour otherwise (chat_fields.py). `n` is honoured here, for every
        model (gateway_choices.py)."""
        entry = config.model(body.model, "llm")
        dropped = chat_fields.refuse_or_drop(body.model_dump(exclude_unset=True, exclude={"n"}),
                                             [m.model_dump(exclude_none=True) for m in body.messages],
                                             body.model, entry.supports, entry.drop_params)
        if dropped:
            log.warning("model %s: dropped %s (drop_params)", body.model, ", ".join(dropped))
        return dropped

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request, deadlines: Deadlines) -> Any:
        """The completions API on the same queues: the prompt reaches the model as it is."""
        client: AsyncClient = app.state.client
        request.state.model = body.model
        entry = config.model(body.model, "llm")
        fields = {"prompt": body.text(), **body.fields()}
        supports = entry.supports - COMPLETION_REFUSES  # not in this API's shape
        dropped = chat_fields.refuse_or_drop(fields, [], body.model, supports, entry.drop_params)
        headers = {"x-smmf-dropped-params": ",".join(dropped)} if dropped else {}
        fields = {name: value for name, value in fields.items() if name not in dropped}
        request.state.request_id = job_id = new_job_id()
        echo = body.text() if body.echo else ""
        ticket = await accounting().admit(request.state, body.model, job_id,
                                          reserve=fields.get("max_tokens") or 0)
        call: dict[str, Any] = {**deadlines, "fallbacks": ticket.fallbacks(entry.fallbacks)}
        if body.stream:
            # No resume for this API: a client that leaves cancels its job at once.
            stream, first = await queued_stream(client, body.model, [], fail_fast=fail_fast,
                                                job_id=job_id, cancel_on_leave=True,
                                                on_end=accounting().on_end(ticket), **call, **fields)
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return EventStream(
                sse(body.model, job_id, first, stream, include_usage, NOTHING_SEEN, lambda: None,
                    config.gateway.keepalive_s, COMPLETION, echo),
                headers)
        result = await accounting().settled(ticket, client.chat(
            body.model, [], fail_fast=fail_fast, job_id=job_id, **call, **fields))
        return JSONResponse({
            "id": f"cmpl-{result.job_id}", "object": "text_completion", "created": int(time.time()),
            "model": result.model, "usage": result.usage.model_dump(),
            "choices": [{"index": 0, "text": echo + result.text, "logprobs": None,
                         "finish_reason": result.finish_reason}]},
            headers={"x-smmf-model": result.model, **headers})

    @app.get("/v1/chat/completions/{completion_id}/stream", response_model=None)
    async def resume_chat_stream(completion_id: str, model: str, request: Request,
                                 include_usage: bool = False,
                                 last_event_id: str | None = Header(default=None,
                                                                    pattern=LAST_EVENT_ID)) -> Any:
        """The rest of a streamed chat after the frame `Last-Event-ID` names (all of it without
        one), from the job's event log and then live; see gateway_resume.py."""
        request.state.model = model
        config.model(model, "llm")
        await accounting().check(request.state, model)
        after = parse_last_event_id(last_event_id)
        request.state.request_id = job_id = completion_id.removeprefix("chatcmpl-")
        left_streams: LeftStreams = app.state.left_streams
        token = await left_streams.attach(job_id)
        stream = app.state.client.replay(job_id, model, from_seq=max(1, after[0] + 1),
                                         wait_for_start=False)
        first = asyncio.ensure_future(next_or_none(stream))
        await first  # UnknownJob: a 404
        return EventStream(sse(model, job_id, first, stream, include_usage, after,
                               lambda: left_streams.left(job_id, token), config.gateway.keepalive_s))

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingsRequest, request: Request, deadlines: Deadlines) -> Response:
        request.state.model = body.model
        request.state.request_id = job_id = new_job_id()
        texts = body.texts()
        ticket = await accounting().admit(request.state, body.model, job_id, "embedding", inputs=len(texts))
        end = await accounting().settled(ticket, app.state.client.embedding_job(
            body.model, texts, fail_fast=fail_fast, job_id=job_id, dimensions=body.dimensions,
            **deadlines))
        return _embeddings_reply(body.model, end, body.encoding_format)

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank(body: RerankRequest, request: Request, deadlines: Deadlines) -> dict[str, Any]:
        """Documents by falling relevance to the query, in the shape of Cohere's and Jina's
        rerank APIs (which vLLM and Xinference serve too)."""
        request.state.model = body.model
        request.state.request_id = job_id = new_job_id()
        ticket = await accounting().admit(request.state, body.model, job_id, "reranker",
                                          inputs=len(body.documents))
        result = await accounting().settled(ticket, app.state.client.rerank(
            body.model, body.query, body.texts(), top_n=body.top_n,
            return_documents=body.return_documents, fail_fast=fail_fast, job_id=job_id, **deadlines))
        return {"id": f"rerank-{job_id}", "model": body.model,
                "results": [{"index": item.index, "relevance_score": item.relevance_score,
                             **({"document": {"text": item.document}} if item.document is not None else {})}
                            for item in result.results],
                "usage": {"total_tokens": result.usage.total_tokens}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        allowed = await accounting().check(request.state)  # a virtual key sees its models only
        workers = await app.state.client.live_workers()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": started, "owned_by": "smmf-queue", "kind": m.kind,
             "provider": m.provider, "live_workers": registry.replicas(workers, m.kind, m.name)}
            for m in config.models if may_call(allowed, m.name)]}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Gateway metrics, with queue depth and live workers per model read from Redis now."""
        client: AsyncClient = app.state.client
        workers = await client.live_workers()
        for m in config.models:
            metrics.LIVE_WORKERS.labels(m.name, m.kind).set(registry.replicas(workers, m.kind, m.name))
            depth = await client.queue_depth(m.kind, m.name)
            if depth is not None:
                metrics.QUEUE_DEPTH.labels(m.name, m.kind).set(depth)
        return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None)
    async def readyz() -> Any:
        try:
            await app.state.client.ping()
        except (OSError, redis.RedisError) as exc:
            return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
        return {"status": "ready"}

    return app


async def _deadlines(x_smmf_timeout: float | None = Header(default=None, gt=0, le=MAX_DEADLINE_S),
                     x_smmf_queue_timeout: float | None = Header(default=None, gt=0, le=MAX_DEADLINE_S),
                     ) -> dict[str, float]:
    """A request's deadlines, from headers (OpenAI's request body has no place for them):
    `x-smmf-timeout`, seconds for the whole job; `x-smmf-queue-timeout`, seconds it may wait for
    a worker to start it. Past either the caller gets a 504 `job_timeout`. (Async, though it
    waits for nothing: FastAPI runs a plain function in its thread pool, a hop per request.)"""
    given = {"timeout": x_smmf_timeout, "queue_timeout": x_smmf_queue_timeout}
    return {name: seconds for name, seconds in given.items() if seconds is not None}


Deadlines = Annotated[dict[str, float], Depends(_deadlines)]


@dataclass
class _GuardSettings:
    """What the guard takes from the config: the static keys, the models (its counter's
    labels) and the body limit; `update` puts a reloaded config's in place."""

    keys: set[str]
    models: set[str]
    max_body_bytes: int

    @classmethod
    def of(cls, config: SmmfConfig) -> _GuardSettings:
        return cls({k.get_secret_value() for k in config.gateway.api_keys},
                   {m.name for m in config.models}, config.gateway.max_body_bytes)

    def update(self, config: SmmfConfig) -> None:
        self.keys, self.models, self.max_body_bytes = astuple(self.of(config))


class _Guard:
    """API keys and the body-size limit for the API (`GUARDED`) and the master key for the admin
    API (`ADMIN`), the request counter, `x-request-id`, and a virtual key's `x-ratelimit-*`.

    A static key (`gateway.api_keys`) or the master key passes here; a virtual key (`sk-...`,
    with a master key configured) is handed to its route, which admits it with the model the
    request names (one Redis script: virtual_keys.py).

    Pure ASGI: Starlette's `@app.middleware("http")` passes every streamed response through a
    task and a memory stream, which cost the gateway dearly per request (docs/performance-log.md). The counter's
    labels are bounded, whatever clients send: the route's template (not the raw path) and a
    configured model's name (anything else counts as "unknown")."""

    def __init__(self, app: ASGIApp, settings: _GuardSettings, master: str | None):
        self.app = app
        self.settings = settings
        self.master = master

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_request_id(message: Message) -> None:
            """Every response says `x-request-id`: its job's id where it has one."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request_id = scope.get("state", {}).get("request_id") or ""
                if not _HEADER_SAFE_ID.fullmatch(request_id):  # e.g. a resume of a bogus id
                    request_id = new_job_id()
                limits = scope.get("state", {}).get("ratelimit_headers") or {}
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode()),
                                      *((name.encode(), value.encode()) for name, value in limits.items())]
            await send(message)

        if scope["path"].startswith(ADMIN) and self.master:
            bearer = Headers(scope=scope).get("authorization", "").removeprefix("Bearer ")
            if not secrets.compare_digest(bearer.encode(), self.master.encode()):
                await _invalid_key()(scope, receive, send_with_request_id)
                return
        if not scope["path"].startswith(GUARDED):
            await self.app(scope, receive, send_with_request_id)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_request_id)
            _log_access(scope, status, started)
            return
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            model = scope.get("state", {}).get("model", "")  # set by the endpoint, unchecked
            route = scope.get("route")  # set by FastAPI's router when a route matched
            metrics.REQUESTS.labels(getattr(route, "path", "unmatched"),
                                    model if model in self.settings.models or not model else "unknown",
                                    str(status)).inc()
            _log_access(scope, status, started)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        keys, limit = self.settings.keys, self.settings.max_body_bytes
        if self.master and bearer.startswith(KEY_PREFIX) and bearer not in keys:
            scope.setdefault("state", {})["virtual_key"] = bearer
        elif (keys or self.master) and bearer not in keys and bearer != self.master:
            return _invalid_key()
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return error_response(413, f"Request body of {length} bytes exceeds the limit of "
                                  f"{limit} bytes.", "invalid_request_error",
                                  "request_too_large")
        return None


def _log_access(scope: Scope, status: int, started: float) -> None:
    """One access line per API request, at INFO: method, route, status, duration, job id."""
    if not ACCESS_LOG.isEnabledFor(logging.INFO):
        return
    route = getattr(scope.get("route"), "path", scope["path"])
    job_id = scope.get("state", {}).get("request_id")
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    ACCESS_LOG.info("%s %s %d %.2f ms job %s", scope["method"], route, status, duration_ms, job_id or "-",
                    extra={"method": scope["method"], "route": route, "status": status,
                           "duration_ms": duration_ms, "job_id": job_id})


def _invalid_key() -> JSONResponse:
    return error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def _embeddings_reply(model: str, end: StreamEvent, encoding: str) -> Response:
    """OpenAI's embeddings reply, written from the float32 rows the vectors crossed the queue as:
    each row's bytes in base64, or JSON numbers of float32's shortest digits (orjson). Through
    Python floats, at float64's 17 digits, the reply was longer and dearer to write
    (docs/performance-log.md)."""
    rows = vector_rows(end.vectors_b64 or "", end.dims or 0)
    vectors = ([base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
               if encoding == "base64" else list(rows))
    usage = end.usage or Usage()
    body = {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens}}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def serve(config: SmmfConfig, host: str | None = None, port: int | None = None,
          loglevel: str = "WARNING") -> None:
    """Run the gateway with uvicorn until stopped; at INFO each request gets an access line
    (`_Guard`: uvicorn's own, which knows no route or job, is off), in logs.py's format."""
    import uvicorn

    logs.configure(loglevel)
    tracing.setup("smmf-queue-gateway")  # FastAPI traces each request itself once a provider is set
    uvicorn.run(create_app(config), host=host or config.gateway.host,
                port=port or config.gateway.port, log_level=loglevel.lower(), log_config=None,
                access_log=False, timeout_graceful_shutdown=config.gateway.shutdown_grace_s)

