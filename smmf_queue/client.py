"""The SDK: `AsyncClient` does the work; `Client` runs it on a private event loop thread.

    client = Client(config="configs/local.toml")
    client.chat("tiny-noise-chat", [{"role": "user", "content": "hi"}], temperature=0)
    for delta in client.stream_chat(...): print(delta.text, end="")
    client.embed("all-MiniLM-L6-v2", ["a", "b"]).vectors

A job goes: validate against the config → (fail fast if asked and no worker is alive) →
register with the hub (whose reply channel, named in the request, was subscribed before the
client's first job) → enqueue on the model's queue → read events in `seq` order, filling gaps
from the job's event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
from pydantic import ValidationError

from . import keys, registry
from .batch import ChunkResult, embed_chunks
from .config import ModelKind, SmmfConfig, load_config
from .errors import BrokerUnavailable, JobFailed, JobTimeout, NoLiveWorker, RequestError
from .hub import StreamHub, ThreadHub
from .jobs import (
    ChatDelta,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Lane,
    StreamEvent,
    new_job_id,
)
from .queues import JobSender, make_celery_app
from .streaming import EventAssembler, LogEntries, decode_log

T = TypeVar("T")

#: seconds without an event after which the reader checks the job's log (a lost pub/sub message).
QUIET_CHECK_S = 2.0


class AsyncClient:
    """Submits chat and embedding jobs to the queues that a config describes."""

    def __init__(self, config: str | os.PathLike[str] | SmmfConfig | None = None):
        self.config = config if isinstance(config, SmmfConfig) else load_config(config)
        self._redis = redis.asyncio.from_url(self.config.queue.redis)
        self._hub = StreamHub(self._redis)
        self._celery = make_celery_app(self.config, store_results=False)
        self._sender = JobSender(self._celery)
        self._liveness = registry.LivenessCache()

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   timeout: float | None = None, fail_fast: bool | None = None,
                   job_id: str | None = None, **params: Any) -> ChatResult:
        """Run a chat job and return the whole reply."""
        request = self._chat_request(model, messages, params, job_id)
        assembler = EventAssembler(request.job_id, model)
        async for _ in self._run("llm", request.model_dump(mode="json"), assembler, timeout, fail_fast):
            pass
        return assembler.chat_result()

    async def stream_chat(self, model: str, messages: list[dict[str, Any]], *,
                          timeout: float | None = None, fail_fast: bool | None = None,
                          job_id: str | None = None, **params: Any) -> AsyncIterator[ChatDelta]:
        """Yield the reply's deltas as the worker produces them; leaving early cancels the job."""
        request = self._chat_request(model, messages, params, job_id)
        assembler = EventAssembler(request.job_id, model)
        async for delta in self._run("llm", request.model_dump(mode="json"), assembler, timeout,
                                     fail_fast):
            yield delta

    async def embed(self, model: str, texts: list[str], *, normalize: bool | None = None,
                    timeout: float | None = None, fail_fast: bool | None = None) -> EmbeddingResult:
        """Vectors for `texts`, in input order."""
        assembler = await self._embedding_job(model, texts, normalize=normalize, timeout=timeout,
                                              fail_fast=fail_fast)
        return assembler.embedding_result()

    def embed_batch(self, model: str, texts: Iterable[str], **options: Any) -> AsyncIterator[ChunkResult]:
        """Embed a corpus of any size in chunks on the batch lane; yields chunks in input order.

        See `smmf_queue.batch.embed_chunks` for the options (token budget, window, resume)."""
        return embed_chunks(self, model, texts, **options)

    async def _embedding_job(self, model: str, texts: list[str], *, normalize: bool | None,
                             timeout: float | None, fail_fast: bool | None, job_id: str | None = None,
                             lane: Lane = "interactive") -> EventAssembler:
        """Run one embedding job; the assembler holds its terminal event."""
        self.config.model(model, "embedding")
        try:
            request = EmbeddingRequest(model=model, texts=list(texts), normalize=normalize,
                                       job_id=job_id or new_job_id(), lane=lane,
                                       reply_to=self._hub.reply_channel)
        except ValidationError as exc:
            raise RequestError(f"invalid embedding request: {exc}", model=model) from None
        assembler = EventAssembler(request.job_id, model)
        async for _ in self._run("embedding", request.model_dump(mode="json"), assembler, timeout,
                                 fail_fast):
            pass
        return assembler

    async def live_workers(self) -> list[registry.WorkerInfo]:
        """Workers whose heartbeat is current."""
        return await registry.alive_workers(self._redis)

    async def _cancel(self, job_id: str, ttl_s: float) -> None:
        """Flag the job as cancelled: a worker checks it when it claims and with every event."""
        with contextlib.suppress(OSError, redis.RedisError):
            await self._redis.set(keys.cancel_flag(job_id), 1, ex=max(1, int(ttl_s)))

    async def queue_depth(self, kind: str, model: str) -> int | None:
        """Jobs waiting in a model's queue (all lanes); None when the broker is not this Redis."""
        if self.config.queue.broker_url != self.config.queue.redis:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for lane in keys.queue_lanes(kind, model):
                pipe.llen(lane)
            return sum(await pipe.execute())

    async def ping(self) -> None:
        """Raise if Redis cannot be reached."""
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._hub.aclose()
        await self._redis.aclose()
        self._sender.close()
        self._celery.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _chat_request(self, model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                      job_id: str | None, reply_to: str | None = None) -> ChatRequest:
        self.config.model(model, "llm")
        try:
            return ChatRequest(model=model, messages=messages, params=params,
                               job_id=job_id or new_job_id(),
                               reply_to=reply_to or self._hub.reply_channel)
        except ValidationError as exc:
            raise RequestError(f"invalid chat request: {_first_error(exc)}", model=model) from None

    async def _run(self, kind: ModelKind, request: dict[str, Any], assembler: EventAssembler,
                   timeout: float | None, fail_fast: bool | None) -> AsyncIterator[ChatDelta]:
        """Enqueue one job and yield its deltas (the last one says why it ended)."""
        timeout = timeout or self.config.queue.job_timeout_s
        if self._wants_fail_fast(fail_fast):
            await self._require_worker(kind, request["model"])
        await self._start_hub(request["model"])
        inbox = self._hub.open(request["job_id"])
        self._enqueue(self._hub, kind, request, timeout)
        async for delta in self._follow(kind, request, inbox, assembler, timeout):
            yield delta

    async def _start_hub(self, model: str) -> None:
        """Subscribe the hub's reply channel (once): before any job is enqueued."""
        try:
            await self._hub.start()
        except (OSError, redis.RedisError, asyncio.TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis: {exc}", model=model) from None

    def _enqueue(self, hub: StreamHub | ThreadHub, kind: ModelKind, request: dict[str, Any],
                 timeout: float) -> None:
        """Enqueue a job whose events `hub` already routes (`open`); stop routing them if the
        broker refuses it. Blocks for one Redis round trip (kombu's producer), which is cheaper
        than a hop to a thread and back."""
        try:
            self._send(kind, request, timeout)
        except BaseException:
            hub.close(request["job_id"])
            raise

    async def _follow(self, kind: ModelKind, request: dict[str, Any], inbox: asyncio.Queue[bytes],
                      assembler: EventAssembler, timeout: float) -> AsyncIterator[ChatDelta]:
        """The submitted job's deltas until its terminal event; leaving early cancels the job."""
        job_id = request["job_id"]
        try:
            deadline = time.monotonic() + timeout
            async for event in self._events(inbox, assembler, deadline):
                delta = assembler.apply(event)
                if delta is not None:
                    yield delta
                if assembler.terminal is not None:
                    break
        finally:
            self._hub.close(job_id)
            if assembler.terminal is None:  # the caller left or timed out: stop the job
                await self._cancel(job_id, timeout)
        for delta in _ending(kind, assembler):
            yield delta

    async def _events(self, inbox: asyncio.Queue[bytes], assembler: EventAssembler,
                      deadline: float) -> AsyncIterator[StreamEvent]:
        """Events in seq order: live ones from the inbox, missing ones from the log.

        The consumer applies each event before asking for the next, so `assembler.want` is
        always the next seq needed.
        """
        while assembler.terminal is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeout(f"no result within the timeout for job {assembler.job_id}",
                                 model=assembler.model, job_id=assembler.job_id)
            try:
                if inbox.empty():
                    async with asyncio.timeout(min(remaining, QUIET_CHECK_S)):
                        raw = await inbox.get()
                else:
                    raw = inbox.get_nowait()
            except TimeoutError:  # quiet: a lost message, or a slow job; ask the log
                for event in await self._replay(assembler.job_id, assembler.want):
                    yield event
                continue
            event = StreamEvent.model_validate_json(raw)
            if event.seq > assembler.want:
                for missing in await self._replay(assembler.job_id, assembler.want, event.seq - 1):
                    yield missing
            if event.seq == assembler.want:
                yield event

    async def _replay(self, job_id: str, first: int, last: int | None = None) -> list[StreamEvent]:
        """Logged events first..last; none while Redis is unreachable (the reader asks again)."""
        try:
            entries = await self._redis.xrange(keys.event_log(job_id), f"{first}-0",
                                               f"{last}-0" if last is not None else "+")
        except (OSError, redis.RedisError):
            return []
        return decode_log(cast(LogEntries, entries))

    async def replay(self, job_id: str, model: str, from_seq: int = 1) -> AsyncIterator[ChatDelta]:
        """Read a job's stream from `from_seq`, whether it is running or already finished."""
        assembler = EventAssembler(job_id, model)
        inbox = await self._hub.subscribe(job_id)
        try:
            for event in await self._replay(job_id, 1):
                delta = assembler.apply(event)
                if delta is not None and event.seq >= from_seq:
                    yield delta
            deadline = time.monotonic() + self.config.queue.job_timeout_s
            async for event in self._events(inbox, assembler, deadline):
                delta = assembler.apply(event)
                if delta is not None and event.seq >= from_seq:
                    yield delta
        finally:
            await self._hub.unsubscribe(job_id)

    def _send(self, kind: str, request: dict[str, Any], timeout: float) -> None:
        task = keys.CHAT_TASK if kind == "llm" else keys.EMBED_TASK
        priority = keys.BATCH_PRIORITY if request.get("lane") == "batch" else keys.INTERACTIVE_PRIORITY
        try:
            self._sender.send(task, kind, request, expires_s=timeout, priority=priority)
        except Exception as exc:  # kombu raises OperationalError and socket errors
            raise BrokerUnavailable(f"cannot enqueue on the broker: {type(exc).__name__}: {exc}",
                                    model=request["model"], job_id=request["job_id"]) from None

    def _wants_fail_fast(self, fail_fast: bool | None) -> bool:
        return self.config.queue.fail_fast if fail_fast is None else fail_fast

    def _known_live(self, kind: str, model: str) -> bool:
        """Whether the liveness cache (no I/O) already shows a replica of the model."""
        workers = self._liveness.fresh()
        return workers is not None and bool(registry.replicas(workers, kind, model))

    async def _require_worker(self, kind: str, model: str) -> None:
        if self._known_live(kind, model):
            return
        workers = self._liveness.store(await registry.alive_workers(self._redis))
        if not registry.replicas(workers, kind, model):
            raise NoLiveWorker(f"no live worker serves {kind} model '{model}' "
                               f"(start one: smmf-queue worker --model {model})", model=model)


def _ending(kind: ModelKind, assembler: EventAssembler) -> Iterator[ChatDelta]:
    """After a job's terminal event: JobFailed for an error; a chat's last delta says why it ended."""
    terminal = assembler.terminal
    if terminal is not None and terminal.type == "error":
        raise JobFailed(terminal.error_message or "job failed",
                        error_type=terminal.error_type or "JobFailed", model=assembler.model,
                        job_id=assembler.job_id)
    if terminal is not None and kind == "llm":
        yield ChatDelta(finish_reason=terminal.finish_reason, usage=terminal.usage)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}"


