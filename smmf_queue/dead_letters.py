"""Dead letters: jobs that could not be run, kept with their request so an operator can look,
send them again, or drop them (`smmf-queue jobs`).

A job becomes one when it kept killing its workers (delivered more than `worker.max_attempts`
times: `WorkerLost`), when its message can never run as sent (a request that does not validate,
one on another model's queue: `InvalidRequest`, `WrongWorker`), or when Celery refused the
message before any task (undecodable, no task headers, an unknown task: `Rejected`; such a
letter keeps the message's headers and size, not its body). Its caller, if any, got the error at
once; the letter is for whoever runs the queue. Each is a hash (`keys.dead_letter`) with a TTL, listed by time in a sorted set
(`keys.DEAD_LETTERS`). Letters hold the request, prompt included, like the queue itself did: the
command's list shows sizes only, `show` shows the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import redis
from pydantic import BaseModel

from . import keys
from .attempt import WORKER_LOST

if TYPE_CHECKING:
    from .queues import JobSender


class DeadLetter(BaseModel):
    """A job that could not be run, and why."""

    job_id: str
    kind: str
    #: the model the request names ("?" when it names none).
    model: str
    #: the queue the message was taken from.
    queue: str
    #: the job's request as it was enqueued (the Celery message's kwargs).
    request: dict[str, Any]
    attempts: int
    error_type: str
    error_message: str
    #: unix time the job was given up.
    failed_at: float

    @property
    def size(self) -> str:
        """How big the job is, without its content (what a listing may show)."""
        for part in ("messages", "texts"):
            if isinstance(self.request.get(part), list):
                return f"{len(self.request[part])} {part}"
        if "body_bytes" in self.request:
            return f"{self.request['body_bytes']} bytes"
        return "malformed"


def keep(client: redis.Redis, letter: DeadLetter, ttl_s: int) -> None:
    """Store a dead letter (replacing one of the same job)."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.dead_letter(letter.job_id), letter.model_dump_json(), ex=ttl_s)
    pipe.zadd(keys.DEAD_LETTERS, {letter.job_id: letter.failed_at})
    pipe.execute()


def listed(client: redis.Redis, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters first (those whose TTL passed drop out of the index here)."""
    job_ids = [j.decode() for j in cast(list[bytes], client.zrevrange(keys.DEAD_LETTERS, 0, limit - 1))]
    letters = []
    for job_id, raw in zip(job_ids, client.mget([keys.dead_letter(j) for j in job_ids]) if job_ids else []):
        if raw is None:
            client.zrem(keys.DEAD_LETTERS, job_id)
        else:
            letters.append(DeadLetter.model_validate_json(raw))
    return letters


def get(client: redis.Redis, job_id: str) -> DeadLetter | None:
    raw = client.get(keys.dead_letter(job_id))
    return DeadLetter.model_validate_json(cast(bytes, raw)) if raw is not None else None


def forget(client: redis.Redis, job_ids: list[str]) -> int:
    """Drop dead letters; how many there were."""
    if not job_ids:
        return 0
    pipe = client.pipeline(transaction=True)
    pipe.delete(*[keys.dead_letter(j) for j in job_ids])
    pipe.zrem(keys.DEAD_LETTERS, *job_ids)
    return int(pipe.execute()[0])


def fresh_start(client: redis.Redis, job_id: str) -> None:
    """Clear a job's record (its cancel mark with it) and event log, so that sending it again under the same
    id runs it as a new job (its first attempt) rather than finding it failed."""
    client.delete(keys.job_record(job_id), keys.event_log(job_id))


def requeue(client: redis.Redis, sender: JobSender, letter: DeadLetter) -> None:
    """Send a dead job again under its own id, as a new job (first attempt, empty event log);
    its letter is dropped once it is on its queue. No expiry: it waits for a worker. Only a
    job that kept killing its workers can be sent again: the others would fail the same way."""
    if letter.error_type != WORKER_LOST:
        raise ValueError(f"job {letter.job_id} failed with {letter.error_type}: sending it again "
                         "would fail the same way")
    fresh_start(client, letter.job_id)
    lane = letter.request.get("lane")
    sender.send(keys.TASK_OF_KIND[letter.kind], letter.kind,
                letter.request, expires_s=None,
                priority=keys.BATCH_PRIORITY if lane == "batch" else keys.INTERACTIVE_PRIORITY)
    forget(client, [letter.job_id])


def summary(letter: DeadLetter) -> dict[str, Any]:
    """A letter as a listing shows it: everything but the request's content."""
    return {**letter.model_dump(exclude={"request"}), "size": letter.size}
