"""The OpenAI-compatible HTTP gateway: `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/models`, and `/v1/rerank` (Cohere's and Jina's shape).

It enqueues onto the same per-model queues as the SDK (it is an AsyncClient behind FastAPI).
Streamed chunks are built as small dicts and serialised once each: no SDK object per token;
each carries an SSE `id:`, so that a client that drops can resume the stream
(`GET /v1/chat/completions/{id}/stream`, gateway_resume.py). Every error leaves as OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with its status from one table
(`_STATUS`); a failure mid-stream ends the stream with such a frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal
from urllib.parse import quote

import prometheus_client
import redis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import chat_fields, gateway_openapi, metrics, registry, tool_calls
from .client import AsyncClient
from .config import SmmfConfig
from .errors import (
    BrokerUnavailable,
    JobFailed,
    JobTimeout,
    NoLiveWorker,
    RequestError,
    SmmfError,
    UnknownJob,
    UnknownModel,
    UnsupportedParameter,
)
from .gateway_resume import (
    LAST_EVENT_ID,
    NOTHING_SEEN,
    ROLE_FRAME,
    FrameId,
    LeftStreams,
    frame_id_text,
    parse_last_event_id,
)
from .jobs import JOB_ID_PATTERN, MAX_STOPS, SEED_MAX, ChatDelta, ToolCall, new_job_id, pack_vectors

log = logging.getLogger("smmf_queue.gateway")

#: seconds a client should wait before sending again a request answered 503.
RETRY_AFTER_S = 2
#: the longest deadline a request may carry, seconds.
MAX_DEADLINE_S = 7 * 24 * 3600
#: SmmfError class → (HTTP status, OpenAI error type, code); the first match wins.
_STATUS: list[tuple[type[SmmfError], int, str, str | None]] = [
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (UnknownJob, 404, "invalid_request_error", "stream_not_found"),
    (UnsupportedParameter, 400, "invalid_request_error", "unsupported_parameter"),
    (RequestError, 400, "invalid_request_error", None),
    (NoLiveWorker, 503, "server_error", "no_live_worker"),
    (BrokerUnavailable, 503, "server_error", "broker_unavailable"),
    (JobTimeout, 504, "server_error", "job_timeout"),
    (JobFailed, 502, "server_error", "job_failed"),
    (SmmfError, 500, "server_error", None),
]
#: a job id that may go out in a header as it is.
_HEADER_SAFE_ID = re.compile(JOB_ID_PATTERN)
#: the paths that take API keys and count requests: the API, and Cohere's rerank path.
GUARDED = ("/v1/", "/rerank")
#: headers of every SSE response: no cache, and no buffering by a proxy such as nginx.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: what a streamed response sends while its job waits for a worker (an SSE comment line).
KEEPALIVE = b": waiting for a worker\n\n"


class _ContentPart(BaseModel):
    """One part of a message's content: text, an image by URL (http(s) or `data:`), or another
    kind that chat_fields.py refuses."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    #: an assistant turn's tool calls, sent back with the `tool` messages that answer them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def wire(self) -> dict[str, Any]:
        """The message as the SDK takes it (chat_fields.shape_messages makes it the wire's)."""
        return self.model_dump(include={"role", "content", "name", "tool_calls", "tool_call_id"},
                               exclude_none=True)


