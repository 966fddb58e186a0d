"""The SDK: `AsyncClient` does the work; `Client` runs it on a private event loop thread.

    client = Client(config="configs/local.toml")
    client.chat("tiny-noise-chat", [{"role": "user", "content": "hi"}], temperature=0)
    for delta in client.stream_chat(...): print(delta.text, end="")
    client.embed("all-MiniLM-L6-v2", ["a", "b"]).vectors

A job goes: validate against the config → (fail fast if asked and no worker is alive) →
register with the hub (whose reply channel, named in the request, was subscribed before the
client's first job) → enqueue on the model's queue → read events in `seq` order, filling gaps
from the job's event log. `_BaseClient` holds what both clients do without waiting (validate,
enqueue) and `streaming.JobReader` every decision of reading; the twins only wait, each its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from . import chat_fields, job_record, keys, lua, redis_clients, registry, tracing
from .batch.chunks import ChunkResult, embed_chunks
from .config import ModelConfig, ModelKind, SmmfConfig, load_config
from .errors import (
    BrokerUnavailable,
    JobFailed,
    NoLiveWorker,
    QueueFull,
    RateLimited,
    RequestError,
    UnknownJob,
    UnsupportedParameter,
    validation_message,
)
from .jobs import (
    PLAIN_WIRE,
    ChatDelta,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    EmbeddingResult,
    Lane,
    RerankRequest,
    RerankResult,
    StreamEvent,
    new_job_id,
)
from .model_limits import RateWindows
from .providers import USER
from .queues import JobSender, make_celery_app
from .stream_hub import StreamHub, ThreadHub
from .streaming import JobReader, LogEntries, LogRange, decode_log, embedding_result, rerank_result

T = TypeVar("T")
#: seconds a producer whose job met a full queue should wait before sending it again.
QUEUE_FULL_RETRY_S = 1.0
#: seconds before a reader tailing a job's log asks again after Redis failed it.
TAIL_RETRY_S = 0.2
#: seconds after a failed send during which an AsyncClient sends from a thread (`_send`).
BROKER_SUSPECT_S = 30.0
#: what sends a chat to its model's next fallback: no live worker, a full queue, its rate
#: limits, or a failure (before the first token, for a stream).
FALLS_BACK = (NoLiveWorker, QueueFull, RateLimited, JobFailed)
log = logging.getLogger("smmf_queue.client")


class _BaseClient:
    """What `Client` and `AsyncClient` share: validating requests against the config, the
    liveness cache, and enqueueing (one blocking Redis round trip through kombu's producer,
    cheaper than a hop to another thread and back)."""

    def __init__(self, config: str | os.PathLike[str] | SmmfConfig | None = None):
        self.config = config if isinstance(config, SmmfConfig) else load_config(config)
        self._celery = make_celery_app(self.config, store_results=False)
        self._sender = JobSender(self._celery)
        self._liveness = registry.LivenessCache()
        #: a blocking client for the depth of bounded queues and models' limits, made when
        #: first needed.
        self._depth_redis: redis.Redis | None = None
        self._limits: RateWindows | None = None

    def _attempts(self, model: str, job_id: str | None, fail_fast: bool | None,
                  fallbacks: list[str] | None) -> Iterator[tuple[str, str | None, bool | None, bool]]:
        """(model, job id, fail_fast, whether it is the last) for each try of a chat: `model`
        under `job_id`, then each of its fallbacks (`fallbacks`, else its configured ones) under
        a new id. A model with a fallback after it fails fast: with no live worker its chat goes
        on rather than waiting."""
        if fallbacks is None:
            fallbacks = self.config.model(model, "llm").fallbacks
        names = [model, *fallbacks]
        for i, name in enumerate(names):
            last = i == len(names) - 1
            yield name, job_id if i == 0 else None, fail_fast if last else True, last

    @staticmethod
    def _fall_back(model: str, exc: Exception, started: bool, last: bool) -> None:
        """Go on to the next fallback after `exc` (one of FALLS_BACK), or raise it: the reply
        had started, or `model` was the last to try."""
        if started or last:
            raise exc
        log.warning("model %s could not take the chat (%s: %s); trying its next fallback",
                    model, type(exc).__name__, getattr(exc, "message", exc))

    def _chat_request(self, model: str, messages: list[dict[str, Any]], fields: dict[str, Any],
                      job_id: str | None, reply_to: str) -> ChatRequest:
        """The job for a chat call; `fields` are OpenAI's request fields besides the messages
        (sampling ones, tools, response_format...), refused or dropped per chat_fields.py."""
        entry = self.config.model(model, "llm")
        dropped = chat_fields.refuse_or_drop(fields, messages, model, entry.supports,
                                             entry.drop_params)
        top, params = chat_fields.split(fields, dropped)
        if USER not in entry.supports:  # it changes no reply; only an API has a use for it
            top.pop(USER, None)
        try:
            return ChatRequest(model=model, messages=chat_fields.shape_messages(messages, dropped),
                               params=params, job_id=job_id or new_job_id(), reply_to=reply_to,
                               **top)
        except ValidationError as exc:
            raise RequestError(f"invalid chat request: {_first_error(exc)}", model=model) from None

    def _embedding_request(self, model: str, texts: list[str], normalize: bool | None,
                           job_id: str | None, lane: Lane, reply_to: str,
                           dimensions: int | None = None) -> EmbeddingRequest:
        entry = self.config.model(model, "embedding")
        if dimensions is not None and chat_fields.DIMENSIONS not in entry.supports:
            if not entry.drop_params:
                raise UnsupportedParameter(
                    f"model '{model}' ({entry.provider}) cannot honour 'dimensions' (its vectors "
                    "have the size its model makes; set drop_params = true to drop the field)",
                    param=chat_fields.DIMENSIONS, model=model)
            dimensions = None
        try:
            return EmbeddingRequest(model=model, texts=list(texts), normalize=normalize,
                                    job_id=job_id or new_job_id(), lane=lane, reply_to=reply_to,
                                    dimensions=dimensions)
        except ValidationError as exc:
            raise RequestError(f"invalid embedding request: {_first_error(exc)}", model=model) from None

    def _rerank_request(self, model: str, query: str, documents: list[str], job_id: str | None,
                        reply_to: str) -> RerankRequest:
        self.config.model(model, "reranker")
        try:
            return RerankRequest(model=model, query=query, documents=list(documents),
                                 job_id=job_id or new_job_id(), reply_to=reply_to)
        except ValidationError as exc:
            raise RequestError(f"invalid rerank request: {_first_error(exc)}", model=model) from None

    def _timeout(self, timeout: float | None) -> float:
        return timeout or self.config.queue.job_timeout_s

    def _cancel_call(self, job_id: str, ttl_s: float | None) -> tuple[str, int, str, int]:
        """EVAL's arguments for lua.CANCEL: it marks the job's record, which its worker reads at
        its claim and then now and then, and keeps it `ttl_s` seconds (the job timeout by
        default) or longer. A script, not a SET: a cancel is rare, a command per claim is not."""
        return lua.CANCEL, 1, keys.job_record(job_id), max(1, int(self._timeout(ttl_s)))

    @staticmethod
    def _expires(reader: JobReader, queue_timeout: float | None) -> float:
        """Seconds the job's message may wait for a worker: `queue_timeout` if it is sooner than
        the job's own timeout. A worker that takes it later runs nothing and ends the job with
        DeadlineExceeded, which the caller gets as a JobTimeout (worker.py)."""
        return min(queue_timeout, reader.timeout_s) if queue_timeout else reader.timeout_s

    def _needs_liveness_check(self, kind: str, model: str, fail_fast: bool | None,
                              wire: int = PLAIN_WIRE) -> bool:
        """Whether to ask Redis for live workers first: fail-fast asked (by the call or the
        config), or a wire-2 message to send, and the liveness cache (no I/O) does not already
        show a replica that reads it."""
        wanted = self.config.queue.fail_fast if fail_fast is None else fail_fast
        if not wanted and wire == PLAIN_WIRE:
            return False
        workers = self._liveness.fresh()
        return (workers is None or not registry.replicas(workers, kind, model)
                or registry.behind(workers, kind, model, wire) > 0)

    def _check_live(self, workers: list[registry.WorkerInfo], kind: str, model: str,
                    fail_fast: bool | None = None, wire: int = PLAIN_WIRE) -> None:
        """Raise NoLiveWorker unless `workers` (just read) has a replica of the model (when
        failing fast), or when one of them cannot read a message of version `wire` (it would
        refuse it: a rolling upgrade is under way, see jobs.py)."""
        self._liveness.store(workers)
        wanted = self.config.queue.fail_fast if fail_fast is None else fail_fast
        if wanted and not registry.replicas(workers, kind, model):
            raise NoLiveWorker(f"no live worker serves {kind} model '{model}' "
                               f"(start one: smmf-queue worker --model {model})", model=model)
        old = registry.behind(workers, kind, model, wire)
        if old:
            raise NoLiveWorker(f"{old} live worker(s) of {kind} model '{model}' predate job wire "
                               f"{wire}, which this request needs (it uses tools, response_format, "
                               "penalties or content parts); retry once they are upgraded",
                               model=model)

    def _blocking_redis(self) -> redis.Redis:
        """The blocking client for queue depths and models' limits, made when first needed."""
        if self._depth_redis is None:
            self._depth_redis = redis_clients.connect(self.config.queue)
        return self._depth_redis

    def _check_depth(self, entry: ModelConfig) -> None:
        """QueueFull when the model's queue is at its max_queue_depth (a Redis broker's only).

        One blocking round trip, right before the (blocking) enqueue, with no await between:
        the jobs of one client never overshoot the bound; several producers that read the same
        depth at once may each add one job."""
        limit = entry.max_queue_depth
        if limit is None or self.config.queue.broker_url != self.config.queue.redis:
            return
        depth = queued_jobs(self._blocking_redis(), entry.kind, entry.name)
        if depth >= limit:
            raise QueueFull(f"model '{entry.name}' has {depth} jobs waiting (max_queue_depth {limit}); "
                            f"try again in {QUEUE_FULL_RETRY_S:g} s", retry_after_s=QUEUE_FULL_RETRY_S,
                            model=entry.name)

    def _check_limits(self, entry: ModelConfig) -> None:
        """RateLimited when the model has used its rpm or tpm this minute (model_limits.py);
        else the job is counted. One blocking round trip, for models with limits only."""
        if entry.rpm is None and entry.tpm is None:
            return
        if self._limits is None:
            self._limits = RateWindows(self._blocking_redis())
        self._limits.admit(entry)

    def _enqueue(self, hub: StreamHub | ThreadHub, kind: ModelKind, request: dict[str, Any],
                 expires_s: float) -> None:
        """Enqueue a job whose events `hub` already routes (`open`); stop routing them if the
        broker refuses it."""
        task = keys.TASK_OF_KIND[kind]
        priority = keys.BATCH_PRIORITY if request.get("lane") == "batch" else keys.INTERACTIVE_PRIORITY
        entry = self.config.model(request["model"], kind)
        try:
            self._check_depth(entry)
            self._check_limits(entry)
            with tracing.span(f"smmf.enqueue {kind}", SpanKind.PRODUCER,
                              {"smmf.model": entry.name, "smmf.job_id": request["job_id"]}):
                self._sender.send(task, kind, request, expires_s=expires_s, priority=priority,
                                  headers=tracing.headers())
        except (QueueFull, RateLimited):
            hub.close(request["job_id"])
            raise
        except Exception as exc:  # kombu raises OperationalError and socket errors, redis-py its own
            hub.close(request["job_id"])
            raise BrokerUnavailable(f"cannot enqueue on the broker: {type(exc).__name__}: {exc}",
                                    model=request["model"], job_id=request["job_id"]) from None
        except BaseException:
            hub.close(request["job_id"])
            raise

    def _close_sender(self) -> None:
        if self._depth_redis is not None:
            self._depth_redis.close()
        self._sender.close()
        self._celery.close()


