"""One pub/sub connection per process, shared by every job stream the process reads.

A gateway holding hundreds of streams must not open a Redis connection per request. The hub
keeps one subscription connection and a reader task that routes each message to its job's
queue. `subscribe` returns once Redis has confirmed the subscription. A producer may instead
`open` the subscription (the SUBSCRIBE is written), enqueue, then await `confirmed`: the
job cannot publish before Redis has read a SUBSCRIBE sent ahead of it (the worker first has to
receive and start the job), and should an event ever slip by, the reader fills the gap from the
job's event log. This saves the producer a round trip before its job is on the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis
import redis.asyncio

from . import keys

#: seconds to wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT_S = 10.0
#: seconds between attempts to read again after the pub/sub connection broke.
RECONNECT_DELAY_S = 0.2


class StreamHub:
    """Multiplexes the pub/sub channels of many jobs over one connection."""

    def __init__(self, client: redis.asyncio.Redis):
        self._pubsub = client.pubsub()
        self._inboxes: dict[bytes, asyncio.Queue[bytes]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()
        self._lock = asyncio.Lock()

    async def subscribe(self, job_id: str) -> asyncio.Queue[bytes]:
        """A queue that receives the raw events of `job_id`, once the subscription is confirmed."""
        inbox = await self.open(job_id)
        await self.confirmed(job_id)
        return inbox

    async def open(self, job_id: str) -> asyncio.Queue[bytes]:
        """Send the SUBSCRIBE for `job_id` and return its queue, without waiting for Redis's answer."""
        channel = keys.stream_channel(job_id).encode()
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._inboxes[channel] = inbox
        self._confirmed[channel] = asyncio.get_running_loop().create_future()
        async with self._lock:
            await self._pubsub.subscribe(channel)
            self._has_channels.set()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read(), name="smmf-stream-hub")
        return inbox

    async def confirmed(self, job_id: str) -> None:
        """Wait until Redis has confirmed the subscription that `open` sent."""
        confirmed = self._confirmed.get(keys.stream_channel(job_id).encode())
        if confirmed is None:  # already confirmed (and forgotten)
            return
        try:
            await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S)
        except BaseException:
            await self.unsubscribe(job_id)
            raise

    async def unsubscribe(self, job_id: str) -> None:
        channel = keys.stream_channel(job_id).encode()
        self._inboxes.pop(channel, None)
        self._confirmed.pop(channel, None)
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        """Route messages for as long as the process lives; sleep while nothing is subscribed."""
        while True:
            if not self._pubsub.subscribed:
                self._has_channels.clear()
                await self._has_channels.wait()
            try:
                async for message in self._pubsub.listen():
                    self._route(message)
            except (OSError, redis.RedisError):
                # Redis went away: redis-py reconnects and re-subscribes on the next read; events
                # published meanwhile are replayed from the log by the readers (client._events).
                await asyncio.sleep(RECONNECT_DELAY_S)

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        if message["type"] == "message":
            inbox = self._inboxes.get(channel)
            if inbox is not None:
                inbox.put_nowait(message["data"])
        elif message["type"] == "subscribe":
            confirmed = self._confirmed.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
