"""Small subclasses of Celery's and kombu's parts, named in the app's config: what makes each job
cheaper, the lease of every message a worker holds, and a worker that a silent Redis cannot
leave holding a message for good (`QoS.ack`, `ThreadPool`).

Profiled with py-spy on a worker whose model answers instantly (docs/performance-log.md), about half of
the worker's CPU per job went to two things, both fixed here without changing what is sent:

- kombu's Redis channel built a fresh `redis.Redis` (which copies some 170 response callbacks)
  for every message it published, every ack and every batch of task events. `Channel` keeps one
  per channel while the channel's connection pool is current: redis-py clients are thread-safe
  and share that pool, so pool, connections, commands and reconnects all stay kombu's.
- Celery's worker published its buffered task events (received, started, succeeded: what Flower
  shows) on the next turn of its event loop, i.e. twice per job, the first time while the job is
  starting. `Consumer` publishes them at most every `EVENT_FLUSH_INTERVAL_S` instead: the same
  events, with their own timestamps, in fewer and larger messages.
- kombu wrapped its bookkeeping of unacknowledged messages (two writes on taking a message, two
  on its ack) in MULTI/EXEC: four of the Redis commands of every job. `QoS` sends the same
  writes in plain pipelines, one round trip each as before (why that is safe: its docstring).
- Where the broker is the Redis of the job records, the job's fenced finish removes its
  message's bookkeeping itself, in its one script call, and the ack only forgets the message
  (`held_message`, `settled_by_finish`): one worker round trip fewer per job.
- That bookkeeping is also how a dead worker's jobs come back: kombu's index of taken messages
  is their lease, on one Redis and behind Sentinel (`Transport`, `SentinelTransport`). The
  worker's heartbeat stamps every message it holds (`renew_held_messages`), and kombu's own
  restore, with `visibility_timeout` set to `worker.lease_s`, hands back the messages of a
  worker that stopped stamping (queues.make_celery_app). A restored message keeps
  its delivery tag, so a delivery that lost its job to a later one of the same message leaves
  the index entry at its ack (`keep_lease_of`): it is the later delivery's lease.
- Celery's Redis result backend did the same with each result's SETEX and PUBLISH:
  `ResultBackend` sends them in a plain pipeline (queues.result_backend_url names it). Where the
  results live on the Redis of the job records, the worker's tasks store nothing themselves:
  the fenced finish writes the result (`ResultBackend.result_copy`, lua.FINISH), and publishes
  it only where no reply channel brings the job's `end` to its producer (`ResultBackend`: a
  waiter looks for the result each second too).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import signals, states
from celery.backends.redis import RedisBackend
from celery.concurrency.thread import TaskPool as CeleryThreadPool
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from vine import promise

log = logging.getLogger("smmf_queue.celery_ext")

#: the longest a task event waits in the worker before it is published (Flower shows it then).
EVENT_FLUSH_INTERVAL_S = 0.1


class QoS(kombu_redis.QoS):
    """kombu's unacknowledged-message bookkeeping without MULTI/EXEC around each pair of writes.

    The transaction guarded nothing a job needs. Taking a message, the index entry and the
    message are written after BRPOP has removed it from the queue: a connection lost before they
    land loses the message with or without a transaction (from its claim on, our lease covers
    the job: attempt.py). The ack removes the message before its index entry (kombu: the other
    way round), so that a cut between the two leaves an index entry without a message, which
    kombu's restore skips, never a message that no index entry leads to. Both pairs are
    idempotent, so redis-py's retry of a whole pipeline after a reconnect is harmless. The
    restore (`restore_by_tag`) keeps its own WATCH/MULTI transaction.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _HOLDERS.add(self)

    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's bookkeeping of a taken message; and which job it brings (`held_message`)."""
        super().append(message, delivery_tag)
        job_id = (message.headers or {}).get("id")
        if job_id is not None:
            _HELD[str(job_id)] = (self, delivery_tag)

    def stamp_held(self, score: float) -> None:
        """Give the messages this QoS holds (taken, not yet acknowledged) `score` in kombu's
        index of taken messages: the time they were last known alive. Only entries still
        there: XX never brings back a message acknowledged meanwhile."""
        tags = self._held_tags()
        if tags:
            with self.channel.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, dict.fromkeys(tags, score), xx=True)

    def _held_tags(self) -> list[str]:
        """The tags taken and not yet acknowledged (kombu drops acknowledged ones from
        `_delivered` only at its next take: until then they are in `_dirty`)."""
        delivered: Any = self._delivered or {}
        acknowledged: Any = self._dirty or set()
        for _ in range(3):  # the consumer's thread may change them while they are copied
            with contextlib.suppress(RuntimeError):
                return [tag for tag in list(delivered) if tag not in acknowledged]
        return []

    def ack(self, delivery_tag: str) -> None:
        """kombu's ack, except for a delivery whose job another delivery took over
        (`keep_lease_of`) or whose finish removed its bookkeeping already (`settled_by_finish`):
        only this process forgets those."""
        job_id = self._let_go(delivery_tag)
        if _SETTLED.take(delivery_tag) or (job_id is not None and _LOST.take(job_id)):
            kombu_virtual.QoS.ack(self, delivery_tag)
            return
        with self._forgotten_even_if_unheard(delivery_tag):
            super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._let_go(delivery_tag)
        with self._forgotten_even_if_unheard(delivery_tag):
            super().reject(delivery_tag, requeue=requeue)

    @contextlib.contextmanager
    def _forgotten_even_if_unheard(self, delivery_tag: str) -> Iterator[None]:
        """kombu forgets an acknowledged or rejected message only once Redis has heard: here it
        is forgotten even when Redis does not answer. A message still held fills the worker's
        prefetch slot and the heartbeat renews its lease, so a silent Redis at the ack stopped
        the worker for good; forgotten, its lease lapses, it comes back, and its finished job
        runs nothing."""
        try:
            yield
        except Exception:
            kombu_virtual.QoS.ack(self, delivery_tag)
            raise

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """kombu's restore as the channel closes (its connection lost, the worker stopping):
        the messages it held are no longer held here, acknowledged or not, so `held_message`
        forgets them, and this QoS with them."""
        try:
            return super().restore_unacked_once(stderr)
        finally:
            for job_id, (holder, _) in list(_HELD.items()):
                if holder is self:
                    _HELD.pop(job_id, None)

    def _let_go(self, delivery_tag: str) -> str | None:
        """The id of the job that a message held here brings, no longer held (`held_message`)."""
        delivered: Any = self._delivered
        message = delivered.get(delivery_tag)
        job_id = (message.headers or {}).get("id") if message is not None else None
        if job_id is None:
            return None
        _HELD.pop(str(job_id), None)
        return str(job_id)

    @contextlib.contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as connected:
                yield connected.pipeline(transaction=False)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.hdel(self.unacked_key, delivery_tag).zrem(self.unacked_index_key, delivery_tag)


