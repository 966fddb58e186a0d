"""One pub/sub connection per process, shared by every job stream the process reads.

A gateway holding hundreds of streams must not open a Redis connection, nor send a SUBSCRIBE,
per request. Every request names the hub's reply channel (`reply_to`), and the worker publishes
each event of the job there, prefixed with the job id. The hub subscribes to that channel once
(`start`), before its first job is enqueued, so a job costs no pub/sub command at all, and a
reader task routes each message to its job's queue (`open`). Someone else's job is read from
its event log instead (client.AsyncClient.replay).

Should an event ever slip by (a reconnect), the reader fills the gap from the job's event log.

`ThreadHub` is its twin for the blocking `Client`: there, the thread that waits for an event
reads the socket itself, instead of waiting for an event loop thread to hand it over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import uuid
from typing import Any

import redis
import redis.asyncio

from . import keys

#: seconds to wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT_S = 10.0
#: seconds between attempts to read again after the pub/sub connection broke.
RECONNECT_DELAY_S = 0.2
#: seconds without a message after which a hub pings its connection (`Silence`).
PING_AFTER_S = 1.0


class Silence:
    """When a hub's pub/sub connection should be pinged, and when dropped for dead.

    While nothing comes, a hub pings its connection once per PING_AFTER_S; once not even an
    answer came for `silent_after_s` (queue.socket_timeout_s), it drops the connection: a Redis
    gone silent with the connection open (a frozen or lost host) would hold the subscription
    for ever, and behind Sentinel keep it on a master that was replaced. redis-py then connects
    afresh (to the current master) and subscribes again; readers fill what they missed from
    the jobs' logs."""

    def __init__(self, silent_after_s: float):
        self.silent_after_s = silent_after_s
        self.heard_at = self.pinged_at = time.monotonic()

    def heard(self) -> None:
        """A message came: an event, a confirmation or a ping's answer."""
        self.heard_at = time.monotonic()

    def next_step(self) -> str | None:
        """"drop", "ping" or None (nothing to do yet)."""
        now = time.monotonic()
        if now - self.heard_at > self.silent_after_s:
            self.heard_at = now  # the next connection's time starts now
            return "drop"
        if now - max(self.heard_at, self.pinged_at) >= PING_AFTER_S:
            self.pinged_at = now
            return "ping"
        return None


