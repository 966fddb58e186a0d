"""Resumable SSE streams: which frames a reconnecting client already has, and when a stream
whose client left is given up.

Every SSE frame of a streamed chat carries an `id:` naming the event of the job's log it came
from: `<seq>`, or `<seq>.1` for the usage frame that follows the finishing frame of event
`<seq>`; the opening role frame is `0`. A client that loses its connection sends the last id
it saw as `Last-Event-ID` to `GET /v1/chat/completions/{id}/stream` (on any gateway replica)
and gets every frame after it, read from the job's event log: nothing missing, nothing twice.

A job whose reader left keeps running for `gateway.resume_grace_s`; then it is cancelled
unless a reader resumed it meanwhile. Each resume writes a fresh token under
`keys.stream_reader`; a reader that leaves remembers the token it attached with (none, for the
first reader), and cancels only if the token is still that one when the grace is over: nobody
came back after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid

import redis
import redis.asyncio

from . import keys, redis_clients
from .client import AsyncClient
from .errors import RequestError

#: where a frame stands in its job's stream: (event seq, part); part 1 is the usage frame.
FrameId = tuple[int, int]
#: the position of a reader that has seen nothing.
NOTHING_SEEN: FrameId = (-1, 0)
ROLE_FRAME: FrameId = (0, 0)
#: the ids this gateway sends, as a pattern (the resume route's header, in its OpenAPI schema):
#: an event's seq, and `.1` for the usage frame.
LAST_EVENT_ID = r"^([0-9]+)(\.1)?$"


def frame_id_text(frame: FrameId) -> str:
    seq, part = frame
    return f"{seq}.{part}" if part else str(seq)


def parse_last_event_id(value: str | None) -> FrameId:
    """The position a `Last-Event-ID` header names; NOTHING_SEEN without one."""
    if not value:
        return NOTHING_SEEN
    sent = re.fullmatch(LAST_EVENT_ID, value.strip())
    if sent is None:
        raise RequestError(f"Last-Event-ID {value[:40]!r} is not an id this gateway sent "
                           "('<seq>' or '<seq>.1')")
    return int(sent[1]), 1 if sent[2] else 0


class LeftStreams:
    """Cancels the jobs of streams whose readers left and did not come back in time."""

    def __init__(self, client: AsyncClient, grace_s: float):
        self._client = client
        self._redis = redis_clients.connect_async(client.config.queue)
        self._grace_s = grace_s
        self._ttl_s = max(1, math.ceil(client.config.queue.job_timeout_s))  # SET's EX: whole seconds
        self._pending: set[asyncio.Task[None]] = set()

    async def attach(self, job_id: str) -> bytes:
        """Note that a reader resumed a job's stream; the token it leaves with."""
        token = uuid.uuid4().hex.encode()
        await self._redis.set(keys.stream_reader(job_id), token, ex=self._ttl_s)
        return token

    def left(self, job_id: str, token: bytes | None) -> None:
        """A reader that attached with `token` left before the end: give the job up later."""
        task = asyncio.get_running_loop().create_task(self._cancel_unless_resumed(job_id, token))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _cancel_unless_resumed(self, job_id: str, token: bytes | None) -> None:
        with contextlib.suppress(OSError, redis.RedisError):
            if self._grace_s:
                await asyncio.sleep(self._grace_s)
                if await self._redis.get(keys.stream_reader(job_id)) != token:
                    return  # another reader resumed the stream after this one
            await self._client.cancel(job_id)

    async def aclose(self) -> None:
        """Stop waiting; jobs still in their grace run to their end."""
        for task in list(self._pending):
            task.cancel()
        await self._redis.aclose()
