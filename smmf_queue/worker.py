"""The model-pinned worker: loads its models once, then consumes only their queues.

`run_worker` checks that every model can run on this host before it consumes anything, loads
them, and starts a Celery worker on a thread pool (celery_ext.ThreadPool: a model is loaded
once per process; prefork would copy it) sized by the models' `concurrency`, consuming only
`smmf.<kind>.<model>` queues.
A heartbeat thread keeps the worker's registry entry alive and renews the leases of its jobs
and of the messages it holds; kombu's restore, in every worker, hands back the messages of a
worker that stopped renewing (celery_ext.renew_held_messages).
A delivery's claim, events, lease and fenced finish live in `attempt.py`; this module says what
a chat and an embedding job run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import prometheus_client
import redis
from celery import Celery, Task, signals
from celery.exceptions import Reject
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from . import dead_letters, keys, logs, metrics, redis_clients, registry, tracing
from .attempt import WORKER_LOST, Attempt, Deliveries, JobLost, LeaseBusy
from .celery_ext import (
    ResultBackend,
    give_back_held_messages,
    held_message,
    keep_lease_of,
    renew_held_messages,
    settled_by_finish,
)
from .config import ModelConfig, SmmfConfig
from .dynamic_batching import EmbedBatcher
from .errors import JobFailed, ProviderUnavailable
from .jobs import (
    WIRE_VERSION,
    ChatRequest,
    ChatResult,
    EmbeddingRequest,
    RerankRequest,
    StreamEvent,
    ToolCallDelta,
    Usage,
    pack_vectors,
)
from .model_limits import RateWindows
from .providers import load_provider
from .providers.base import Provider, close_chunks, provider_errors
from .queues import REDIS_TRANSPORTS, make_celery_app
from .streaming import DEADLINE_EXCEEDED
from .tool_calls import assemble
from .upstream_accounts import ACCOUNTS

log = logging.getLogger("smmf_queue.worker")

#: Loggers that write INFO lines for every job: Celery's two (received, succeeded), and the HTTP
#: clients of the API proxies (httpx2 under the openai SDK, httpx under ollama's), one line per
#: upstream request. At hundreds of jobs a second that is noise (Celery's two lines were ~3% of
#: the worker's CPU), so they speak only at DEBUG. A failing job is still logged as an error, and
#: Flower lists every job.
PER_JOB_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "httpx2", "httpx")

#: error types of jobs that can never run as sent: a request that does not validate, one for a
#: model this worker does not serve (a message put on the wrong queue), and a message Celery
#: refused before any task. With WORKER_LOST they become dead letters (dead_letters.py).
INVALID_REQUEST, WRONG_WORKER, REJECTED = "InvalidRequest", "WrongWorker", "Rejected"
DEAD_ON = frozenset({WORKER_LOST, INVALID_REQUEST, WRONG_WORKER})


class WorkerRuntime:
    """The models one worker process serves, and how it runs their jobs."""

    def __init__(self, config: SmmfConfig, model_names: list[str]):
        self.config = config
        self.models = [config.model(name) for name in model_names]
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis_clients.connect(config.queue)
        self.limits = RateWindows(self.redis)
        ACCOUNTS.share(self.redis, config.accounts)
        self.deliveries = Deliveries(self.redis, self.worker_id, lease_s=config.worker.lease_s,
                                     max_attempts=config.worker.max_attempts,
                                     record_ttl_s=config.queue.result_ttl_s,
                                     event_ttl_s=config.queue.event_ttl_s,
                                     max_events=config.queue.event_log_max)
        self.providers: dict[tuple[str, str], Provider] = {}
        self._batchers: dict[str, EmbedBatcher] = {}
        self._slots: dict[tuple[str, str], threading.Semaphore] = {}
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
        for model in self.models:
            if problems := model.unresolved():
                raise ProviderUnavailable(f"{self.config.source}: model '{model.name}': "
                                          f"{'; '.join(problems)}", model=model.name)
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

    def write_results_with_finish(self, app: Celery) -> bool:
        """Have each job's fenced finish write its Celery result (lua.FINISH), where results
        live on the job records' Redis: then the tasks store none themselves (True)."""
        backend = app.backend
        if isinstance(backend, ResultBackend) and self.config.queue.results == self.config.queue.redis:
            self.deliveries.results = backend
            return True
        return False

    def keep_leases_of_lost_jobs(self, app: Celery) -> None:
        """On Redis (behind Sentinel too), a delivery that lost its job to a later delivery
        leaves the message's lease in kombu's index at its ack: it is the later delivery's
        (celery_ext.keep_lease_of)."""
        if app.conf.broker_transport in REDIS_TRANSPORTS.values():
            self.deliveries.on_lost = keep_lease_of

    def settle_messages_with_finish(self, app: Celery) -> None:
        """On our Redis transport, where the broker is the job records' Redis, each job's
        fenced finish also removes its message from kombu's bookkeeping of taken messages, and
        its ack only forgets it here (celery_ext.held_message): one round trip fewer per job."""
        if (app.conf.broker_transport == REDIS_TRANSPORTS["redis://"]
                and self.config.queue.broker_url == self.config.queue.redis):
            self.deliveries.held_message = held_message
            self.deliveries.on_settled = settled_by_finish

    def info(self) -> registry.WorkerInfo:
        return registry.WorkerInfo(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
            hardware=", ".join(sorted({p.hardware() for p in self.providers.values()})),
            models=[registry.ServedModel(name=m.name, kind=m.kind, provider=m.provider,
                                         queue=keys.queue_name(m.kind, m.name), slots=m.slots)
                    for m in self.models],
            in_flight=self.deliveries.in_flight, started_at=self._started_at, beat_at=time.time(),
            wire=WIRE_VERSION)

    def start_heartbeat(self) -> None:
        registry.beat(self.redis, self.info(), self.config.worker.heartbeat_ttl_s)
        threading.Thread(target=self._heartbeat_loop, name="smmf-heartbeat", daemon=True).start()

    def stop_within_grace(self) -> None:
        """On SIGTERM, Celery stops taking jobs and waits for the running ones with no limit.
        After `worker.shutdown_grace_s`, give up the leases of those still running and of every
        message held (the next restore by a live worker hands them back, and their streams
        restart there) and end the process: a rolling restart neither waits for a long job nor
        loses it."""
        def expire() -> None:
            if self._stop.wait(self.config.worker.shutdown_grace_s) or not self.deliveries.in_flight:
                return
            self.stop_heartbeat()  # and no longer listed: producers do not count on it
            try:
                released = self.deliveries.release_leases()
                give_back_held_messages()
            except redis.RedisError as exc:
                log.error("could not give up the leases of running jobs (%s); they come back when "
                          "their leases expire", exc)
                released = 0
            log.warning("stopping after %.0f s of grace: %d running jobs handed back",
                        self.config.worker.shutdown_grace_s, released)
            logging.shutdown()
            os._exit(0)

        threading.Thread(target=expire, name="smmf-shutdown-grace", daemon=True).start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            registry.forget(self.redis, self.worker_id)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.worker.heartbeat_interval_s):
            try:
                registry.beat(self.redis, self.info(), self.config.worker.heartbeat_ttl_s)
                self.deliveries.renew_leases()
                renew_held_messages()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def execute(self, task: Task, kind: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Run one delivery of a job (Celery's side of it: the id, whether it was delivered
        before, and a retry when another replica holds the job)."""
        job_id, model = str(task.request.id), str(payload.get("model", "?"))
        try:
            with logs.job_scope(job_id=job_id, model=model), tracing.span(
                    f"smmf.run {kind}", SpanKind.CONSUMER, {"smmf.model": model, "smmf.job_id": job_id},
                    parent=_trace_context(task)):
                return self.deliveries.run(job_id, _reply_channel(payload),
                                           lambda attempt: self._run(kind, payload, attempt),
                                           ahead=kind == "llm" and _first_delivery(task))
        except LeaseBusy as busy:
            raise task.retry(countdown=busy.retry_in_s) from None
        except JobLost as lost:
            log.warning("job %s: %s", job_id, lost.message)
            metrics.JOBS.labels(model, kind, "lost_lease").inc()
            return None
        except JobFailed as exc:
            if exc.error_type in DEAD_ON:
                self._keep_dead(self._dead_job(task, kind, payload, exc))
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Redis went away under the job (down, silent), so its end may not be written: its
            # message goes back to its queue (or, Redis not answering, comes back after its
            # lease), where Celery would acknowledge it as a failed task's, and the job, still
            # RUNNING in its record, would be lost to its caller. (Not for Redis refusing a
            # command, a full Redis: a job sent back at once would come back at once.)
            log.warning("job %s: Redis failed under it (%s); its message goes back", job_id, exc)
            raise Reject(exc, requeue=True) from None

    def _dead_job(self, task: Task, kind: str, payload: dict[str, Any],
                  exc: JobFailed) -> dead_letters.DeadLetter:
        """The dead letter of a job that can never run as sent, or that kept killing workers."""
        model = str(payload.get("model", "?"))
        return dead_letters.DeadLetter(
            job_id=str(task.request.id), kind=kind, model=model,
            queue=(task.request.delivery_info or {}).get("routing_key") or keys.queue_name(kind, model),
            request=payload, error_type=exc.error_type, error_message=exc.message,
            attempts=self.config.worker.max_attempts if exc.error_type == WORKER_LOST else 1,
            failed_at=time.time())

    def end_expired(self, job_id: str) -> None:
        """Celery took a job whose message waited past its expiry (the caller's queue timeout)
        and did not run it: end the job with DeadlineExceeded, so that its caller learns it at
        its next check of the job's log rather than at its own timeout. Only if nothing else
        ended it or runs it (a claim, as for any delivery)."""
        def give_up(attempt: Attempt) -> None:
            attempt.fail(JobFailed("the job waited in its queue past its deadline and was not run",
                                   error_type=DEADLINE_EXCEEDED, job_id=job_id))

        try:
            self.deliveries.run(job_id, None, give_up)
        except (JobFailed, JobLost, LeaseBusy, redis.RedisError):
            pass

    def dead_letter_message(self, message: Any, reason: str) -> None:
        """Keep a message that Celery refused before it reached a task (undecodable, no task
        headers, an unknown task): its headers and size, not its body."""
        headers = message.headers or {}
        queue = str((message.delivery_info or {}).get("routing_key") or "?")
        kind = queue.removeprefix(f"{keys.PREFIX}.").partition(".")[0] or "?"
        self._keep_dead(dead_letters.DeadLetter(
            job_id=str(headers.get("id") or f"rejected-{uuid.uuid4().hex}"), kind=kind, model="?",
            queue=queue, request={"headers": {k: str(v)[:200] for k, v in headers.items()},
                                  "body_bytes": len(message.body or b"")},
            attempts=0, error_type=REJECTED, error_message=reason[:500], failed_at=time.time()))

    def _keep_dead(self, letter: dead_letters.DeadLetter) -> None:
        try:
            dead_letters.keep(self.redis, letter, self.config.queue.dead_letter_ttl_s)
        except redis.RedisError as exc:
            log.error("job %s: could not keep its dead letter: %s", letter.job_id, exc)
            return
        log.error("job %s of model %s is a dead letter: %s: %s", letter.job_id, letter.model,
                  letter.error_type, letter.error_message)

    def _run(self, kind: str, payload: dict[str, Any], attempt: Attempt) -> dict[str, Any] | None:
        """Run the job and finish it with its terminal event, if this attempt still holds it."""
        job_id = attempt.job_id
        model_name = str(payload.get("model", "?"))
        with metrics.IN_FLIGHT.labels(model_name, kind).track_inprogress(), logs.job_scope(attempt=attempt.number):
            try:
                model, provider, request = self._resolve(kind, payload, job_id)
                waited = max(0.0, time.time() - request.submitted_at)
                metrics.QUEUE_WAIT.labels(model.name, kind).observe(waited)
                tracing.annotate(**{"smmf.attempt": attempt.number, "smmf.queue_wait_s": waited})
                with self._slots[(kind, model.name)], provider_errors(model, job_id):
                    if isinstance(request, ChatRequest):
                        event, result = self._chat(provider, request, attempt)
                    elif isinstance(request, RerankRequest):
                        event, result = self._rerank(provider, request, attempt)
                    else:
                        event, result = self._embed(provider, request, attempt)
            except JobFailed as exc:
                outcome = "cancelled" if exc.error_type == "Cancelled" else "failed"
                metrics.JOBS.labels(model_name, kind, outcome).inc()
                log.log(logging.INFO if outcome == "cancelled" else logging.WARNING,
                        "job %s %s: %s: %s", job_id, outcome, exc.error_type, exc.message[:300])
                attempt.fail(exc)
        # Counted before the end is published: a caller's next job, admitted once it saw this
        # one's result, must see its tokens (they were generated, whoever finishes the job).
        self._count_tokens(model, event)
        attempt.finish(event, result)
        metrics.JOBS.labels(model_name, kind, "done").inc()
        return result

    def _count_tokens(self, model: ModelConfig, end: StreamEvent) -> None:
        """A finished job's tokens, to its model's tpm (model_limits.py) and its upstream
        account's (upstream_accounts.py); a Redis error here only logs: the job is done."""
        if end.usage is None:
            return
        tokens = end.usage.prompt_tokens + end.usage.completion_tokens
        if model.account is not None:
            ACCOUNTS.count_tokens(model.account, tokens)
        if model.tpm is None:
            return
        try:
            self.limits.count(keys.model_limits(model.name), tokens)
        except redis.RedisError as exc:
            log.warning("tokens of a job of model %s not counted to its tpm: %s", model.name, exc)

    def _resolve(self, kind: str, payload: dict[str, Any],
                 job_id: str) -> tuple[ModelConfig, Provider, JobRequest]:
        try:
            request = _REQUEST_OF_KIND[kind].model_validate(payload)
        except ValidationError as exc:
            raise JobFailed(f"malformed job message: {exc.errors()[0]['msg']}",
                            error_type=INVALID_REQUEST, job_id=job_id) from None
        provider = self.providers.get((kind, request.model))
        if provider is None:
            raise JobFailed(f"this worker does not serve {kind} model '{request.model}'",
                            error_type=WRONG_WORKER, model=request.model, job_id=job_id)
        return provider.model, provider, request

    def _chat(self, provider: Provider, request: ChatRequest,
              attempt: Attempt) -> tuple[StreamEvent, dict[str, Any]]:
        text: list[str] = []
        reasoning: list[str] = []
        fragments: list[ToolCallDelta] = []
        logprobs: list[dict[str, Any]] = []
        finish_reason, usage = "stop", Usage()
        started = time.perf_counter()
        chunks = provider.stream_chat(request)
        try:
            for chunk in chunks:
                if chunk.output or chunk.finish_reason is None:
                    if not (text or fragments):
                        metrics.WORKER_TTFT.labels(request.model).observe(time.perf_counter() - started)
                    text.append(chunk.text)
                    reasoning.append(chunk.reasoning)
                    fragments.extend(chunk.tool_calls)
                    logprobs.extend(chunk.logprobs)
                    # The final chunk's text (read with the end) goes out with the end.
                    if attempt.delta(chunk.text, chunk.reasoning, chunk.tool_calls, chunk.logprobs,
                                     last=chunk.finish_reason is not None):
                        raise JobFailed("cancelled by the caller", error_type="Cancelled",
                                        model=request.model, job_id=attempt.job_id)
                if chunk.finish_reason is not None:
                    finish_reason, usage = chunk.finish_reason, chunk.usage or Usage()
                    break
        finally:
            # The provider stops now (hf: its stopping criterion fires), also at the final chunk:
            # the job ends then, not when the rest of its source was read (an HTTP body's end,
            # which a server may hold open).
            close_chunks(chunks)
        metrics.TOKENS.labels(request.model).inc(usage.completion_tokens)
        event = attempt.next_event("end", finish_reason=finish_reason, usage=usage,
                                   worker=self.worker_id)
        result = ChatResult(job_id=attempt.job_id, model=request.model, text="".join(text),
                            reasoning="".join(reasoning), tool_calls=assemble(fragments),
                            logprobs=logprobs, finish_reason=finish_reason, usage=usage, worker=self.worker_id)
        return event, result.model_dump(mode="json")

    def _rerank(self, provider: Provider, request: RerankRequest,
                attempt: Attempt) -> tuple[StreamEvent, dict[str, Any]]:
        output = provider.rerank(request.query, request.documents)
        if len(output.scores) != len(request.documents):
            raise JobFailed(f"provider returned {len(output.scores)} scores for "
                            f"{len(request.documents)} documents", model=request.model)
        event = attempt.next_event("end", finish_reason="stop", usage=output.usage,
                                   worker=self.worker_id, scores=output.scores)
        result = {"job_id": attempt.job_id, "model": request.model, "scores": output.scores,
                  "usage": output.usage.model_dump(), "worker": self.worker_id}
        return event, result

    def _embed(self, provider: Provider, request: EmbeddingRequest,
               attempt: Attempt) -> tuple[StreamEvent, dict[str, Any]]:
        batcher = self._batchers.get(request.model) if request.lane == "interactive" else None
        if request.dimensions is not None:  # only proxies honour it: the API shortens them
            output = provider.embed_shortened(request.texts, request.normalize, request.dimensions)
        elif batcher is not None:
            output = batcher.embed(request.texts, request.normalize)
        else:
            metrics.EMBED_PASSES.labels(request.model).inc()
            output = provider.embed(request.texts, request.normalize)
        if len(output.vectors) != len(request.texts):
            raise JobFailed(f"provider returned {len(output.vectors)} vectors for "
                            f"{len(request.texts)} texts", model=request.model)
        metrics.EMBEDDED.labels(request.model).inc(len(request.texts))
        packed, dims = pack_vectors(output.vectors)
        event = attempt.next_event("end", finish_reason="stop", usage=output.usage,
                                   worker=self.worker_id, vectors_b64=packed, dims=dims)
        result = {"job_id": attempt.job_id, "model": request.model, "dims": dims,
                  "usage": output.usage.model_dump(), "worker": self.worker_id}
        if request.lane == "interactive" and not request.reply_to:
            # Only a producer without a reply channel (a plain Celery one) reads the vectors
            # from the result backend. The SDK and the gateway take them from the end event,
            # and a batch chunk's are read from its event log (also when a run resumes): stored
            # again, they would be a second copy on Redis for `result_ttl_s` (an hour by
            # default, against the log's ten minutes), six times the memory of an embedding
            # job (docs/performance-log.md).
            result["vectors_b64"] = packed
        return event, result

def _first_delivery(task: Task) -> bool:
    """Neither a message given back by a dead worker (the broker marks it redelivered) nor a
    retry of one that found the job busy."""
    delivery_info = task.request.delivery_info or {}
    return not delivery_info.get("redelivered") and not task.request.retries


JobRequest = ChatRequest | EmbeddingRequest | RerankRequest
#: the request each kind of job carries.
_REQUEST_OF_KIND: dict[str, type[JobRequest]] = {"llm": ChatRequest, "embedding": EmbeddingRequest,
                                                  "reranker": RerankRequest}


def _reply_channel(payload: dict[str, Any]) -> str | None:
    """The producer's reply channel, read before the request is validated (a malformed job's
    error event must reach its producer too); only a reply channel, never any other key."""
    reply_to = payload.get("reply_to")
    return reply_to if isinstance(reply_to, str) and keys.is_reply_channel(reply_to) else None


def _trace_context(task: Task) -> dict[str, str] | None:
    """The trace context its producer sent with the job's message (tracing.py), if any."""
    traceparent = getattr(task.request, "traceparent", None)
    if not isinstance(traceparent, str):
        return None
    state = getattr(task.request, "tracestate", None)
    return {"traceparent": traceparent, **({"tracestate": state} if isinstance(state, str) else {})}


def register_tasks(app: Celery, runtime: WorkerRuntime) -> None:
    """Bind the chat, embedding and rerank tasks of `app` to this process's runtime. Their only
    retry is a delivery waiting for another that holds its job (LeaseBusy): unbounded, since
    Celery's default of three would drop the job's message while it still runs elsewhere. Where
    the job's finish writes its result, the tasks store none (`ignore_result`)."""
    finish_writes_results = runtime.write_results_with_finish(app)
    runtime.keep_leases_of_lost_jobs(app)
    runtime.settle_messages_with_finish(app)

    @app.task(name=keys.CHAT_TASK, bind=True, max_retries=None, ignore_result=finish_writes_results)
    def chat(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return runtime.execute(task, "llm", _payload(args, kwargs))

    @app.task(name=keys.EMBED_TASK, bind=True, max_retries=None, ignore_result=finish_writes_results)
    def embed(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return runtime.execute(task, "embedding", _payload(args, kwargs))

    @app.task(name=keys.RERANK_TASK, bind=True, max_retries=None, ignore_result=finish_writes_results)
    def rerank(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return runtime.execute(task, "reranker", _payload(args, kwargs))

    def rejected(message: Any, exc: BaseException | None = None, **_: Any) -> None:
        runtime.dead_letter_message(message, f"{type(exc).__name__}: {exc}" if exc else
                                    "not a task message of this worker")

    def unknown(message: Any, name: str, exc: BaseException, **_: Any) -> None:
        runtime.dead_letter_message(message, f"unknown task {name!r}")

    def revoked(request: Any, expired: bool = False, **_: Any) -> None:
        if expired and request is not None and request.task in keys.TASK_OF_KIND.values():
            runtime.end_expired(str(request.id))

    signals.task_rejected.connect(rejected, weak=False)
    signals.task_unknown.connect(unknown, weak=False)
    signals.task_revoked.connect(revoked, weak=False)


def _payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The request that a well-formed message carries as its one argument; anything else stands
    for itself in a form the request's validation refuses (so it fails and is dead-lettered)."""
    if not args and list(kwargs) == ["request"] and isinstance(kwargs["request"], dict):
        return kwargs["request"]
    return {"malformed": repr((args, kwargs))[:1000]}


def run_worker(config: SmmfConfig, model_names: list[str], *, loglevel: str = "INFO",
               metrics_port: int | None = None) -> None:
    """Serve `model_names` until stopped; raises ProviderUnavailable before consuming if it cannot.

    With `metrics_port`, Prometheus metrics are served on 0.0.0.0:`metrics_port`.
    """
    runtime = WorkerRuntime(config, model_names)
    runtime.prepare()
    tracing.setup("smmf-queue-worker")
    if logging.getLevelName(loglevel.upper()) != logging.DEBUG:
        for name in PER_JOB_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if metrics_port:
        prometheus_client.start_http_server(metrics_port)
    app = make_celery_app(config)
    register_tasks(app, runtime)
    # Our handler, in the format asked for (logs.py), instead of the one Celery would install.
    signals.setup_logging.connect(lambda **_: logs.configure(loglevel.upper()), weak=False)
    signals.worker_ready.connect(lambda **_: runtime.start_heartbeat(), weak=False)
    signals.worker_shutting_down.connect(lambda **_: runtime.stop_within_grace(), weak=False)
    signals.worker_shutdown.connect(lambda **_: runtime.stop_heartbeat(), weak=False)
    # celery_ext.ThreadPool: Celery's thread pool, in which every task ends (`--pool` takes only
    # Celery's own names; a configured pool replaces its default).
    app.conf.worker_pool = "smmf_queue.celery_ext:ThreadPool"
    app.worker_main([
        "worker", f"--concurrency={runtime.pool_size}",
        f"--queues={','.join(runtime.queues)}", f"--hostname={runtime.nodename}",
        "--without-gossip", "--without-mingle", "--task-events", f"--loglevel={loglevel}",
    ])
