"""Two small subclasses that make each job cheaper for Celery and kombu; named in the app's config.

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
"""

from __future__ import annotations

import contextlib
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from vine import promise

#: the longest a task event waits in the worker before it is published (Flower shows it then).
EVENT_FLUSH_INTERVAL_S = 0.1


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


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
