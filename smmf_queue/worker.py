"""The model-pinned worker: loads its models once, then consumes only their queues.

`run_worker` checks that every model can run on this host before it consumes anything, loads
them, and starts a Celery worker on a thread pool (a model is loaded once per process; prefork
would copy it) sized by the models' `concurrency`, consuming only `smmf.<kind>.<model>` queues.
A heartbeat thread keeps the worker's registry entry alive and renews the leases of its jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
import redis
from celery import Celery, Task, signals
from pydantic import ValidationError

from . import keys, metrics, registry
from .batching import EmbedBatcher
from .config import ModelConfig, SmmfConfig
from .errors import JobFailed
from .jobs import ChatRequest, ChatResult, EmbeddingRequest, StreamEvent, Usage, pack_vectors
from .providers import load_provider
from .providers.base import Provider, close_chunks, provider_errors
from .queues import make_celery_app
from .records import Claim, ClaimRefused, JobRecords
from .streaming import EventWriter, last_seq

log = logging.getLogger("smmf_queue.worker")

#: Loggers that write INFO lines for every job: Celery's two (received, succeeded), and the HTTP
#: clients of the API proxies (httpx2 under the openai SDK, httpx under ollama's), one line per
#: upstream request. At hundreds of jobs a second that is noise (Celery's two lines were ~3% of
#: the worker's CPU), so they speak only at DEBUG. A failing job is still logged as an error, and
#: Flower lists every job.
PER_JOB_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "httpx2", "httpx")


class WorkerRuntime:
    """The models one worker process serves, and how it runs their jobs."""

    def __init__(self, config: SmmfConfig, model_names: list[str]):
        self.config = config
        self.models = [config.model(name) for name in model_names]
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis.Redis.from_url(config.queue.redis)
        self.records = JobRecords(self.redis, lease_s=config.worker.lease_s,
                                  max_attempts=config.worker.max_attempts,
                                  ttl_s=config.queue.result_ttl_s)
        self.providers: dict[tuple[str, str], Provider] = {}
        self._batchers: dict[str, EmbedBatcher] = {}
        self._slots: dict[tuple[str, str], threading.Semaphore] = {}
        self._running: dict[str, str] = {}
        self._running_lock = threading.Lock()
        self._stop = threading.Event()
        self._started_at = time.time()

    @property
    def queues(self) -> list[str]:
        return [keys.queue_name(m.kind, m.name) for m in self.models]

    @property
    def nodename(self) -> str:
        """Celery's name for this worker (Flower shows it): the models it serves, then its id."""
        return f"{'+'.join(keys.safe_name(m.name) for m in self.models)}.{self.worker_id}@%h"

    @property
    def pool_size(self) -> int:
        return sum(m.slots for m in self.models)

    def prepare(self) -> None:
        """Check every model can run here (refusing before any is loaded), then load them."""
        built = [(model, load_provider(model)) for model in self.models]
        for _, provider in built:
            provider.check_hardware()
        for model, provider in built:
            log.info("loading %s model %s (%s)", model.kind, model.name, model.provider)
            provider.load()
            self.providers[(model.kind, model.name)] = provider
            if model.kind == "embedding" and model.dynamic_batching and model.slots > 1:
                self._batchers[model.name] = EmbedBatcher(provider, max_texts=model.max_batch_texts,
                                                          wait_s=model.batch_wait_ms / 1000)
            self._slots[(model.kind, model.name)] = threading.Semaphore(model.slots)

    def info(self) -> registry.WorkerInfo:
        with self._running_lock:
            in_flight = len(self._running)
        return registry.WorkerInfo(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
            hardware=", ".join(sorted({p.hardware() for p in self.providers.values()})),
            models=[registry.ServedModel(name=m.name, kind=m.kind, provider=m.provider,
                                         queue=keys.queue_name(m.kind, m.name), slots=m.slots)
                    for m in self.models],
            in_flight=in_flight, started_at=self._started_at, beat_at=time.time())

    def start_heartbeat(self) -> None:
        registry.beat(self.redis, self.info(), self.config.worker.heartbeat_ttl_s)
        threading.Thread(target=self._heartbeat_loop, name="smmf-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            registry.forget(self.redis, self.worker_id)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.worker.heartbeat_interval_s):
            try:
                registry.beat(self.redis, self.info(), self.config.worker.heartbeat_ttl_s)
                with self._running_lock:
                    leases = dict(self._running)
                self.records.renew(leases)
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def execute(self, task: Task, kind: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Run one delivery of a job: claim it, run it if ours, finish it with its terminal event.

        The first delivery of a chat starts the model while its claim is on the way
        (records.PendingClaim) and reads the answer before it publishes anything; should the
        claim say anything but "first attempt" (cancelled, done, another replica's), the
        delivery goes on as if it had claimed first. Everything else claims first: a redelivery
        (a job that killed its worker must be counted before it runs again) and embeddings (a
        resumed batch sends finished chunks again, and must not embed them twice).
        """
        job_id = str(task.request.id)
        owner = f"{self.worker_id}/{uuid.uuid4().hex[:8]}"
        if kind == "llm" and _first_delivery(task):
            pending = self.records.send_claim(job_id, owner)
            try:
                return self._run(kind, payload, owner,
                                 self._writer(job_id, payload, 1, before_first_write=pending.confirm))
            except ClaimRefused as refused:
                claim = refused.claim
            finally:
                pending.release()
        else:
            claim = self.records.claim(job_id, owner)
        return self._run_claimed(task, kind, payload, owner, claim)

    def _run_claimed(self, task: Task, kind: str, payload: dict[str, Any], owner: str,
                     claim: Claim) -> dict[str, Any] | None:
        job_id = str(task.request.id)
        if claim.outcome in ("finished", "cancelled"):
            log.info("job %s is %s; not running it", job_id, claim.outcome)
            return None
        if claim.outcome == "busy":
            # Another replica holds a live lease: check back when it would have expired.
            raise task.retry(countdown=claim.value / 1000 + 1, max_retries=None)
        writer = self._writer(job_id, payload, claim.value,
                              last_seq=last_seq(self.redis, job_id) if claim.value > 1 else 0)
        if claim.outcome == "exhausted":
            self._fail(writer, owner, JobFailed(
                f"job was delivered {claim.value - 1} times and its worker died each time",
                error_type="WorkerLost", job_id=job_id))
        if claim.value > 1:
            writer.restart()
        return self._run(kind, payload, owner, writer)

    def _writer(self, job_id: str, payload: dict[str, Any], attempt: int, *, last_seq: int = 0,
                before_first_write: Callable[[], None] | None = None) -> EventWriter:
        return EventWriter(self.redis, job_id, attempt, worker_id=self.worker_id,
                           ttl_s=self.config.queue.event_ttl_s,
                           max_events=self.config.queue.event_log_max, last_seq=last_seq,
                           reply_to=_reply_channel(payload), before_first_write=before_first_write)

    def _run(self, kind: str, payload: dict[str, Any], owner: str,
             writer: EventWriter) -> dict[str, Any] | None:
        """Run the job and finish it with its terminal event, if `owner` still holds it."""
        job_id = writer.job_id
        model_name = str(payload.get("model", "?"))
        with self._running_job(job_id, owner), metrics.IN_FLIGHT.labels(model_name, kind).track_inprogress():
            try:
                model, provider, request = self._resolve(kind, payload, job_id)
                metrics.QUEUE_WAIT.labels(model.name, kind).observe(
                    max(0.0, time.time() - request.submitted_at))
                with self._slots[(kind, model.name)], provider_errors(model, job_id):
                    if isinstance(request, ChatRequest):
                        event, result = self._chat(provider, request, writer)
                    else:
                        event, result = self._embed(provider, request, writer)
            except JobFailed as exc:
                outcome = "cancelled" if exc.error_type == "Cancelled" else "failed"
                metrics.JOBS.labels(model_name, kind, outcome).inc()
                self._fail(writer, owner, exc)
        if not self.records.finish(writer, owner, event):
            log.warning("job %s: lost its lease before finishing; result dropped", job_id)
            metrics.JOBS.labels(model_name, kind, "lost_lease").inc()
            return None
        metrics.JOBS.labels(model_name, kind, "done").inc()
        return result

    def _resolve(self, kind: str, payload: dict[str, Any],
                 job_id: str) -> tuple[ModelConfig, Provider, ChatRequest | EmbeddingRequest]:
        try:
            request = (ChatRequest if kind == "llm" else EmbeddingRequest).model_validate(payload)
        except ValidationError as exc:
            raise JobFailed(f"malformed job message: {exc.errors()[0]['msg']}",
                            error_type="InvalidRequest", job_id=job_id) from None
        provider = self.providers.get((kind, request.model))
        if provider is None:
            raise JobFailed(f"this worker does not serve {kind} model '{request.model}'",
                            error_type="WrongWorker", model=request.model, job_id=job_id)
        return provider.model, provider, request

    def _chat(self, provider: Provider, request: ChatRequest,
              writer: EventWriter) -> tuple[StreamEvent, dict[str, Any]]:
        text: list[str] = []
        reasoning: list[str] = []
        finish_reason, usage = "stop", Usage()
        started = time.perf_counter()
        chunks = provider.stream_chat(request)
        try:
            for chunk in chunks:
                if chunk.finish_reason is not None:
                    finish_reason, usage = chunk.finish_reason, chunk.usage or Usage()
                    break
                if not text:
                    metrics.WORKER_TTFT.labels(request.model).observe(time.perf_counter() - started)
                text.append(chunk.text)
                reasoning.append(chunk.reasoning)
                if writer.delta(chunk.text, chunk.reasoning):
                    raise JobFailed("cancelled by the caller", error_type="Cancelled",
                                    model=request.model, job_id=writer.job_id)
        finally:
            # The provider stops now (hf: its stopping criterion fires), also at the final chunk:
            # the job ends then, not when the rest of its source was read (an HTTP body's end,
            # which a server may hold open).
            close_chunks(chunks)
        metrics.TOKENS.labels(request.model).inc(usage.completion_tokens)
        event = writer.next_event("end", finish_reason=finish_reason, usage=usage,
                                  worker=self.worker_id)
        result = ChatResult(job_id=writer.job_id, model=request.model, text="".join(text),
                            reasoning="".join(reasoning), finish_reason=finish_reason,
                            usage=usage, worker=self.worker_id)
        return event, result.model_dump(mode="json")

    def _embed(self, provider: Provider, request: EmbeddingRequest,
               writer: EventWriter) -> tuple[StreamEvent, dict[str, Any]]:
        batcher = self._batchers.get(request.model) if request.lane == "interactive" else None
        if batcher is not None:
            output = batcher.embed(request.texts, request.normalize)
        else:
            metrics.EMBED_PASSES.labels(request.model).inc()
            output = provider.embed(request.texts, request.normalize)
        if len(output.vectors) != len(request.texts):
            raise JobFailed(f"provider returned {len(output.vectors)} vectors for "
                            f"{len(request.texts)} texts", model=request.model)
        metrics.EMBEDDED.labels(request.model).inc(len(request.texts))
        packed, dims = pack_vectors(output.vectors)
        event = writer.next_event("end", finish_reason="stop", usage=output.usage,
                                  worker=self.worker_id, vectors_b64=packed, dims=dims)
        result = {"job_id": writer.job_id, "model": request.model, "dims": dims,
                  "usage": output.usage.model_dump(), "worker": self.worker_id}
        if request.lane == "interactive":
            # A batch chunk's vectors are read from its event log (also when a run resumes);
            # storing them again in the result backend would only cost a large write.
            result["vectors_b64"] = packed
        return event, result

    def _fail(self, writer: EventWriter, owner: str, exc: JobFailed) -> None:
        event = writer.next_event("error", error_type=exc.error_type, error_message=exc.message,
                                  worker=self.worker_id)
        self.records.finish(writer, owner, event)
        raise exc

    @contextlib.contextmanager
    def _running_job(self, job_id: str, owner: str) -> Iterator[None]:
        with self._running_lock:
            self._running[job_id] = owner
        try:
            yield
        finally:
            with self._running_lock:
                self._running.pop(job_id, None)


def _first_delivery(task: Task) -> bool:
    """Neither a message given back by a dead worker (the broker marks it redelivered) nor a
    retry of one that found the job busy."""
    delivery_info = task.request.delivery_info or {}
    return not delivery_info.get("redelivered") and not task.request.retries


def _reply_channel(payload: dict[str, Any]) -> str | None:
    """The producer's reply channel, read before the request is validated (a malformed job's
    error event must reach its producer too); only a reply channel, never any other key."""
    reply_to = payload.get("reply_to")
    return reply_to if isinstance(reply_to, str) and keys.is_reply_channel(reply_to) else None


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the chat and embedding tasks of `app` to this process's runtime."""

    @app.task(name=keys.CHAT_TASK, bind=True)
    def chat(task: Task, request: dict[str, Any]) -> dict[str, Any] | None:
        return runtime.execute(task, "llm", request)

    @app.task(name=keys.EMBED_TASK, bind=True)
    def embed(task: Task, request: dict[str, Any]) -> dict[str, Any] | None:
        return runtime.execute(task, "embedding", request)


def run_worker(config: SmmfConfig, model_names: list[str], *, loglevel: str = "INFO",
               metrics_port: int | None = None) -> None:
    """Serve `model_names` until stopped; raises ProviderUnavailable before consuming if it cannot.

    With `metrics_port`, Prometheus metrics are served on 0.0.0.0:`metrics_port`.
    """
    runtime = WorkerRuntime(config, model_names)
    runtime.prepare()
    if logging.getLevelName(loglevel.upper()) != logging.DEBUG:
        for name in PER_JOB_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if metrics_port:
        prometheus_client.start_http_server(metrics_port)
    app = make_celery_app(config)
    register_tasks(app, runtime)
    signals.worker_ready.connect(lambda **_: runtime.start_heartbeat(), weak=False)
    signals.worker_shutdown.connect(lambda **_: runtime.stop_heartbeat(), weak=False)
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={runtime.pool_size}",
        f"--queues={','.join(runtime.queues)}", f"--hostname={runtime.nodename}",
        "--without-gossip", "--without-mingle", "--task-events", f"--loglevel={loglevel}",
    ])