class AsyncClient(_BaseClient):
    """Submits chat and embedding jobs to the queues that a config describes."""

    def __init__(self, config: str | os.PathLike[str] | SmmfConfig | None = None):
        super().__init__(config)
        self._redis = redis_clients.connect_async(self.config.queue)
        self._hub = StreamHub(self._redis, silent_after_s=self.config.queue.socket_timeout_s)
        #: until when (monotonic) jobs are sent from a thread: a send failed (`_send`).
        self._broker_suspect_until = 0.0

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   timeout: float | None = None, queue_timeout: float | None = None,
                   fail_fast: bool | None = None, job_id: str | None = None,
                   fallbacks: list[str] | None = None, **params: Any) -> ChatResult:
        """Run a chat job and return the whole reply. `timeout`: seconds for the whole job;
        `queue_timeout`: seconds it may wait for a worker to start it (JobTimeout after either).
        A model with `fallbacks` (the config's, unless given) hands a chat it cannot take to the
        next (FALLS_BACK); `ChatResult.model` names the one that answered."""
        for name, attempt_id, attempt_fail_fast, last in self._attempts(model, job_id, fail_fast, fallbacks):
            try:
                request = self._chat_request(name, messages, params, attempt_id, self._hub.reply_channel)
                reader = JobReader(request.job_id, name, self._timeout(timeout))
                async for _ in self._run("llm", request.message(), reader, attempt_fail_fast, queue_timeout):
                    pass
                return reader.assembler.chat_result()
            except FALLS_BACK as exc:
                self._fall_back(name, exc, False, last)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def stream_chat(self, model: str, messages: list[dict[str, Any]], *,
                          timeout: float | None = None, queue_timeout: float | None = None,
                          fail_fast: bool | None = None, job_id: str | None = None,
                          cancel_on_leave: bool = True, on_queued: Callable[[], None] | None = None,
                          fallbacks: list[str] | None = None, **params: Any) -> AsyncIterator[ChatDelta]:
        """Yield the reply's deltas as the worker produces them. Leaving early cancels the job,
        unless `cancel_on_leave` is false (a reader may `replay` it; the caller cancels later).
        `on_queued` is called once the job is on its queue (every refusal comes before). A
        model with `fallbacks` hands a chat it cannot take, before its first delta, to the next;
        the deltas of a fallback's reply name it (`ChatDelta.model`)."""
        for name, attempt_id, attempt_fail_fast, last in self._attempts(model, job_id, fail_fast, fallbacks):
            started = False
            try:
                request = self._chat_request(name, messages, params, attempt_id, self._hub.reply_channel)
                reader = JobReader(request.job_id, name, self._timeout(timeout))
                async for delta in self._run("llm", request.message(), reader, attempt_fail_fast,
                                             queue_timeout, cancel_on_leave, on_queued):
                    started = True
                    if name != model:
                        delta.model = name
                    yield delta
                return
            except FALLS_BACK as exc:
                self._fall_back(name, exc, started, last)

    async def complete(self, model: str, prompt: str, **kwargs: Any) -> ChatResult:
        """The completions API: `prompt` continued as it is (no chat template); the same
        keywords as `chat`. UnsupportedParameter ("prompt") for a model that cannot."""
        return await self.chat(model, [], prompt=prompt, **kwargs)

    def stream_complete(self, model: str, prompt: str, **kwargs: Any) -> AsyncIterator[ChatDelta]:
        """`complete`, streamed."""
        return self.stream_chat(model, [], prompt=prompt, **kwargs)

    async def embed(self, model: str, texts: list[str], *, normalize: bool | None = None,
                    timeout: float | None = None, queue_timeout: float | None = None,
                    fail_fast: bool | None = None, job_id: str | None = None,
                    dimensions: int | None = None) -> EmbeddingResult:
        """Vectors for `texts`, in input order; `dimensions` where the provider honours it
        (UnsupportedParameter elsewhere)."""
        job_id = job_id or new_job_id()
        end = await self.embedding_job(model, texts, normalize=normalize, timeout=timeout,
                                       queue_timeout=queue_timeout, fail_fast=fail_fast,
                                       job_id=job_id, dimensions=dimensions)
        return embedding_result(job_id, model, end)

    async def embedding_job(self, model: str, texts: list[str], *, normalize: bool | None = None,
                            timeout: float | None = None, queue_timeout: float | None = None,
                            fail_fast: bool | None = None, job_id: str | None = None,
                            lane: Lane = "interactive", dimensions: int | None = None) -> StreamEvent:
        """Run one embedding job and return its `end` event, the vectors still packed as they
        crossed the wire (what a batch pipeline writes out as it is); JobFailed on an error."""
        request = self._embedding_request(model, texts, normalize, job_id, lane,
                                          self._hub.reply_channel, dimensions)
        reader = JobReader(request.job_id, model, self._timeout(timeout))
        async for _ in self._run("embedding", request.message(), reader, fail_fast,
                                 queue_timeout):
            pass
        assert reader.assembler.terminal is not None  # _run ends at the terminal event
        return reader.assembler.terminal

    async def rerank(self, model: str, query: str, documents: list[str], *, top_n: int | None = None,
                     return_documents: bool = False, timeout: float | None = None,
                     queue_timeout: float | None = None, fail_fast: bool | None = None,
                     job_id: str | None = None) -> RerankResult:
        """`documents` by falling relevance to `query` (the `top_n` best), with their indices."""
        request = self._rerank_request(model, query, documents, job_id, self._hub.reply_channel)
        reader = JobReader(request.job_id, model, self._timeout(timeout))
        async for _ in self._run("reranker", request.message(), reader, fail_fast,
                                 queue_timeout):
            pass
        assert reader.assembler.terminal is not None  # _run ends at the terminal event
        return rerank_result(request.job_id, model, reader.assembler.terminal, request.documents,
                             top_n, return_documents)

    def embed_batch(self, model: str, texts: Iterable[str], **options: Any) -> AsyncIterator[ChunkResult]:
        """Embed a corpus of any size in chunks on the batch lane; yields chunks in input order.

        See `smmf_queue.batch.chunks.embed_chunks` for the options (token budget, window, resume)."""
        return embed_chunks(self, model, texts, **options)

    async def logged_events(self, job_id: str, first: int = 1, last: int | None = None) -> list[StreamEvent]:
        """A job's events `first`..`last` as its log holds them; none once the log expired or
        while Redis is unreachable (a reader asks again)."""
        try:
            entries = await self._redis.xrange(keys.event_log(job_id), *_log_bounds((first, last)))
        except (OSError, redis.RedisError):
            return []
        return decode_log(cast(LogEntries, entries))

    async def replay(self, job_id: str, model: str, from_seq: int = 1, *,
                     wait_for_start: bool = True) -> AsyncIterator[ChatDelta]:
        """Read a job's stream from `from_seq`, whether it is queued, running or finished; the
        last delta says why it ended (JobFailed for an error). With `wait_for_start` false, a
        job that Redis holds nothing of (not taken by a worker yet, or expired) is UnknownJob."""
        if not wait_for_start:
            await self._check_known(job_id, model)
        reader = JobReader(job_id, model, self.config.queue.job_timeout_s, from_seq=from_seq)
        while not reader.done:
            for delta in reader.apply(await self._tail(reader)):
                yield delta
        for delta in reader.ending("llm"):
            yield delta

    async def _tail(self, reader: JobReader) -> list[StreamEvent]:
        """The logged events from the one `reader` wants on, waiting up to its `wait_s` for one
        to be written (XREAD BLOCK; the log need not exist yet). Someone else's job is read
        from its log alone: workers publish each event once, to its producer."""
        log_key, after = keys.event_log(reader.job_id), f"{reader.assembler.want - 1}-0"
        try:
            reply = await self._redis.xread({log_key: after}, block=max(1, int(reader.wait_s() * 1000)))
        except (OSError, redis.RedisError):
            await asyncio.sleep(TAIL_RETRY_S)  # Redis is away: ask again, until the job's time is up
            return []
        streams = cast(list[tuple[bytes, LogEntries]], reply)  # RESP2: [(log key, entries)]
        return decode_log(streams[0][1]) if streams else []

    async def _check_known(self, job_id: str, model: str) -> None:
        """UnknownJob unless the job has an event log, or is running and about to write one."""
        try:
            if await self._redis.exists(keys.event_log(job_id)):
                return
            record = job_record.decode(await self._redis.get(keys.job_record(job_id)))
        except (OSError, redis.RedisError) as exc:
            raise _unreachable(exc, model) from None
        if record.get("state") != "RUNNING":
            raise UnknownJob(f"no stream for job {job_id}: not started yet, or its log expired",
                             model=model, job_id=job_id)

    async def live_workers(self) -> list[registry.WorkerInfo]:
        """Workers whose heartbeat is current."""
        return await registry.alive_workers(self._redis)

    async def queue_depth(self, kind: str, model: str) -> int | None:
        """Jobs waiting in a model's queue (all lanes); None when the broker is not this Redis."""
        if self.config.queue.broker_url != self.config.queue.redis:
            return None
        async with self._redis.pipeline(transaction=False) as pipe:
            for lane in keys.queue_lanes(kind, model):
                pipe.llen(lane)
            return sum(await pipe.execute())

    async def cancel(self, job_id: str, ttl_s: float | None = None) -> None:
        """Ask the worker running (or about to take) a job to stop it (see `_cancel_call`)."""
        await self._redis.eval(*self._cancel_call(job_id, ttl_s))

    async def ping(self) -> None:
        """Raise if Redis cannot be reached."""
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._hub.aclose()
        await self._redis.aclose()
        self._close_sender()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, kind: ModelKind, request: dict[str, Any], reader: JobReader,
                   fail_fast: bool | None, queue_timeout: float | None = None,
                   cancel_on_leave: bool = True,
                   on_queued: Callable[[], None] | None = None) -> AsyncIterator[ChatDelta]:
        """Enqueue one job and yield its deltas until its terminal event (the last one says why
        it ended); leaving early cancels the job if `cancel_on_leave`."""
        model = request["model"]
        try:
            wire = int(request.get("v", PLAIN_WIRE))
            if self._needs_liveness_check(kind, model, fail_fast, wire):
                self._check_live(await registry.alive_workers(self._redis), kind, model, fail_fast,
                                 wire)
            await self._hub.start()
        except (OSError, redis.RedisError, asyncio.TimeoutError) as exc:
            raise _unreachable(exc, model) from None
        inbox = self._hub.open(reader.job_id)
        await self._send(kind, request, self._expires(reader, queue_timeout))
        if on_queued is not None:
            on_queued()
        try:
            async for delta in self._read(reader, inbox):
                yield delta
        finally:
            self._hub.close(reader.job_id)
            if not reader.done and cancel_on_leave:  # the caller left or timed out
                with contextlib.suppress(OSError, redis.RedisError):
                    await self.cancel(reader.job_id, reader.timeout_s)
        for delta in reader.ending(kind):
            yield delta

    async def _send(self, kind: ModelKind, request: dict[str, Any], expires_s: float) -> None:
        """Enqueue a job from this loop's own thread (kombu's publish blocks, but for a
        fraction of a millisecond: a hop to a thread would cost more), or from a thread for
        BROKER_SUSPECT_S after a send failed: a silent Redis (no reply for
        queue.socket_timeout_s) then holds up each request that waits for it, not the loop and
        every other request with it."""
        try:
            if time.monotonic() < self._broker_suspect_until:
                await asyncio.to_thread(self._enqueue, self._hub, kind, request, expires_s)
                self._broker_suspect_until = 0.0
            else:
                self._enqueue(self._hub, kind, request, expires_s)
        except BrokerUnavailable:
            self._broker_suspect_until = time.monotonic() + BROKER_SUSPECT_S
            raise

    async def _read(self, reader: JobReader, inbox: asyncio.Queue[bytes]) -> AsyncIterator[ChatDelta]:
        """The job's deltas until its terminal event: live ones from `inbox`, gaps from the log."""
        while not reader.done:
            gap = reader.take(await _next(inbox, reader.wait_s()))
            for delta in reader.apply(await self.logged_events(reader.job_id, *gap) if gap else []):
                yield delta


