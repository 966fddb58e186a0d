"""The usage ledger: one PostgreSQL row per job the gateway ran (`[usage] database_url`), for
billing and audits, written off the request path and never lost to a database outage.

A finished job's row goes first into a Redis stream (`keys.USAGE_LEDGER`): for a virtual key,
inside the settlement script it already runs; for any other request, one XADD. Each gateway
runs a LedgerWriter that reads the stream in a consumer group, inserts rows in batches
(asyncpg; a row whose job is already there is skipped, so a batch written twice is harmless)
and acknowledges and deletes them only once PostgreSQL committed them. While PostgreSQL is
unreachable rows wait in Redis, no request fails or slows, and the writer retries with backoff;
rows a dead gateway had read are claimed by another after CLAIM_IDLE_S.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

import redis.asyncio

from . import keys
from .jobs import Usage

log = logging.getLogger("smmf_queue.usage_ledger")

GROUP = "ledger"
#: rows per INSERT.
BATCH = 500
#: seconds a row read by a writer may stay unacknowledged before another writer takes it.
CLAIM_IDLE_S = 60
#: seconds between a writer's looks for such rows (one XAUTOCLAIM), at least.
CLAIM_EVERY_S = 1.0
#: seconds between tries while PostgreSQL is unreachable, at most.
MAX_BACKOFF_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS smmf_usage (
    job_id            text PRIMARY KEY,
    finished_at       timestamptz NOT NULL,
    key_token         text,
    key_alias         text,
    model             text NOT NULL,
    kind              text NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    inputs            integer NOT NULL,
    duration_ms       integer NOT NULL,
    status            text NOT NULL
);
CREATE INDEX IF NOT EXISTS smmf_usage_key_time ON smmf_usage (key_alias, finished_at);
"""
INSERT = """
INSERT INTO smmf_usage (job_id, finished_at, key_token, key_alias, model, kind, prompt_tokens,
                        completion_tokens, inputs, duration_ms, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (job_id) DO NOTHING
"""


def ledger_row(job_id: str, model: str, kind: str, usage: Usage | None, inputs: int,
               duration_s: float, key_token: str | None = None, key_alias: str | None = None) -> str:
    """A job's row as it waits in the stream (JSON); a job without usage failed."""
    return json.dumps({"job_id": job_id, "at": datetime.now(timezone.utc).isoformat(),
                       "key_token": key_token, "key_alias": key_alias or None, "model": model,
                       "kind": kind, "prompt_tokens": usage.prompt_tokens if usage else 0,
                       "completion_tokens": usage.completion_tokens if usage else 0,
                       "inputs": inputs, "duration_ms": round(duration_s * 1000),
                       "status": "ok" if usage else "failed"}, separators=(",", ":"))


def _record(raw: bytes | str) -> tuple[Any, ...]:
    row = json.loads(raw)
    return (row["job_id"], datetime.fromisoformat(row["at"]), row["key_token"], row["key_alias"],
            row["model"], row["kind"], row["prompt_tokens"], row["completion_tokens"],
            row["inputs"], row["duration_ms"], row["status"])


class LedgerWriter:
    """Moves rows from the Redis stream into PostgreSQL, in the background of a gateway."""

    def __init__(self, client: redis.asyncio.Redis, database_url: str):
        self.redis = client
        self.database_url = database_url
        self.consumer = f"gateway-{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        #: whether rows this writer read may still be unwritten (at start, after a failure).
        self._own_pending = True
        self._next_claim = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        import asyncpg

        await self._ensure_group()
        backoff = 0.5
        connection = None
        while True:
            try:
                if connection is None or connection.is_closed():
                    connection = await asyncpg.connect(self.database_url, timeout=5)
                    await connection.execute(SCHEMA)
                while await self._move_batch(connection):
                    pass
                backoff = 0.5
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as exc:
                log.warning("usage ledger: PostgreSQL unreachable (%s: %s); rows wait in Redis, "
                            "next try in %.1f s", type(exc).__name__, exc, backoff)
                connection = None
                self._own_pending = True
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except redis.RedisError as exc:
                log.warning("usage ledger: Redis unreachable (%s); next try in %.1f s", exc, backoff)
                self._own_pending = True
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.USAGE_LEDGER, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _move_batch(self, connection: Any) -> bool:
        """Insert one batch: this writer's own unacknowledged rows first (after a failure), then
        rows idle under a dead writer (looked for every CLAIM_EVERY_S), then new ones (waiting up
        to a second for them). Whether a batch was written (more may be waiting)."""
        entries = await self._pending() if self._own_pending else []
        self._own_pending = bool(entries)
        if not entries and time.monotonic() >= self._next_claim:
            entries = await self._claimed()
            self._next_claim = time.monotonic() + (0 if entries else CLAIM_EVERY_S)
        entries = entries or await self._new()
        if not entries:
            return False
        await connection.executemany(INSERT, [_record(fields[b"row"]) for _, fields in entries])
        ids = [entry_id for entry_id, _ in entries]
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(keys.USAGE_LEDGER, GROUP, *ids)
        pipe.xdel(keys.USAGE_LEDGER, *ids)
        await pipe.execute()
        return True

    async def _pending(self) -> list[Entry]:
        answer = await self.redis.xreadgroup(GROUP, self.consumer, {keys.USAGE_LEDGER: "0"}, count=BATCH)
        return _entries(answer)

    async def _claimed(self) -> list[Entry]:
        answer: Any = await self.redis.xautoclaim(keys.USAGE_LEDGER, GROUP, self.consumer,
                                                  min_idle_time=CLAIM_IDLE_S * 1000, count=BATCH)
        return [entry for entry in answer[1] if entry[1]]

    async def _new(self) -> list[Entry]:
        answer = await self.redis.xreadgroup(GROUP, self.consumer, {keys.USAGE_LEDGER: ">"},
                                             count=BATCH, block=1000)
        return _entries(answer)


#: a stream entry: its id and fields.
Entry = tuple[bytes, dict[bytes, bytes]]


def _entries(answer: Any) -> list[Entry]:
    """The entries of an XREADGROUP answer on one stream (RESP2's list, or RESP3's map), less
    those deleted since they were read (no fields)."""
    if not answer:
        return []
    entries = next(iter(answer.values())) if isinstance(answer, dict) else answer[0][1]
    return [entry for entry in entries if entry[1]]
