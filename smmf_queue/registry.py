"""Which workers are alive, what they serve, on what hardware, how busy: liveness by expiry.

Each worker keeps one key, `smmf:worker:<id>`, holding a JSON record and a TTL a little longer
than its heartbeat interval. A worker that dies stops renewing it, and Redis forgets it within
the TTL. Worker ids are also kept in one set (`keys.WORKERS`), so reading the live workers
costs O(workers), not a scan of the keyspace; a reader drops the ids whose key has expired.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis
import redis.asyncio
from pydantic import BaseModel

from . import keys
from .jobs import PLAIN_WIRE


class ServedModel(BaseModel):
    name: str
    kind: str
    queue: str
    provider: str
    slots: int


class WorkerInfo(BaseModel):
    """What a worker's heartbeat says about it."""

    worker_id: str
    host: str
    pid: int
    hardware: str
    models: list[ServedModel]
    in_flight: int = 0
    started_at: float
    beat_at: float
    #: the newest job wire version it reads (jobs.py); workers from before wire 2 say nothing.
    wire: int = PLAIN_WIRE


def beat(client: redis.Redis, info: WorkerInfo, ttl_s: float) -> None:
    """Write one heartbeat (one round trip)."""
    info.beat_at = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.worker_heartbeat(info.worker_id), info.model_dump_json(), px=int(ttl_s * 1000))
    pipe.sadd(keys.WORKERS, info.worker_id)
    pipe.execute()


def forget(client: redis.Redis, worker_id: str) -> None:
    """Remove a worker's heartbeat at once (clean shutdown)."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker_heartbeat(worker_id))
    pipe.srem(keys.WORKERS, worker_id)
    pipe.execute()


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not expired."""
    ids = sorted(cast(set[bytes], client.smembers(keys.WORKERS)))
    values = client.mget([keys.worker_heartbeat(i.decode()) for i in ids]) if ids else []
    expired = _expired(ids, values)
    if expired:
        client.srem(keys.WORKERS, *expired)
    return _decode(values)


async def alive_workers(client: redis.asyncio.Redis) -> list[WorkerInfo]:
    """live_workers for asyncio callers."""
    ids = sorted(cast(set[bytes], await client.smembers(keys.WORKERS)))
    values = await client.mget([keys.worker_heartbeat(i.decode()) for i in ids]) if ids else []
    expired = _expired(ids, values)
    if expired:
        await client.srem(keys.WORKERS, *expired)
    return _decode(values)


def _expired(ids: list[bytes], values: Sequence[bytes | str | None]) -> list[bytes]:
    """The ids whose heartbeat key is gone: workers that died."""
    return [worker_id for worker_id, value in zip(ids, values) if value is None]


def _decode(values: Sequence[bytes | str | None]) -> list[WorkerInfo]:
    return [WorkerInfo.model_validate_json(v) for v in values if v is not None]


def serving(workers: list[WorkerInfo], kind: str, model: str) -> list[WorkerInfo]:
    """The workers among `workers` that serve `model` of `kind`."""
    return [w for w in workers if any(m.name == model and m.kind == kind for m in w.models)]


def behind(workers: list[WorkerInfo], kind: str, model: str, wire: int) -> int:
    """How many live workers of `model` cannot read messages of wire version `wire`."""
    return sum(1 for w in serving(workers, kind, model) if w.wire < wire)


def replicas(workers: list[WorkerInfo], kind: str, model: str) -> int:
    """How many live workers serve `model` of `kind`."""
    return len(serving(workers, kind, model))


@dataclass
class LivenessCache:
    """Keeps what the registry said for `max_age_s`, so a busy producer scans Redis rarely."""

    max_age_s: float = 1.0
    _workers: list[WorkerInfo] | None = None
    _read_at: float = 0.0

    def fresh(self) -> list[WorkerInfo] | None:
        if self._workers is not None and time.monotonic() - self._read_at < self.max_age_s:
            return self._workers
        return None

    def store(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        self._workers, self._read_at = workers, time.monotonic()
        return workers