class _Function(BaseModel):
    """A function tool; keys beyond OpenAI's are passed on, as with every field of a tool or a
    response format (a vendor's extension reaches its API: nothing is dropped unsaid)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    #: a JSON schema of the arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: _Function


class _NamedTool(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class _JsonSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(BaseModel):
    """`json_object` may carry a `schema` too (llama.cpp's extension of JSON mode)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


#: what ChatCompletionRequest.fields() leaves out: not fields of the job.
_NOT_JOB_FIELDS = {"model", "messages", "stream", "stream_options", "max_completion_tokens"}


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request: the fields a model honours reach it, the others are
    refused or dropped (chat_fields.py); unknown extra fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedTool | None = None
    parallel_tool_calls: bool | None = None
    response_format: _ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    def fields(self) -> dict[str, Any]:
        """The fields it sets besides the model and messages, by the SDK's names."""
        fields = self.model_dump(exclude_unset=True, exclude=_NOT_JOB_FIELDS, by_alias=True)
        fields = {name: value for name, value in fields.items() if name in type(self).model_fields}
        if isinstance(self.stop, str):
            fields["stop"] = [self.stop]
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        return {name: value for name, value in fields.items() if value is not None}


class CompletionRequest(BaseModel):
    """OpenAI's completions request: a prompt continued as it is, with no chat template."""

    model_config = ConfigDict(extra="allow")
    model: str
    #: one prompt (several would be several choices: refused by the length check).
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    #: OpenAI's default for this API is 16.
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    #: the prompt, then the completion, in the reply's text.
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def fields(self) -> dict[str, Any]:
        """The fields it sets besides the model and prompt, by the SDK's names."""
        fields = self.model_dump(exclude={"model", "prompt", "stream", "stream_options", "echo"})
        fields = {name: value for name, value in fields.items()
                  if name in type(self).model_fields and value is not None}
        if isinstance(self.stop, str):
            fields["stop"] = [self.stop]
        return fields


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. `input` as token ids (LangChain's OpenAIEmbeddings sends
    them by default, counted with tiktoken's encodings, not the served model's) is refused
    with a 400 that says how to send text instead."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
            | Annotated[list[list[int]], Field(min_length=1)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, str) for item in self.input):
            return self.input  # type: ignore[return-value]
        raise RequestError(
            "input: token ids are not taken: smmf-queue cannot know which tokenizer made them "
            "(LangChain's OpenAIEmbeddings counts with tiktoken whatever the model); send text "
            "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))", model=self.model)


class _Document(BaseModel):
    text: str


