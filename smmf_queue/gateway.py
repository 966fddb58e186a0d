"""The OpenAI-compatible HTTP gateway: `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.

It enqueues onto the same per-model queues as the SDK (it is an AsyncClient behind FastAPI).
Streamed chunks are built as small dicts and serialised once each: no SDK object per token.
Every error leaves as OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
its status from one table (`_STATUS`); a failure mid-stream ends the stream with such a frame.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import prometheus_client
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics, registry
from .client import AsyncClient
from .config import SmmfConfig
from .errors import (
    BrokerUnavailable,
    JobFailed,
    JobTimeout,
    NoLiveWorker,
    RequestError,
    SmmfError,
    UnknownModel,
)
from .jobs import new_job_id, pack_vectors

#: seconds a client should wait before sending again a request answered 503.
RETRY_AFTER_S = 2
#: SmmfError class → (HTTP status, OpenAI error type, code); the first match wins.
_STATUS: list[tuple[type[SmmfError], int, str, str | None]] = [
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (RequestError, 400, "invalid_request_error", None),
    (NoLiveWorker, 503, "service_unavailable", "no_live_worker"),
    (BrokerUnavailable, 503, "service_unavailable", "broker_unavailable"),
    (JobTimeout, 504, "timeout", "job_timeout"),
    (JobFailed, 502, "api_error", "job_failed"),
    (SmmfError, 500, "api_error", None),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """OpenAI allows content as a list of parts; the text parts are what models read."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that smmf-queue honours."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

    def params(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        params = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                  "max_tokens": self.max_completion_tokens or self.max_tokens, "stop": stop}
        return {key: value for key, value in params.items() if value is not None}


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


def create_app(config: SmmfConfig) -> FastAPI:
    """The gateway for one config; its AsyncClient lives as long as the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncClient(config)
        yield
        await app.state.client.aclose()

    app = FastAPI(title="smmf-queue gateway", lifespan=lifespan)
    fail_fast = not config.gateway.wait_for_worker

    app.add_middleware(_Guard, keys={k.get_secret_value() for k in config.gateway.api_keys},
                       models={m.name for m in config.models},
                       max_body_bytes=config.gateway.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"] if p != "body")
        return _error(400, f"{param}: {error['msg']}" if param else error["msg"],
                      "invalid_request_error", None, param or None)

    @app.exception_handler(SmmfError)
    async def smmf_error(request: Request, exc: SmmfError) -> JSONResponse:
        status, kind, code = _classify(exc)
        return _error(status, exc.message, kind, code)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        """Redis unreachable where a route reads it directly (models, metrics): a 503 too."""
        return _error(503, f"cannot reach Redis: {type(exc).__name__}: {exc}", "service_unavailable",
                      "broker_unavailable")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        client: AsyncClient = app.state.client
        request.state.model = body.model
        arrived = time.perf_counter()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        job_id = new_job_id()
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            stream = client.stream_chat(body.model, messages, fail_fast=fail_fast, job_id=job_id,
                                        **body.params())
            first = await _first(stream)  # errors before the first token are plain 4xx/5xx
            metrics.GATEWAY_TTFT.labels(body.model).observe(time.perf_counter() - arrived)
            return StreamingResponse(_sse(body.model, job_id, first, stream, include_usage),
                                     media_type="text/event-stream")
        result = await client.chat(body.model, messages, fail_fast=fail_fast, job_id=job_id,
                                   **body.params())
        return {
            "id": f"chatcmpl-{job_id}", "object": "chat.completion",
            "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "finish_reason": result.finish_reason,
                         "message": _message(result.text, result.reasoning)}],
            "usage": result.usage.model_dump(),
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
        request.state.model = body.model
        texts = [body.input] if isinstance(body.input, str) else body.input
        result = await app.state.client.embed(body.model, texts, fail_fast=fail_fast)
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i,
                          "embedding": _encode(vector, body.encoding_format)}
                         for i, vector in enumerate(result.vectors)],
                "usage": {"prompt_tokens": result.usage.prompt_tokens,
                          "total_tokens": result.usage.total_tokens}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        workers = await app.state.client.live_workers()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "owned_by": "smmf-queue", "kind": m.kind,
             "provider": m.provider, "live_workers": registry.replicas(workers, m.kind, m.name)}
            for m in config.models]}

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


class _Guard:
    """API keys and the body-size limit for `/v1/`, and the request counter.

    Pure ASGI: Starlette's `@app.middleware("http")` passes every streamed response through a
    task and a memory stream, which cost the gateway about 1 ms per request. The counter's
    labels are bounded, whatever clients send: the route's template (not the raw path) and a
    configured model's name (anything else counts as "unknown")."""

    def __init__(self, app: ASGIApp, keys: set[str], models: set[str], max_body_bytes: int):
        self.app = app
        self.keys = keys
        self.models = models
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            model = scope.get("state", {}).get("model", "")  # set by the endpoint, unchecked
            route = scope.get("route")  # set by FastAPI's router when a route matched
            metrics.REQUESTS.labels(getattr(route, "path", "unmatched"),
                                    model if model in self.models or not model else "unknown",
                                    str(status)).inc()

    def _refusal(self, headers: Headers) -> JSONResponse | None:
        if self.keys and headers.get("authorization", "").removeprefix("Bearer ") not in self.keys:
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            return _error(413, f"Request body of {length} bytes exceeds the limit of "
                          f"{self.max_body_bytes} bytes.", "invalid_request_error", "request_too_large")
        return None


async def _first(stream: AsyncIterator[Any]) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _sse(model: str, job_id: str, first: Any, stream: AsyncIterator[Any],
               include_usage: bool) -> AsyncIterator[bytes]:
    """SSE frames of chat.completion.chunk objects, ending with `[DONE]`."""
    chunk_id, created = f"chatcmpl-{job_id}", int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _data({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                      "model": model, "choices": choices, **extra})

    def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chunk([{"index": 0, "delta": delta, "finish_reason": finish}])

    yield frame({"role": "assistant", "content": ""})
    sent = False
    try:
        delta = first
        while delta is not None:
            if delta.restart and sent:
                # An OpenAI stream cannot take back what it sent: end it; the caller retries.
                raise JobFailed("the worker streaming this reply was lost after part of it was "
                                "sent; retry the request", error_type="WorkerLost", model=model,
                                job_id=job_id)
            if delta.text or delta.reasoning:
                sent = True
                yield frame(_message(delta.text, delta.reasoning, role=False))
            if delta.finish_reason is not None:
                yield frame({}, delta.finish_reason)
                if include_usage and delta.usage is not None:
                    yield chunk([], usage=delta.usage.model_dump())
            delta = await _first(stream)
    except SmmfError as exc:
        _, kind, code = _classify(exc)
        yield _data({"error": {"message": exc.message, "type": kind, "param": None, "code": code}})
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # a client that left ends the job's stream
    yield b"data: [DONE]\n\n"


def _data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _message(text: str, reasoning: str, role: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"} if role else {}
    message["content"] = text
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    packed, _ = pack_vectors([vector])
    return packed


def _classify(exc: SmmfError) -> tuple[int, str, str | None]:
    for cls, status, kind, code in _STATUS:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "api_error", None


def _error(status: int, message: str, kind: str, code: str | None,
           param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error; a 503 (Redis, or every worker of the model, down) also says when
    to try again, as clients and load balancers expect."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def serve(config: SmmfConfig, host: str | None = None, port: int | None = None) -> None:
    """Run the gateway with uvicorn until stopped."""
    import uvicorn

    uvicorn.run(create_app(config), host=host or config.gateway.host,
                port=port or config.gateway.port, log_level="warning")