#: the QoS of each channel of this process: the messages they hold are this worker's.
_HOLDERS: weakref.WeakSet[QoS] = weakref.WeakSet()


class _Marks:
    """Keys marked in this process until their message's ack takes the mark, once (oldest
    first; only the newest `kept` are kept, should an ack never come)."""

    def __init__(self, kept: int = 1024):
        self._marks: dict[str, None] = {}
        self._lock = threading.Lock()
        self._kept = kept

    def add(self, key: str) -> None:
        with self._lock:
            self._marks[key] = None
            while len(self._marks) > self._kept:
                del self._marks[next(iter(self._marks))]

    def take(self, key: str) -> bool:
        """Whether `key` was marked; forgets it."""
        with self._lock:
            if key not in self._marks:
                return False
            del self._marks[key]
            return True


#: ids of jobs whose delivery here lost them to another delivery, until that delivery's ack.
_LOST = _Marks()


def keep_lease_of(job_id: str) -> None:
    """The delivery of `job_id` running here lost the job to a later delivery (its fenced
    finish was refused, or its next event found the log past it): its ack leaves the message's
    entry in kombu's index.

    A message that kombu's restore handed back while its worker still ran it (a heartbeat
    stalled past the lease) comes back with the same delivery tag: the entry that the stale
    delivery's ack would remove is the later delivery's lease, and without it a death of the
    later worker would leave the job unfinished for good. Should no later delivery hold the
    message, it comes back once more, and its claim finds the job running or ended."""
    _LOST.add(job_id)


#: the QoS and delivery tag of the message of each job taken here, until its ack.
_HELD: dict[str, tuple[QoS, str]] = {}
#: delivery tags of messages whose job's finish removed their bookkeeping, until their ack.
_SETTLED = _Marks()


def held_message(job_id: str) -> tuple[str, str, str] | None:
    """kombu's hash of taken messages, its index, and the delivery tag of the message of
    `job_id` that this process holds (None if none): for the job's fenced finish to remove the
    message's bookkeeping in its own script call (lua.FINISH), which the ack then skips
    (`settled_by_finish`). One worker round trip fewer per job: kombu's ack is a pipeline of
    its own. The index is the message's lease; once the job has finished, nothing needs it."""
    held = _HELD.get(job_id)
    if held is None:
        return None
    qos, tag = held
    prefix = getattr(qos.channel, "global_keyprefix", "") or ""
    return prefix + qos.unacked_key, prefix + qos.unacked_index_key, tag


def settled_by_finish(delivery_tag: str) -> None:
    """A job's finish removed the bookkeeping of its message `delivery_tag` (`held_message`):
    its ack only forgets the message here. By tag, not job: two messages of one job id (a
    caller that sent it twice) each keep their own bookkeeping until their own ack."""
    _SETTLED.add(delivery_tag)


def renew_held_messages() -> None:
    """Mark every message this process holds as alive now (the worker's heartbeat): kombu's
    restore hands back those not marked for its `visibility_timeout` (worker.lease_s)."""
    now = time.time()  # kombu's own clock for this index
    for qos in list(_HOLDERS):
        qos.stamp_held(now)


