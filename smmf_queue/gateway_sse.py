"""The gateway's streamed replies: OpenAI's server-sent events, built as small dicts and
serialised once each (no SDK object per token).

Each chat frame carries an SSE `id:`, so that a client that drops can resume the stream
(gateway_resume.py); a comment line goes out while the job waits for a worker; a failure
mid-stream ends the stream with an OpenAI-shaped error frame, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from . import metrics, tool_calls
from .errors import JobFailed, SmmfError
from .gateway_errors import classify
from .gateway_resume import ROLE_FRAME, FrameId, frame_id_text
from .jobs import ChatDelta, ChatResult, Usage

if TYPE_CHECKING:
    from .client import AsyncClient

#: headers of every SSE response: no cache, and no buffering by a proxy such as nginx.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: what a streamed response sends while its job waits for a worker (an SSE comment line).
KEEPALIVE = b": waiting for a worker\n\n"


class EventStream(StreamingResponse):
    """A response of SSE frames, whose frames' generator is cancelled when the client leaves.

    Starlette's StreamingResponse watches for the client leaving from an anyio task group: a
    third of what FastAPI and uvicorn cost a streamed chat (BENCHMARKS.md, the HTTP floor).
    Here one plain asyncio task waits for the disconnect and cancels the response's own task.
    The watch is needed: uvicorn speaks ASGI 2.3, where a write to a client that left is dropped
    without an error.
    """

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(frames, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        left = finished = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:  # after the last frame, uvicorn answers receive() with a disconnect
                left = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
            finished = True
        except asyncio.CancelledError:
            if not left or streaming.uncancel() > 0:  # cancelled for another reason too
                raise
        finally:
            watcher.cancel()


async def next_or_none(stream: AsyncIterator[Any]) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def observe_ttft(model: str, arrived: float, first: asyncio.Future[Any]) -> None:
    """The gateway's time to first token, for streams whose first delta came."""
    if not first.cancelled() and first.exception() is None:
        metrics.GATEWAY_TTFT.labels(model).observe(time.perf_counter() - arrived)


async def queued_stream(client: AsyncClient, model: str, messages: list[dict[str, Any]],
                        on_end: Callable[[Usage | None], Awaitable[None]] | None = None,
                        **call: Any) -> tuple[AsyncIterator[ChatDelta], asyncio.Future[Any]]:
    """A streamed job, once it is on its queue: (its deltas, the future of the first one). A
    refusal, which comes before anything is queued, raises here: a plain 4xx/5xx, not a frame.
    `on_end` gets the job's usage when its stream ends (None if it ended without one)."""
    queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_queued() -> None:  # once per model tried (fallbacks)
        if not queued.done():
            queued.set_result(None)

    stream = client.stream_chat(model, messages, on_queued=on_queued, **call)
    if on_end is not None:
        stream = _ending(stream, on_end)
    first = asyncio.ensure_future(next_or_none(stream))
    await asyncio.wait({first, queued}, return_when=asyncio.FIRST_COMPLETED)
    if first.done():
        first.result()
    return stream, first


async def _ending(stream: AsyncIterator[ChatDelta],
                  on_end: Callable[[Usage | None], Awaitable[None]]) -> AsyncIterator[ChatDelta]:
    """`stream`, calling `on_end` with its usage once it is over, however it ends."""
    usage = None
    try:
        async for delta in stream:
            usage = delta.usage or usage
            yield delta
    finally:
        await on_end(usage)


def chat_choice(delta: ChatDelta | None, finish: str | None) -> dict[str, Any]:
    """A chat.completion.chunk's choice: a piece of the message, or (no delta) its end."""
    piece: dict[str, Any] = {}
    choice: dict[str, Any] = {"index": 0, "delta": piece, "finish_reason": finish}
    if delta is not None:
        piece.update(assistant_message(delta.text, delta.reasoning, role=False))
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


CHAT = _Shape("chat.completion.chunk", "chatcmpl-", True, chat_choice)
COMPLETION = _Shape("text_completion", "cmpl-", False, _completion_choice)


