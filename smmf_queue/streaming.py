"""A job's event stream: how workers write it and how readers put it back together.

Every event goes out in one Redis round trip that appends it to the job's event log (a capped
Redis Stream whose entry ids are `<seq>-0`, with a TTL) and publishes it on the job's pub/sub
channel and, prefixed with the job id, on its producer's reply channel (see hub.py). Pub/sub
gives readers the event at once; the log lets a late or reconnecting reader replay from any
`seq`. Token bursts are coalesced (`drain`): while one event is on its way, the tokens that
arrive meanwhile are merged into the next one, so round trips per second are bounded by Redis
latency, not by the model's tokens per second.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis

from . import keys
from .jobs import ChatDelta, ChatResult, EmbeddingResult, StreamEvent, Usage, unpack_vectors

#: Lua that appends one event to the log, refreshes its TTL and publishes it; shared with the
#: fenced terminal write in records.py. KEYS[1] log; ARGV: event json, seq, maxlen, ttl, channel,
#: reply channel ('' for none), job id.
APPEND_LUA_BODY = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[2] .. '-0', 'e', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[1])
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. ARGV[1]) end
"""
#: the same, answering whether the job was cancelled (KEYS[2]): the check costs no round trip.
_APPEND_LUA = APPEND_LUA_BODY + "return redis.call('EXISTS', KEYS[2])"


#: XRANGE/XREVRANGE entries as our clients get them (they never decode responses).
LogEntries = list[tuple[bytes, dict[bytes, bytes]]]


class EventWriter:
    """Writes one attempt's events for one job, numbering them from `last_seq + 1`."""

    def __init__(self, client: redis.Redis, job_id: str, attempt: int, *, worker_id: str,
                 ttl_s: int, max_events: int, last_seq: int = 0, reply_to: str | None = None,
                 before_first_write: Callable[[], None] | None = None):
        self.client = client
        self.job_id = job_id
        self.reply_to = reply_to or ""
        self.attempt = attempt
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self.max_events = max_events
        self.seq = last_seq
        #: called once, before anything is written: it may raise to stop the job unpublished.
        self._before_first_write = before_first_write
        self._append = client.register_script(_APPEND_LUA)

    def next_event(self, type_: str, **fields: Any) -> StreamEvent:
        """Build the next event in order (not yet written)."""
        self.seq += 1
        return StreamEvent(seq=self.seq, attempt=self.attempt, type=type_, **fields)  # type: ignore[arg-type]

    def write(self, event: StreamEvent) -> bool:
        """Append and publish one event; True when the caller has cancelled the job."""
        return bool(self._append(keys=[keys.event_log(self.job_id), keys.cancel_flag(self.job_id)],
                                 args=self.log_args(event)))

    def log_args(self, event: StreamEvent) -> list[Any]:
        """ARGV for APPEND_LUA_BODY; every write, terminal ones too, asks for them first."""
        check, self._before_first_write = self._before_first_write, None
        if check is not None:
            check()
        return [event.encode(), event.seq, self.max_events, self.ttl_s,
                keys.stream_channel(self.job_id), self.reply_to, self.job_id]

    def delta(self, text: str, reasoning: str = "") -> bool:
        """Write a delta; True when the caller has cancelled the job."""
        return self.write(self.next_event("delta", text=text, reasoning=reasoning))

    def restart(self) -> None:
        """Tell readers that a new attempt begins and the text so far is void."""
        self.write(self.next_event("restart", worker=self.worker_id))


def last_seq(client: redis.Redis, job_id: str) -> int:
    """The seq of the newest logged event of a job (0 when none), so a new attempt continues it."""
    newest = cast(LogEntries, client.xrevrange(keys.event_log(job_id), count=1))
    return int(newest[0][0].split(b"-")[0]) if newest else 0


def decode_log(entries: LogEntries) -> list[StreamEvent]:
    """Events from XRANGE entries of an event log."""
    return [StreamEvent.model_validate_json(fields[b"e"]) for _, fields in entries]


def drain(ready: queue.Queue[Any], end: object) -> Iterator[list[Any]]:
    """Batches from `ready` until `end`: block for one item, then take all that already waits.

    Providers coalesce at the source with it: an engine that generates in its own thread puts
    tokens on a queue, and the job thread publishes one event per wake-up, not one per token.
    """
    while True:
        batch = [ready.get()]
        while batch[-1] is not end:
            try:
                batch.append(ready.get_nowait())
            except queue.Empty:
                break
        if batch[-1] is end:
            if len(batch) > 1:
                yield batch[:-1]
            return
        yield batch


class EventAssembler:
    """Puts a job's events back together, in order, whatever mix of live and replayed copies.

    Pure: it does no I/O. `want` is the next seq it needs; the reader drops lower ones and fills
    a gap from the log before feeding a higher one. Events from an attempt older than the newest
    `restart` are ignored (a worker that lost its lease may still be writing).
    """

    def __init__(self, job_id: str, model: str):
        self.job_id = job_id
        self.model = model
        self.want = 1
        self.attempt = 0
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.terminal: StreamEvent | None = None

    def apply(self, event: StreamEvent) -> ChatDelta | None:
        """Take the event numbered `want`; return what a streaming caller should see, if anything."""
        if event.seq != self.want:
            raise ValueError(f"event {event.seq} out of order (want {self.want})")
        self.want += 1
        if event.attempt < self.attempt:
            return None
        if event.type == "restart":
            self.attempt = event.attempt
            self.text, self.reasoning = [], []
            return ChatDelta(restart=True)
        self.attempt = max(self.attempt, event.attempt)
        if event.terminal:
            self.terminal = event
            return None
        self.text.append(event.text)
        self.reasoning.append(event.reasoning)
        return ChatDelta(text=event.text, reasoning=event.reasoning)

    def chat_result(self) -> ChatResult:
        end = self._end()
        return ChatResult(job_id=self.job_id, model=self.model, text="".join(self.text),
                          reasoning="".join(self.reasoning), finish_reason=end.finish_reason,
                          usage=end.usage or Usage(), worker=end.worker)

    def embedding_result(self) -> EmbeddingResult:
        end = self._end()
        vectors = unpack_vectors(end.vectors_b64 or "", end.dims or 0)
        return EmbeddingResult(job_id=self.job_id, model=self.model, vectors=vectors,
                               usage=end.usage or Usage(), worker=end.worker)

    def _end(self) -> StreamEvent:
        if self.terminal is None or self.terminal.type != "end":
            raise ValueError("the job has not ended successfully")
        return self.terminal