class Client:
    """The blocking twin of AsyncClient: same methods, run on a private event loop thread.

    Except `stream_chat`, whose first token matters most: the calling thread enqueues the job
    and reads its events itself (hub.ThreadHub), without a hop to the loop thread and back.
    """

    def __init__(self, config: str | os.PathLike[str] | SmmfConfig | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smmf-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._call(_make_async_client(config))
        self.config = self._async.config
        self._redis = redis.Redis.from_url(self.config.queue.redis)
        self._hub = ThreadHub(self._redis)

    def chat(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> ChatResult:
        """Run a chat job and return the whole reply."""
        return self._call(self._async.chat(model, messages, **kwargs))

    def stream_chat(self, model: str, messages: list[dict[str, Any]], *,
                    timeout: float | None = None, fail_fast: bool | None = None,
                    job_id: str | None = None, **params: Any) -> Iterator[ChatDelta]:
        """Yield the reply's deltas as the worker produces them; leaving early cancels the job."""
        client = self._async
        request = client._chat_request(model, messages, params, job_id,
                                       reply_to=self._hub.reply_channel)
        payload = request.model_dump(mode="json")
        timeout = timeout or client.config.queue.job_timeout_s
        if client._wants_fail_fast(fail_fast) and not client._known_live("llm", model):
            self._call(client._require_worker("llm", model))
        self._start_hub(model)
        self._hub.open(request.job_id)
        client._enqueue(self._hub, "llm", payload, timeout)
        yield from self._follow(EventAssembler(request.job_id, model), timeout)

    def embed(self, model: str, texts: list[str], **kwargs: Any) -> EmbeddingResult:
        """Vectors for `texts`, in input order."""
        return self._call(self._async.embed(model, texts, **kwargs))

    def embed_batch(self, model: str, texts: Iterable[str], **options: Any) -> Iterator[ChunkResult]:
        """Embed a corpus of any size in chunks on the batch lane; yields chunks in input order."""
        return self._iterate(self._async.embed_batch(model, texts, **options))

    def replay(self, job_id: str, model: str, from_seq: int = 1) -> Iterator[ChatDelta]:
        """Read a job's stream from `from_seq`, whether it is running or already finished."""
        return self._iterate(self._async.replay(job_id, model, from_seq))

    def live_workers(self) -> list[registry.WorkerInfo]:
        return self._call(self._async.live_workers())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._hub.shutdown()
        self._redis.close()
        self._call(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_hub(self, model: str) -> None:
        """Subscribe the hub's reply channel (once): before any job is enqueued."""
        try:
            self._hub.start()
        except (OSError, redis.RedisError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach Redis: {exc}", model=model) from None

    def _follow(self, assembler: EventAssembler, timeout: float) -> Iterator[ChatDelta]:
        """AsyncClient._follow, read on this thread: deltas until the terminal event; leaving
        early cancels the job."""
        job_id = assembler.job_id
        try:
            for event in self._events(assembler, time.monotonic() + timeout):
                delta = assembler.apply(event)
                if delta is not None:
                    yield delta
        finally:
            self._hub.close(job_id)
            if assembler.terminal is None:  # the caller left or timed out: stop the job
                with contextlib.suppress(OSError, redis.RedisError):
                    self._redis.set(keys.cancel_flag(job_id), 1, ex=max(1, int(timeout)))
        yield from _ending("llm", assembler)

    def _events(self, assembler: EventAssembler, deadline: float) -> Iterator[StreamEvent]:
        """AsyncClient._events, read on this thread: events in seq order, gaps from the log."""
        while assembler.terminal is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobTimeout(f"no result within the timeout for job {assembler.job_id}",
                                 model=assembler.model, job_id=assembler.job_id)
            raw = self._hub.get(assembler.job_id, min(remaining, QUIET_CHECK_S))
            if raw is None:  # quiet: a lost message, or a slow job; ask the log
                yield from self._replay(assembler.job_id, assembler.want)
                continue
            event = StreamEvent.model_validate_json(raw)
            if event.seq > assembler.want:
                yield from self._replay(assembler.job_id, assembler.want, event.seq - 1)
            if event.seq == assembler.want:
                yield event

    def _replay(self, job_id: str, first: int, last: int | None = None) -> list[StreamEvent]:
        """Logged events first..last; none while Redis is unreachable (the reader asks again)."""
        try:
            entries = self._redis.xrange(keys.event_log(job_id), f"{first}-0",
                                         f"{last}-0" if last is not None else "+")
        except (OSError, redis.RedisError):
            return []
        return decode_log(cast(LogEntries, entries))

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_await(coro), self._loop).result()

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._call(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(stream.aclose())  # type: ignore[attr-defined]


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _make_async_client(config: str | os.PathLike[str] | SmmfConfig | None) -> AsyncClient:
    return AsyncClient(config)