class RerankRequest(BaseModel):
    """The rerank request of Cohere and Jina, as vLLM and Xinference serve it."""

    model_config = ConfigDict(extra="allow")
    model: str
    query: str
    #: (more than jobs.MAX_RERANK_DOCUMENTS is a 400 from the SDK's check)
    documents: list[str | _Document] = Field(min_length=1)
    #: only the best n (all when unset).
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def create_app(config: SmmfConfig) -> FastAPI:
    """The gateway for one config; its AsyncClient lives as long as the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = AsyncClient(config)
        app.state.left_streams = LeftStreams(app.state.client, config.gateway.resume_grace_s)
        yield
        await app.state.left_streams.aclose()
        await app.state.client.aclose()

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

    app.add_middleware(_Guard, keys={k.get_secret_value() for k in config.gateway.api_keys},
                       models={m.name for m in config.models},
                       max_body_bytes=config.gateway.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"] if p != "body")
        return _error(400, f"{param}: {error['msg']}" if param else error["msg"],
                      "invalid_request_error", None, param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, wrong method, a body that is not UTF-8)."""
        error = _error(exc.status_code, str(exc.detail), "invalid_request_error", None)
        error.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return error

    @app.exception_handler(SmmfError)
    async def smmf_error(request: Request, exc: SmmfError) -> JSONResponse:
        status, kind, code = _classify(exc)
        return _error(status, exc.message, kind, code, getattr(exc, "param", None))

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        """Redis unreachable where a route reads it directly (models, metrics): a 503 too."""
        return _error(503, f"cannot reach Redis: {type(exc).__name__}: {exc}", "service_unavailable",
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
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            queued = asyncio.Event()
            stream = client.stream_chat(body.model, messages, fail_fast=fail_fast, job_id=job_id,
                                        cancel_on_leave=False, on_queued=queued.set,
                                        **deadlines, **fields)
            first = asyncio.ensure_future(_first(stream))
            first.add_done_callback(partial(_observe_ttft, body.model, arrived))
            await _first_of(first, queued)
            if first.done():
                first.result()  # a refusal (before anything was queued) is a plain 4xx/5xx
            resume = (f"/v1/chat/completions/chatcmpl-{job_id}/stream?model={quote(body.model)}"
                      + ("&include_usage=true" if include_usage else ""))
            return StreamingResponse(
                _sse(body.model, job_id, first, stream, include_usage, NOTHING_SEEN,
                     lambda: app.state.left_streams.left(job_id, None), config.gateway.keepalive_s),
                media_type="text/event-stream",
                headers={"x-smmf-resume": resume, **SSE_HEADERS, **headers})
        result = await client.chat(body.model, messages, fail_fast=fail_fast, job_id=job_id,
                                   **deadlines, **fields)
        message = _message(result.text, result.reasoning)
        if result.tool_calls:
            message.update(content=result.text or None,
                           tool_calls=[call.model_dump() for call in result.tool_calls])
        logprobs = {"content": result.logprobs, "refusal": None} if fields.get("logprobs") else None
        return JSONResponse({
            "id": f"chatcmpl-{job_id}", "object": "chat.completion",
            "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "finish_reason": result.finish_reason, "message": message,
                         "logprobs": logprobs}],
            "usage": result.usage.model_dump(),
        }, headers=headers)

    def _refuse_or_drop(body: ChatCompletionRequest) -> list[str]:
        """The fields of `body` to drop (its model's drop_params); UnsupportedParameter for one
        its model cannot honour otherwise (chat_fields.py)."""
        entry = config.model(body.model, "llm")
        dropped = chat_fields.refuse_or_drop(body.model_dump(exclude_unset=True),
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
        dropped = chat_fields.refuse_or_drop(fields, [], body.model, entry.supports, entry.drop_params)
        headers = {"x-smmf-dropped-params": ",".join(dropped)} if dropped else {}
        fields = {name: value for name, value in fields.items() if name not in dropped}
        request.state.request_id = job_id = new_job_id()
        echo = body.text() if body.echo else ""
        if body.stream:
            queued = asyncio.Event()
            # No resume for this API: a client that leaves cancels its job at once.
            stream = client.stream_chat(body.model, [], fail_fast=fail_fast, job_id=job_id,
                                        cancel_on_leave=True, on_queued=queued.set,
                                        **deadlines, **fields)
            first = asyncio.ensure_future(_first(stream))
            await _first_of(first, queued)
            if first.done():
                first.result()  # a refusal is a plain 4xx/5xx
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _sse(body.model, job_id, first, stream, include_usage, NOTHING_SEEN, lambda: None,
                     config.gateway.keepalive_s, COMPLETION, echo),
                media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        result = await client.chat(body.model, [], fail_fast=fail_fast, job_id=job_id,
                                   **deadlines, **fields)
        return JSONResponse({
            "id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "usage": result.usage.model_dump(),
            "choices": [{"index": 0, "text": echo + result.text, "logprobs": None,
                         "finish_reason": result.finish_reason}]}, headers=headers)

    @app.get("/v1/chat/completions/{completion_id}/stream", response_model=None)
    async def resume_chat_stream(completion_id: str, model: str, request: Request,
                                 include_usage: bool = False,
                                 last_event_id: str | None = Header(default=None,
                                                                    pattern=LAST_EVENT_ID)) -> Any:
        """The rest of a streamed chat after the frame `Last-Event-ID` names (all of it without
        one), from the job's event log and then live; see gateway_resume.py."""
        request.state.model = model
        config.model(model, "llm")
        after = parse_last_event_id(last_event_id)
        request.state.request_id = job_id = completion_id.removeprefix("chatcmpl-")
        left_streams: LeftStreams = app.state.left_streams
        token = await left_streams.attach(job_id)
        stream = app.state.client.replay(job_id, model, from_seq=max(1, after[0] + 1),
                                         wait_for_start=False)
        first = asyncio.ensure_future(_first(stream))
        await first  # UnknownJob: a 404
        return StreamingResponse(_sse(model, job_id, first, stream, include_usage, after,
                                      lambda: left_streams.left(job_id, token),
                                      config.gateway.keepalive_s),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request,
                         deadlines: Deadlines) -> dict[str, Any]:
        request.state.model = body.model
        request.state.request_id = job_id = new_job_id()
        result = await app.state.client.embed(body.model, body.texts(), fail_fast=fail_fast,
                                              job_id=job_id, dimensions=body.dimensions, **deadlines)
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i,
                          "embedding": _encode(vector, body.encoding_format)}
                         for i, vector in enumerate(result.vectors)],
                "usage": {"prompt_tokens": result.usage.prompt_tokens,
                          "total_tokens": result.usage.total_tokens}}

    @app.post("/v1/rerank")
    @app.post("/rerank")
    async def rerank(body: RerankRequest, request: Request, deadlines: Deadlines) -> dict[str, Any]:
        """Documents by falling relevance to the query, in the shape of Cohere's and Jina's
        rerank APIs (which vLLM and Xinference serve too)."""
        request.state.model = body.model
        request.state.request_id = job_id = new_job_id()
        result = await app.state.client.rerank(body.model, body.query, body.texts(), top_n=body.top_n,
                                               return_documents=body.return_documents,
                                               fail_fast=fail_fast, job_id=job_id, **deadlines)
        return {"id": f"rerank-{job_id}", "model": body.model,
                "results": [{"index": item.index, "relevance_score": item.relevance_score,
                             **({"document": {"text": item.document}} if item.document is not None else {})}
                            for item in result.results],
                "usage": {"total_tokens": result.usage.total_tokens}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        workers = await app.state.client.live_workers()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": started, "owned_by": "smmf-queue", "kind": m.kind,
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


def _deadlines(x_smmf_timeout: float | None = Header(default=None, gt=0, le=MAX_DEADLINE_S),
               x_smmf_queue_timeout: float | None = Header(default=None, gt=0, le=MAX_DEADLINE_S),
               ) -> dict[str, float]:
    """A request's deadlines, from headers (OpenAI's request body has no place for them):
    `x-smmf-timeout`, seconds for the whole job; `x-smmf-queue-timeout`, seconds it may wait for
    a worker to start it. Past either the caller gets a 504 `job_timeout`."""
    given = {"timeout": x_smmf_timeout, "queue_timeout": x_smmf_queue_timeout}
    return {name: seconds for name, seconds in given.items() if seconds is not None}


Deadlines = Annotated[dict[str, float], Depends(_deadlines)]


class _Guard:
    """API keys and the body-size limit for the API (`GUARDED`), the request counter, and
    `x-request-id`.

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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_request_id(message: Message) -> None:
            """Every response says `x-request-id`: its job's id where it has one."""
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request_id = scope.get("state", {}).get("request_id") or ""
                if not _HEADER_SAFE_ID.fullmatch(request_id):  # e.g. a resume of a bogus id
                    request_id = new_job_id()
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        if not scope["path"].startswith(GUARDED):
            await self.app(scope, receive, send_with_request_id)
            return
        refusal = self._refusal(Headers(scope=scope))
        if refusal is not None:
            await refusal(scope, receive, send_with_request_id)
            return
        try:
            await self.app(scope, receive, send_with_request_id)
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


def _observe_ttft(model: str, arrived: float, first: asyncio.Future[Any]) -> None:
    """The gateway's time to first token, for streams whose first delta came."""
    if not first.cancelled() and first.exception() is None:
        metrics.GATEWAY_TTFT.labels(model).observe(time.perf_counter() - arrived)


async def _first_of(first: asyncio.Future[Any], queued: asyncio.Event) -> None:
    """Wait until the first delta came (or the stream failed) or the job is on its queue."""
    waiting = asyncio.ensure_future(queued.wait())
    await asyncio.wait({first, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()


def _chat_choice(delta: ChatDelta | None, finish: str | None) -> dict[str, Any]:
    """A chat.completion.chunk's choice: a piece of the message, or (no delta) its end."""
    piece: dict[str, Any] = {}
    choice: dict[str, Any] = {"index": 0, "delta": piece, "finish_reason": finish}
    if delta is not None:
        piece.update(_message(delta.text, delta.reasoning, role=False))
        if delta.tool_calls:
            piece["tool_calls"] = tool_calls.openai_fragments(delta.tool_calls)
        if delta.logprobs:
            choice["logprobs"] = {"content": delta.logprobs, "refusal": None}
    return choice


def _completion_choice(delta: ChatDelta | None, finish: str | None) -> dict[str, Any]:
    """A streamed text_completion's choice."""
    return {"index": 0, "text": delta.text if delta is not None else "", "logprobs": None,
            "finish_reason": finish}


@dataclass(frozen=True)
class _Shape:
    """What an API's streamed chunks are: chat.completion.chunk (after a role frame) or the
    completions API's text_completion."""

    object: str
    id_prefix: str
    role_frame: bool
    choice: Callable[[ChatDelta | None, str | None], dict[str, Any]]


CHAT = _Shape("chat.completion.chunk", "chatcmpl-", True, _chat_choice)
COMPLETION = _Shape("text_completion", "cmpl-", False, _completion_choice)


async def _sse(model: str, job_id: str, first: asyncio.Future[ChatDelta | None],
               stream: AsyncIterator[ChatDelta], include_usage: bool, after: FrameId,
               on_leave: Callable[[], None], keepalive_s: float,
               shape: _Shape = CHAT, echo: str = "") -> AsyncIterator[bytes]:
    """SSE frames of `shape`'s chunks after the frame `after`, ending with `[DONE]`; a comment
    line every `keepalive_s` until `first` (the first delta) comes; `on_leave` is called if the
    client leaves before the end. `echo` (a completion's prompt) goes first, as frame 0."""
    chunk_id, created = f"{shape.id_prefix}{job_id}", int(time.time())

    def chunk(frame: FrameId, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"id: " + frame_id_text(frame).encode() + b"\n" + _data(
            {"id": chunk_id, "object": shape.object, "created": created,
             "model": model, "choices": choices, **extra})

    if shape.role_frame and after < ROLE_FRAME:
        yield chunk(ROLE_FRAME, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}])
    if echo and after < ROLE_FRAME:
        yield chunk(ROLE_FRAME, [shape.choice(ChatDelta(text=echo), None)])
    sent = after > ROLE_FRAME  # the client may hold text already
    ended = False
    try:
        while not (await asyncio.wait({first}, timeout=keepalive_s))[0]:
            yield KEEPALIVE
        delta = first.result()
        while delta is not None:
            if delta.restart and sent:
                # An OpenAI stream cannot take back what it sent: end it; the caller retries.
                raise JobFailed("the worker streaming this reply was lost after part of it was "
                                "sent; retry the request", error_type="WorkerLost", model=model,
                                job_id=job_id)
            if (delta.text or delta.reasoning or delta.tool_calls) and (delta.seq, 0) > after:
                sent = True
                yield chunk((delta.seq, 0), [shape.choice(delta, None)])
            if delta.finish_reason is not None:
                ended = True
                if (delta.seq, 0) > after:
                    yield chunk((delta.seq, 0), [shape.choice(None, delta.finish_reason)])
                if include_usage and delta.usage is not None and (delta.seq, 1) > after:
                    yield chunk((delta.seq, 1), [], usage=delta.usage.model_dump())
            delta = await _first(stream)
    except SmmfError as exc:
        ended = True
        _, kind, code = _classify(exc)
        yield _data({"error": {"message": exc.message, "type": kind, "param": None, "code": code}})
    finally:
        if not ended:  # the client left: the job runs on for a while, for it to resume
            on_leave()
        if not first.done():  # it was waiting for a worker: stop reading first
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()  # type: ignore[attr-defined]
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
                port=port or config.gateway.port, log_level="warning",
                timeout_graceful_shutdown=config.gateway.shutdown_grace_s)