def give_back_held_messages() -> None:
    """Mark every message this process holds as long dead: the next restore of any live worker
    hands them back (a worker stopping before its jobs ended)."""
    for qos in list(_HOLDERS):
        qos.stamp_held(0)


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, storing and publishing a result in one plain pipeline.

    Without MULTI/EXEC a waiter still cannot miss the result: Celery's waiter subscribes to
    the result's channel before it reads the key, and the key is written before the PUBLISH.
    The fenced finish publishes only a plain Celery producer's result (lua.FINISH), so a waiter
    also looks for its result each interval of Celery's wait (a second).
    """

    def _wait_for_pending(self, result: Any, timeout: Any = None, on_interval: Any = None,
                          on_message: Any = None, **kwargs: Any) -> Any:
        """Celery's wait on the result's channel, looking for the stored result each interval
        too: the finish of a job with a reply channel (the SDK's, the gateway's) does not
        publish it, its producer having the job's `end` event."""
        consumer = self.result_consumer

        def look() -> None:
            if not result.on_ready.ready:  # a GET each interval until the result is in
                consumer.on_wait_for_pending(result)
            if on_interval is not None:
                on_interval()

        return super()._wait_for_pending(result, timeout=timeout, on_interval=look,
                                         on_message=on_message, **kwargs)

    def _set(self, key: str, value: Any, expires: Any = None) -> None:
        expires = self.expires if expires is None else expires
        with self.client.pipeline(transaction=False) as pipe:
            if expires:
                pipe.setex(key, expires, value)
            else:
                pipe.set(key, value)
            pipe.publish(key, value)
            pipe.execute()

    def result_copy(self, task_id: str, result: Any = None,
                    failure: BaseException | None = None) -> tuple[str, str]:
        """The key and the encoded meta of a task's result or failure, as `store_result` would
        write them, for a script that writes them itself (lua.FINISH). That script writes only
        for the attempt that holds the job, so Celery's read before each write (never overwrite
        a success with a duplicate delivery's outcome) is not needed, nor its round trip."""
        state, value = ((states.FAILURE, self.prepare_exception(failure)) if failure is not None
                        else (states.SUCCESS, result))
        meta = self._get_result_meta(result=value, state=state, traceback=None, request=None)
        meta["task_id"] = task_id
        return self.get_key_for_task(task_id).decode(), self.encode(meta)


class _KeptClient:
    """One redis client per kombu channel, kept while the channel's connection pool is."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:  # type: ignore[attr-defined]
            client = self._sync_client = super()._create_client()  # type: ignore[misc]
        return client


class Channel(_KeptClient, kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_KeptClient, kombu_redis.SentinelChannel):
    """The same behind Sentinel: without our QoS, nothing would renew a held message's lease,
    and kombu's restore would hand back every job that runs longer than `worker.lease_s`."""

    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class ThreadPool(CeleryThreadPool):
    """Celery's thread pool, except that a task whose trace fails outside its body still ends.

    Celery's trace raises when storing the task's state fails twice (the result backend's Redis
    silent or full): the thread pool then dropped the exception with its future, so the task
    never ended, its message stayed held and the worker took no other job, for good. Here such
    a task ends as a failure, as Celery ends a task whose body raised: its message is
    acknowledged (the body has run to its end, so the job's record holds its outcome) and
    Flower sees `task-failed`."""

    def on_apply(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        return super().on_apply(_ends_on_internal_error(target), *args, **kwargs)


def _ends_on_internal_error(target: Any) -> Any:
    """`target`, returning Celery's "failed" triple where it would raise (`ThreadPool`)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return target(*args, **kwargs)
        except Exception:
            log.exception("a task's trace failed outside its body; it ends as failed")
            return 1, ExceptionInfo(internal=True), 0.0
    return run


class Consumer(CeleryConsumer):
    """Celery's consumer, publishing buffered task events on a timer instead of at once."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._event_flush_due = False
        self._schedule_event_flush_promise = promise(self._schedule_event_flush)

    def on_send_event_buffered(self) -> None:
        # Called from pool threads too; call_soon is how Celery itself hands this to the loop.
        if self.hub:
            self.hub.call_soon(self._schedule_event_flush_promise)

    def _schedule_event_flush(self) -> None:
        """On the loop's thread: one timed flush for all the events buffered meanwhile."""
        if not self._event_flush_due:
            self._event_flush_due = True
            self.hub.call_later(EVENT_FLUSH_INTERVAL_S, self._flush_due_events)

    def _flush_due_events(self) -> None:
        self._event_flush_due = False
        self._flush_events()

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Celery logs and acknowledges an undecodable message; it also tells `task_rejected`'s
        receivers, as it does for the other messages it refuses (the worker keeps a dead letter)."""
        super().on_decode_error(message, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def shutdown(self) -> None:
        """Publish what the timer had not yet, before Celery closes the event dispatcher."""
        with contextlib.suppress(Exception):
            self._flush_events()
        super().shutdown()