async def sse(model: str, job_id: str, first: asyncio.Future[ChatDelta | None],
               stream: AsyncIterator[ChatDelta], include_usage: bool, after: FrameId,
               on_leave: Callable[[], None], keepalive_s: float,
               shape: _Shape = CHAT, echo: str = "") -> AsyncIterator[bytes]:
    """SSE frames of `shape`'s chunks after the frame `after`, ending with `[DONE]`; a comment
    line every `keepalive_s` until `first` (the first delta) comes; `on_leave` is called if the
    client leaves before the end. `echo` (a completion's prompt) goes first, as frame 0."""
    chunk_id, created = f"{shape.id_prefix}{job_id}", int(time.time())

    def chunk(frame: FrameId, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"id: " + frame_id_text(frame).encode() + b"\n" + data(
            {"id": chunk_id, "object": shape.object, "created": created,
             "model": model, "choices": choices, **extra})

    # Frames ready together go out in one write (the role frame with the first delta, or with
    # the first comment line while the job waits for a worker; the finish, usage and [DONE]
    # frames): each write is a trip through Starlette and uvicorn. A delta's frame goes out
    # before the next delta is awaited.
    pending = b""
    if shape.role_frame and after < ROLE_FRAME:
        pending += chunk(ROLE_FRAME, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}])
    if echo and after < ROLE_FRAME:
        pending += chunk(ROLE_FRAME, [shape.choice(ChatDelta(text=echo), None)])
    sent = after > ROLE_FRAME  # the client may hold text already
    ended = False
    try:
        while not first.done() and not (await asyncio.wait({first}, timeout=keepalive_s))[0]:
            yield pending + KEEPALIVE
            pending = b""
        delta = first.result()
        while delta is not None:
            model = delta.model or model  # a fallback answers: its chunks name it
            if delta.restart and sent:
                # An OpenAI stream cannot take back what it sent: end it; the caller retries.
                raise JobFailed("the worker streaming this reply was lost after part of it was "
                                "sent; retry the request", error_type="WorkerLost", model=model,
                                job_id=job_id)
            if (delta.text or delta.reasoning or delta.tool_calls or delta.logprobs) and (delta.seq, 0) > after:
                sent = True
                pending += chunk((delta.seq, 0), [shape.choice(delta, None)])
            if delta.finish_reason is not None:
                ended = True
                if (delta.seq, 0) > after:
                    pending += chunk((delta.seq, 0), [shape.choice(None, delta.finish_reason)])
                if include_usage and delta.usage is not None and (delta.seq, 1) > after:
                    pending += chunk((delta.seq, 1), [], usage=delta.usage.model_dump())
            elif pending:
                yield pending
                pending = b""
            delta = await next_or_none(stream)
    except SmmfError as exc:
        ended = True
        _, kind, code = classify(exc)
        pending += data({"error": {"message": exc.message, "type": kind, "param": None, "code": code}})
    finally:
        if not ended:  # the client left: the job runs on for a while, for it to resume
            on_leave()
        if not first.done():  # it was waiting for a worker: stop reading first
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()  # type: ignore[attr-defined]
    yield pending + b"data: [DONE]\n\n"


def data(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def whole_choice(result: ChatResult, logprobs: bool) -> dict[str, Any]:
    """A whole reply's choice: the message (content null when it only calls tools), why it
    ended, and its logprobs when asked."""
    message = assistant_message(result.text, result.reasoning)
    if result.tool_calls:
        message.update(content=result.text or None,
                       tool_calls=[call.model_dump() for call in result.tool_calls])
    return {"index": 0, "finish_reason": result.finish_reason, "message": message,
            "logprobs": {"content": result.logprobs, "refusal": None} if logprobs else None}


def assistant_message(text: str, reasoning: str, role: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"} if role else {}
    message["content"] = text
    if reasoning:
        message["reasoning_content"] = reasoning
    return message
