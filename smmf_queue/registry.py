"""Which workers are alive, what they serve, on what hardware, how busy: liveness by expiry.

Each worker keeps one key, `smmf:worker:<id>`, holding a JSON record and a TTL a little longer
than its heartbeat interval. A worker that dies stops renewing it, and Redis forgets it within
the TTL: no reaper, no stale entries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis
import redis.asyncio
from pydantic import BaseModel

from . import keys


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


def beat(client: redis.Redis, info: WorkerInfo, ttl_s: float) -> None:
    """Write one heartbeat."""
    info.beat_at = time.time()
    client.set(keys.worker_heartbeat(info.worker_id), info.model_dump_json(), px=int(ttl_s * 1000))


def forget(client: redis.Redis, worker_id: str) -> None:
    """Remove a worker's heartbeat at once (clean shutdown)."""
    client.delete(keys.worker_heartbeat(worker_id))


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    """Every worker whose heartbeat has not expired."""
    names = list(client.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN, count=500))
    return _decode(client.mget(names) if names else [])


async def alive_workers(client: redis.asyncio.Redis) -> list[WorkerInfo]:
    """live_workers for asyncio callers."""
    names = [name async for name in client.scan_iter(match=keys.WORKER_HEARTBEAT_PATTERN, count=500)]
    return _decode(await client.mget(names) if names else [])


def _decode(values: Sequence[bytes | str | None]) -> list[WorkerInfo]:
    return [WorkerInfo.model_validate_json(v) for v in values if v is not None]


def serving(workers: list[WorkerInfo], kind: str, model: str) -> list[WorkerInfo]:
    """The workers among `workers` that serve `model` of `kind`."""
    return [w for w in workers if any(m.name == model and m.kind == kind for m in w.models)]


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
