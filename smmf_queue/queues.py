"""The Celery app every producer and worker builds from the config, and how jobs are sent.

JSON only (pickle on a shared broker is remote code execution), late acks with
reject-on-worker-lost and prefetch 1 (a job whose worker dies goes to another replica, on Redis
once its lease, `worker.lease_s`, is over), task
events on (Flower), one queue per model and kind (`keys.queue_name`). On Redis each queue has
priority lanes (kombu's priority emulation): interactive jobs overtake waiting batch chunks.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery

from . import keys
from .config import SmmfConfig
from .providers import require_extra

#: kombu's Redis transports with our QoS and channel (celery_ext.py), by URL scheme and by
#: name: producers never import them. Our QoS is what renews the lease of a message a worker
#: holds: without it, a job running longer than `worker.lease_s` would be handed back.
REDIS_TRANSPORTS = {"redis://": "smmf_queue.celery_ext:Transport",
                    "sentinel://": "smmf_queue.celery_ext:SentinelTransport"}


def make_celery_app(config: SmmfConfig, *, store_results: bool = True) -> Celery:
    """A Celery app for the config's broker (no tasks registered).

    Workers store results (`store_results`); producers pass False: they read results from the
    job's stream, and a producer with a Redis result backend would subscribe to and unsubscribe
    from each task's result channel on every send (two extra round trips per job). A result
    holds the reply only: Celery's `result_extended` would store each job's request, prompt
    included, a second time.
    """
    app = Celery("smmf_queue", broker=config.queue.broker_url,
                 backend=result_backend_url(config.queue.results) if store_results else None,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        result_expires=config.queue.result_ttl_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A taken message's lease (celery_ext.renew_held_messages): one that its worker
            # stopped renewing goes back on its queue at the next of kombu's restores, which
            # every worker runs with each heartbeat.
            "visibility_timeout": config.worker.lease_s,
            "unacked_restore_interval": config.worker.heartbeat_interval_s,
            "unacked_restore_throttle": 1,
            # kombu's restore runs under a lock that lasts 5 minutes unless released: one left
            # by a worker killed inside a restore held every restore back that long.
            "unacked_mutex_expire": config.worker.heartbeat_interval_s,
            # A silent Redis (a frozen host, a partition): a publish or another command gives
            # up, and a worker drops a BRPOP or pub/sub connection whose answer is overdue at
            # kombu's check of it, every socket timeout (kombu's default, 25 s, took up to 51 s
            # to follow a failover away from a silent master).
            "socket_timeout": config.queue.socket_timeout_s,
            "socket_connect_timeout": config.queue.socket_timeout_s,
            "health_check_interval": config.queue.socket_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": keys.PRIORITY_STEPS,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_default_queue=keys.DEFAULT_QUEUE,
        broker_pool_limit=32,
        worker_consumer="smmf_queue.celery_ext:Consumer",
        # The result backend's commands give up in a silent Redis too (Celery's default: never),
        # and a worker storing a result tries again until Redis answers (behind Sentinel: the
        # new master), rather than failing a job that has run.
        redis_socket_timeout=config.queue.socket_timeout_s,
        redis_socket_connect_timeout=config.queue.socket_timeout_s,
        result_backend_always_retry=True,
    )
    ours = next((transport for scheme, transport in REDIS_TRANSPORTS.items()
                 if config.queue.broker_url.startswith(scheme)), None)
    if ours is not None:
        app.conf.broker_transport = ours
    else:  # kombu's own (a TLS Redis): nothing renews a held message, so no lease of seconds
        app.conf.broker_transport_options["visibility_timeout"] = config.queue.visibility_timeout_s
    if config.queue.sentinel_master:  # kombu and the result backend find the master themselves
        app.conf.broker_transport_options["master_name"] = config.queue.sentinel_master
        app.conf.result_backend_transport_options = {"master_name": config.queue.sentinel_master}
    if config.queue.broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        # On RabbitMQ, quorum queues: replicated, durable, and they survive a node's loss.
        app.conf.task_default_queue_type = "quorum"
        app.conf.task_create_missing_queue_type = "quorum"
        app.conf.worker_detect_quorum_queues = True
    return app


def result_backend_url(url: str) -> str:
    """The result backend Celery should build for `url`: celery_ext.ResultBackend for a plain
    Redis (by name, as the transport: producers never import it), Celery's own otherwise
    (Sentinel, TLS, another store)."""
    return f"smmf_queue.celery_ext:ResultBackend+{url}" if url.startswith("redis://") else url


#: how often a producer retries a failed publish before reporting the broker unavailable.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}


class JobSender:
    """Puts jobs on their models' queues, in their lanes; the job id is the task id.

    The message is Celery's own (`amqp.create_task_message`), sent by Celery's own
    `amqp.send_task_message` (publish signals, retry policy, delivery mode), through one kombu
    producer that the sender keeps. `app.send_task` does the same plus what our jobs never use
    (routers, parent tasks, result backends) and takes a producer from the pool on every call:
    together a measurable delay before the job leaves a cold client (docs/performance-log.md). A lock
    makes the one producer safe for the threads of a blocking `Client`.

    Flower shows `kwargsrepr`: it names the model and the job's size, never the prompt text.
    On Redis, Celery sends to a queue through kombu's anonymous exchange (straight onto the
    queue's list), so declaring the queue on every send, which only maintains kombu's binding
    table, is skipped: it was a fifth of the producer's CPU per job. RabbitMQ keeps it (a
    message for a queue that does not exist yet would be dropped).
    """

    def __init__(self, app: Celery):
        self.app = app
        on_redis = app.conf.broker_url.startswith(("redis://", "rediss://", "sentinel://"))
        self._declare: list[Any] | None = [] if on_redis else None
        self._producer: Any = None
        self._lock = threading.Lock()

    def send(self, task: str, kind: str, request: dict[str, Any], *, expires_s: float | None,
             priority: int = keys.INTERACTIVE_PRIORITY, headers: dict[str, str] | None = None) -> None:
        """Send one job; `headers` go with its message (a trace's context: tracing.py)."""
        size = _size(request)
        # The expiry as a UTC time: given seconds, Celery converts its own clock's time zone
        # for every message (a tenth of what the gateway spends on a send, profiled).
        expires = None if expires_s is None else datetime.now(timezone.utc) + timedelta(seconds=expires_s)
        message = self.app.amqp.create_task_message(
            request["job_id"], task, (), {"request": request}, expires=expires, argsrepr="()",
            kwargsrepr=f"{{model: {request['model']!r}, {size}}}")
        # Whether Celery stores the result is the worker's to say (worker.register_tasks: where
        # the job's finish writes it); the header, always there, would overrule the task's word.
        message.headers.pop("ignore_result", None)
        if headers:
            message.headers.update(headers)
        with self._lock:
            if self._producer is None:
                self._producer = self.app.producer_pool.acquire(block=True)
            try:
                self.app.amqp.send_task_message(
                    self._producer, task, message, queue=keys.queue_name(kind, request["model"]),
                    retry=True, retry_policy=PUBLISH_RETRY_POLICY, priority=priority,
                    declare=self._declare, expiration=expires_s)
            except Exception:
                self._drop_broken_producer()
                raise

    def _drop_broken_producer(self) -> None:
        """After a failed send the producer's channel may be dead for good (kombu's Sentinel
        channel after a failover): drop its connection's state, so that the next send connects
        afresh (to the new master)."""
        producer, self._producer = self._producer, None
        with contextlib.suppress(Exception):
            producer.connection.collect()
            producer.release()

    def close(self) -> None:
        """Give the producer back to the app's pool."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.release()


def run_flower(config: SmmfConfig) -> None:
    """Run Flower against the config's broker until stopped.

    Basic-auth credentials travel in Flower's environment variable, not on its command line,
    where `ps` would show them.
    """
    import os

    require_extra("flower", "Flower")
    if config.flower.basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = ",".join(
            pair.get_secret_value() for pair in config.flower.basic_auth)
    make_celery_app(config).start(["flower", f"--address={config.flower.host}",
                                   f"--port={config.flower.port}"])


def _size(request: dict[str, Any]) -> str:
    """What Flower shows of a request instead of its content (never the text itself)."""
    for field in ("messages", "texts", "documents"):
        if field in request:
            return f"{len(request[field])} {field}"
    return "?"