async def _next(inbox: asyncio.Queue[bytes], timeout: float) -> bytes | None:
    """The next live event, or None when none came within `timeout` seconds."""
    if not inbox.empty():
        return inbox.get_nowait()
    try:
        async with asyncio.timeout(timeout):
            return await inbox.get()
    except TimeoutError:
        return None


def queued_jobs(client: redis.Redis, kind: str, model: str) -> int:
    """Jobs waiting in a model's queue (all lanes), in one round trip (AsyncClient.queue_depth
    is its twin on an event loop)."""
    pipe = client.pipeline(transaction=False)
    for lane in keys.queue_lanes(kind, model):
        pipe.llen(lane)
    return sum(pipe.execute())


def _unreachable(exc: BaseException, model: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"cannot reach Redis: {type(exc).__name__}: {exc}", model=model)


def _log_bounds(gap: LogRange) -> tuple[str, str]:
    """XRANGE bounds of a range of seqs (entry ids are `<seq>-0`)."""
    first, last = gap
    return f"{first}-0", f"{last}-0" if last is not None else "+"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {validation_message(error)}"


class Client(_BaseClient):
    """The blocking twin of AsyncClient: same methods, run on a private event loop thread.

    Except `stream_chat`, whose first token matters most: the calling thread enqueues the job
    and reads its events itself (stream_hub.ThreadHub), without a hop to the loop thread and back.
    """

    def __init__(self, config: str | os.PathLike[str] | SmmfConfig | None = None):
        super().__init__(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smmf-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._call(_make_async_client(self.config))
        self._redis = redis_clients.connect(self.config.queue)
        self._hub = ThreadHub(self._redis, silent_after_s=self.config.queue.socket_timeout_s)

    def chat(self, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> ChatResult:
        """Run a chat job and return the whole reply."""
        return self._call(self._async.chat(model, messages, **kwargs))

    def stream_chat(self, model: str, messages: list[dict[str, Any]], *,
                    timeout: float | None = None, queue_timeout: float | None = None,
                    fail_fast: bool | None = None, job_id: str | None = None,
                    fallbacks: list[str] | None = None, **params: Any) -> Iterator[ChatDelta]:
        """Yield the reply's deltas as the worker produces them; leaving early cancels the job.
        Fallbacks as AsyncClient.stream_chat's."""
        for name, attempt_id, attempt_fail_fast, last in self._attempts(model, job_id, fail_fast, fallbacks):
            started = False
            try:
                for delta in self._stream_once(name, messages, params, timeout, queue_timeout,
                                               attempt_fail_fast, attempt_id):
                    started = True
                    if name != model:
                        delta.model = name
                    yield delta
                return
            except FALLS_BACK as exc:
                self._fall_back(name, exc, started, last)

    def _stream_once(self, model: str, messages: list[dict[str, Any]], params: dict[str, Any],
                     timeout: float | None, queue_timeout: float | None, fail_fast: bool | None,
                     job_id: str | None) -> Iterator[ChatDelta]:
        request = self._chat_request(model, messages, params, job_id, self._hub.reply_channel)
        reader = JobReader(request.job_id, model, self._timeout(timeout))
        try:
            wire = request.wire_needed()
            if self._needs_liveness_check("llm", model, fail_fast, wire):
                self._check_live(registry.live_workers(self._redis), "llm", model, fail_fast, wire)
            self._hub.start()
        except (OSError, redis.RedisError, TimeoutError) as exc:
            raise _unreachable(exc, model) from None
        self._hub.open(request.job_id)
        self._enqueue(self._hub, "llm", request.message(),
                      self._expires(reader, queue_timeout))
        try:
            yield from self._read(reader)
        finally:
            self._hub.close(request.job_id)
            if not reader.done:  # the caller left or timed out: stop the job
                with contextlib.suppress(OSError, redis.RedisError):
                    self.cancel(request.job_id, reader.timeout_s)
        yield from reader.ending("llm")

    def complete(self, model: str, prompt: str, **kwargs: Any) -> ChatResult:
        """The completions API: `prompt` continued as it is (no chat template)."""
        return self.chat(model, [], prompt=prompt, **kwargs)

    def stream_complete(self, model: str, prompt: str, **kwargs: Any) -> Iterator[ChatDelta]:
        """`complete`, streamed."""
        return self.stream_chat(model, [], prompt=prompt, **kwargs)

    def embed(self, model: str, texts: list[str], **kwargs: Any) -> EmbeddingResult:
        """Vectors for `texts`, in input order."""
        return self._call(self._async.embed(model, texts, **kwargs))

    def rerank(self, model: str, query: str, documents: list[str], **kwargs: Any) -> RerankResult:
        """`documents` by falling relevance to `query` (`top_n=` the best only)."""
        return self._call(self._async.rerank(model, query, documents, **kwargs))

    def embed_batch(self, model: str, texts: Iterable[str], **options: Any) -> Iterator[ChunkResult]:
        """Embed a corpus of any size in chunks on the batch lane; yields chunks in input order."""
        return self._iterate(self._async.embed_batch(model, texts, **options))

    def replay(self, job_id: str, model: str, from_seq: int = 1, *,
               wait_for_start: bool = True) -> Iterator[ChatDelta]:
        """Read a job's stream from `from_seq`, whether it is queued, running or finished."""
        return self._iterate(self._async.replay(job_id, model, from_seq,
                                                wait_for_start=wait_for_start))

    def live_workers(self) -> list[registry.WorkerInfo]:
        return self._call(self._async.live_workers())

    def cancel(self, job_id: str, ttl_s: float | None = None) -> None:
        """AsyncClient.cancel on this thread."""
        self._redis.eval(*self._cancel_call(job_id, ttl_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._hub.shutdown()
        self._redis.close()
        self._close_sender()
        self._call(self._async.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, reader: JobReader) -> Iterator[ChatDelta]:
        """AsyncClient._read on this thread: live events from the hub, gaps from the log."""
        while not reader.done:
            gap = reader.take(self._hub.get(reader.job_id, reader.wait_s()))
            yield from reader.apply(self._logged_events(reader.job_id, *gap) if gap else [])

    def _logged_events(self, job_id: str, first: int, last: int | None) -> list[StreamEvent]:
        """AsyncClient.logged_events on this thread."""
        try:
            entries = self._redis.xrange(keys.event_log(job_id), *_log_bounds((first, last)))
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


