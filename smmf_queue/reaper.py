"""Lease-based redelivery: a job whose worker died goes back on its queue within seconds.

A worker killed mid-job leaves its Celery message unacknowledged. On Redis, kombu gives such a
message back only after the broker's `visibility_timeout` (an hour by default), and it cannot
tell a dead worker's message from a long job's. The job record can: a RUNNING job whose lease
(renewed with every heartbeat of a live worker) has expired has lost its worker. Every live
worker runs `Reaper.reap` with its heartbeat; a Redis lock lets one act at a time. It takes the
lost jobs out of the lease index (lua.REAP) and hands each one's message back to its queue with
kombu's own `restore_by_tag`, marked redelivered, so the next delivery claims it as a new
attempt (and `max_attempts` still counts every one).

On RabbitMQ the broker itself requeues a dead consumer's messages at once; there the reaper
only keeps the lease index tidy.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery import Celery

from . import keys, lua

log = logging.getLogger("smmf_queue.reaper")

#: most lost jobs handed back in one pass.
REAP_BATCH = 100
#: seconds one reaper may hold the lock (a pass takes milliseconds).
LOCK_TIMEOUT_S = 10.0


class Reaper:
    """Finds jobs whose lease expired and puts their messages back on their queues."""

    def __init__(self, client: redis.Redis, app: Celery, *, event_ttl_s: int):
        self.client = client
        self.app = app
        #: the TTL a lost job's event log gets (a running first attempt's has none).
        self.event_ttl_s = event_ttl_s
        self.on_redis = str(app.conf.broker_url).startswith(("redis://", "rediss://"))
        self._reap = client.register_script(lua.REAP)
        self._broker: Any = None  # kombu connection, opened on first use

    def reap(self) -> list[str]:
        """One pass, if no other reaper is in one: the ids of the jobs handed back."""
        lock = self.client.lock(keys.REAPER_LOCK, timeout=LOCK_TIMEOUT_S, blocking=False)
        if not lock.acquire():
            return []
        try:
            lost = [job.decode() for job in self._reap(
                keys=[keys.LEASES],
                args=[keys.job_record(""), REAP_BATCH, keys.event_log(""), self.event_ttl_s])]
            if lost and self.on_redis:
                self._hand_back(set(lost))
            return lost
        finally:
            lock.release()

    def _hand_back(self, lost: set[str]) -> None:
        """Restore the unacknowledged messages of `lost` jobs (a job's id is its task id)."""
        channel = self._channel()
        for tag, raw in self.client.hscan_iter(channel.unacked_key):
            message = json.loads(raw)[0]
            job_id = message.get("headers", {}).get("id")
            if job_id in lost:
                channel.qos.restore_by_tag(tag)
                log.warning("job %s lost its worker (lease expired); handed back to its queue", job_id)
                lost.discard(job_id)
        for job_id in lost:  # acknowledged meanwhile, or already restored by kombu
            log.info("job %s: lease expired, no unacknowledged message to hand back", job_id)

    def _channel(self) -> Any:
        if self._broker is None:
            self._broker = self.app.connection_for_write()
        return self._broker.default_channel

    def close(self) -> None:
        if self._broker is not None:
            self._broker.release()