class StreamHub:
    """Multiplexes the events of many jobs over one pub/sub connection."""

    def __init__(self, client: redis.asyncio.Redis, silent_after_s: float = 5.0):
        self._pubsub = client.pubsub()
        self._silence = Silence(silent_after_s)
        self._watcher: asyncio.Task[None] | None = None
        #: this hub's reply channel: workers publish `<job id> <event>` on it.
        self.reply_channel = keys.reply_channel(uuid.uuid4().hex)
        self._reply_key = self.reply_channel.encode()
        self._inboxes: dict[str, asyncio.Queue[bytes]] = {}
        #: Redis's confirmation of the reply channel's subscription, while it is awaited.
        self._confirmation: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._has_channels = asyncio.Event()

    @property
    def started(self) -> bool:
        """Whether Redis has confirmed the reply channel (see `start`)."""
        return self._reply_key in self._pubsub.channels and self._confirmation is None

    async def start(self) -> None:
        """Subscribe to the reply channel and wait for Redis to confirm it; at once after that."""
        if self.started:
            return
        confirmation = self._confirmation
        if confirmation is None:
            confirmation = self._confirmation = asyncio.get_running_loop().create_future()
            try:
                await self._pubsub.subscribe(self._reply_key)
            except BaseException:
                # Not sent (Redis down): the next call sends it again. A future left waiting
                # here would make every later call wait for a confirmation that cannot come.
                self._confirmation = None
                raise
            self._has_channels.set()
            if self._reader is None or self._reader.done():
                self._silence.heard()
                self._reader = asyncio.create_task(self._read(), name="smmf-stream-hub")
                self._watcher = asyncio.create_task(self._watch(), name="smmf-stream-hub-watch")
        try:
            await asyncio.wait_for(asyncio.shield(confirmation), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"Redis did not confirm the subscription within "
                               f"{SUBSCRIBE_TIMEOUT_S:.0f} s") from None
        finally:
            if confirmation.done() and self._confirmation is confirmation:
                self._confirmation = None

    def open(self, job_id: str) -> asyncio.Queue[bytes]:
        """A queue for the events of one of our own jobs (their requests name `reply_channel`).

        Sends nothing to Redis, and may be called from any thread; `start` must have returned."""
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._inboxes[job_id] = inbox
        return inbox

    def close(self, job_id: str) -> None:
        """Stop routing the events of one of our own jobs."""
        self._inboxes.pop(job_id, None)

    async def _read(self) -> None:
        """Route messages for as long as the process lives; sleep while nothing is subscribed."""
        while True:
            if not self._pubsub.subscribed:
                self._has_channels.clear()
                await self._has_channels.wait()
            try:
                async for message in self._pubsub.listen():
                    self._silence.heard()
                    self._route(message)
            except (OSError, redis.RedisError):
                # Redis went away: redis-py reconnects and re-subscribes on the next read; events
                # published meanwhile are replayed from the log by the readers (streaming.JobReader).
                await asyncio.sleep(RECONNECT_DELAY_S)

    async def _watch(self) -> None:
        """Ping the connection while nothing comes, or drop it for dead (`Silence`)."""
        while True:
            await asyncio.sleep(PING_AFTER_S)
            if not self._pubsub.subscribed:
                continue
            step, connection = self._silence.next_step(), self._pubsub.connection
            with contextlib.suppress(OSError, redis.RedisError):
                if step == "drop" and connection is not None:
                    await connection.disconnect()
                elif step == "ping":
                    await self._pubsub.ping()

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        if message["type"] == "message" and channel == self._reply_key:
            job_id, data = _split_reply(message["data"])
            inbox = self._inboxes.get(job_id)
            if inbox is not None:
                inbox.put_nowait(data)
        elif message["type"] == "subscribe" and channel == self._reply_key:
            if self._confirmation is not None and not self._confirmation.done():
                self._confirmation.set_result(None)

    async def aclose(self) -> None:
        for task in (self._watcher, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


class ThreadHub:
    """StreamHub for threads: whichever thread waits for an event reads the socket itself.

    Reading events on the blocking Client's event loop thread would cost every event one more
    wake-up, from that thread to the caller's (a later first token: docs/performance-log.md).
    Instead a waiting thread that finds nobody reading takes the socket,
    reads one message, routes it to its job's inbox and wakes the other waiters; one of them
    reads next if its own inbox is still empty.
    """

    def __init__(self, client: redis.Redis, silent_after_s: float = 5.0):
        self._pubsub = client.pubsub()
        self._silence = Silence(silent_after_s)
        #: this hub's reply channel: workers publish `<job id> <event>` on it.
        self.reply_channel = keys.reply_channel(uuid.uuid4().hex)
        self._inboxes: dict[str, collections.deque[bytes]] = {}
        self._changed = threading.Condition()
        self._reading = False
        self._started = False

    def start(self) -> None:
        """Subscribe to the reply channel and wait for Redis to confirm it; at once after that."""
        with self._changed:
            if self._started:
                return
            self._pubsub.subscribe(self.reply_channel)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("Redis did not confirm the reply channel's subscription")
                message = self._pubsub.get_message(timeout=remaining)
                if message is not None and message["type"] == "subscribe":
                    break
            self._started = True

    def open(self, job_id: str) -> None:
        """Route the events of one of our own jobs (their requests name `reply_channel`)."""
        with self._changed:
            self._inboxes[job_id] = collections.deque()

    def close(self, job_id: str) -> None:
        with self._changed:
            self._inboxes.pop(job_id, None)

    def get(self, job_id: str, timeout: float) -> bytes | None:
        """The job's next event, or None when none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            inbox = self._inboxes[job_id]
            while not inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if self._reading:
                    self._changed.wait(remaining)
                else:
                    self._read_one(remaining)
            return inbox.popleft()

    def _read_one(self, timeout: float) -> None:
        """Read one message without holding the lock, route it, wake the other waiters."""
        message = None
        self._reading = True
        self._changed.release()
        try:
            message = self._pubsub.get_message(timeout=timeout)
            self._keep_alive(message is not None)
        except (OSError, redis.RedisError):
            # Redis went away: redis-py reconnects and re-subscribes on the next read; events
            # published meanwhile are replayed from the log by the readers (client.Client).
            time.sleep(min(timeout, RECONNECT_DELAY_S))
        finally:
            self._changed.acquire()
            self._reading = False
        if message is not None and message["type"] == "message":
            job_id, data = _split_reply(message["data"])
            inbox = self._inboxes.get(job_id)
            if inbox is not None:
                inbox.append(data)
        self._changed.notify_all()

    def _keep_alive(self, heard: bool) -> None:
        """StreamHub._watch for the reading thread (`Silence`)."""
        if heard:
            self._silence.heard()
            return
        step, connection = self._silence.next_step(), self._pubsub.connection
        if step == "drop" and connection is not None:
            connection.disconnect()
        elif step == "ping":
            self._pubsub.ping()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._pubsub.close()


def _split_reply(data: bytes) -> tuple[str, bytes]:
    """(job id, event) of a message on a reply channel."""
    job_id, _, event = data.partition(b" ")
    return job_id.decode(), event
