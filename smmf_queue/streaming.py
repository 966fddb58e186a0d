"""A job's event stream as readers see it, and how they put it back together.

A worker writes every event in one Redis round trip (attempt.py, lua.APPEND) that appends it to
the job's event log (a capped Redis Stream whose entry ids are `<seq>-0`, with a TTL) and
publishes it, prefixed with the job id, on its producer's reply channel (see stream_hub.py).
Pub/sub gives the producer the event at once; anyone else, and a late or reconnecting reader,
tails the log from any `seq`. Token bursts are coalesced at the source
(providers.base.drain): while one event is on its way, the tokens that arrive meanwhile are
merged into the next one, so round trips per second are bounded by Redis latency, not by the
model's tokens per second.
"""

from __future__ import annotations

import time
from typing import Any

from .config import ModelKind
from .errors import JobFailed, JobTimeout
from .jobs import (
    ChatDelta,
    ChatResult,
    EmbeddingResult,
    RerankItem,
    RerankResult,
    StreamEvent,
    ToolCallDelta,
    Usage,
    unpack_vectors,
)
from .tool_calls import assemble

#: the error type of a job whose message waited past its queue deadline: its caller gets a
#: JobTimeout, not a JobFailed.
DEADLINE_EXCEEDED = "DeadlineExceeded"
#: seconds without an event after which a reader checks the job's log (a lost pub/sub message).
QUIET_CHECK_S = 2.0
#: seqs to read from a job's log, first to last; last None: to the end of the log.
LogRange = tuple[int, int | None]

#: XRANGE/XREVRANGE entries as our clients get them (they never decode responses).
LogEntries = list[tuple[bytes, dict[bytes, bytes]]]


def decode_log(entries: LogEntries) -> list[StreamEvent]:
    """Events from XRANGE entries of an event log."""
    return [StreamEvent.model_validate_json(fields[b"e"]) for _, fields in entries]


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
        self.tool_calls: list[ToolCallDelta] = []
        self.logprobs: list[dict[str, Any]] = []
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
            self.text, self.reasoning, self.tool_calls, self.logprobs = [], [], [], []
            return ChatDelta(restart=True, seq=event.seq)
        self.attempt = max(self.attempt, event.attempt)
        if event.terminal:
            self.terminal = event
            return None
        self.text.append(event.text)
        self.reasoning.append(event.reasoning)
        self.tool_calls.extend(event.tool_calls or ())
        self.logprobs.extend(event.logprobs or ())
        return ChatDelta(text=event.text, reasoning=event.reasoning, tool_calls=event.tool_calls or [],
                         logprobs=event.logprobs or [], seq=event.seq)

    def chat_result(self) -> ChatResult:
        end = self._end()
        return ChatResult(job_id=self.job_id, model=self.model, text="".join(self.text),
                          reasoning="".join(self.reasoning), tool_calls=assemble(self.tool_calls),
                          logprobs=self.logprobs,
                          finish_reason=end.finish_reason, usage=end.usage or Usage(),
                          worker=end.worker)

    def _end(self) -> StreamEvent:
        if self.terminal is None or self.terminal.type != "end":
            raise ValueError("the job has not ended successfully")
        return self.terminal


def embedding_result(job_id: str, model: str, end: StreamEvent) -> EmbeddingResult:
    """An embedding job's result from its `end` event (the vectors cross the wire packed)."""
    return EmbeddingResult(job_id=job_id, model=model,
                           vectors=unpack_vectors(end.vectors_b64 or "", end.dims or 0),
                           usage=end.usage or Usage(), worker=end.worker)


def rerank_result(job_id: str, model: str, end: StreamEvent, documents: list[str],
                  top_n: int | None, return_documents: bool) -> RerankResult:
    """A rerank job's result from its `end` event: documents by falling score, the `top_n`
    best (ties keep input order)."""
    scores = end.scores or []
    order = sorted(range(len(scores)), key=lambda index: -scores[index])[:top_n]
    return RerankResult(job_id=job_id, model=model, usage=end.usage or Usage(), worker=end.worker,
                        results=[RerankItem(index=index, relevance_score=scores[index],
                                            document=documents[index] if return_documents else None)
                                 for index in order])


class JobReader:
    """Follows one job's stream for a client: which events to apply, which to read from the log,
    when to give up. Pure (it does no I/O), so `Client` and `AsyncClient` follow a job the same
    way and differ only in how they wait:

        reader = JobReader(job_id, model, timeout_s)
        while not reader.done:
            gap = reader.take(<the next live event within reader.wait_s(), or None>)
            for delta in reader.apply(<the logged events in gap> if gap else []):
                ...                                  # what the caller sees
        reader.ending("llm")                         # JobFailed, or the last delta

    A live event ahead of the one wanted means pub/sub lost some (a reconnect): they are read
    from the log first. Nothing live for QUIET_CHECK_S means a lost message or a slow job: the
    log is asked. Only deltas from `from_seq` on are returned (a replay from a given point).
    """

    def __init__(self, job_id: str, model: str, timeout_s: float, *, from_seq: int = 1):
        self.assembler = EventAssembler(job_id, model)
        self.from_seq = from_seq
        #: seconds the caller gives the job (also how long its cancel mark lives if it leaves).
        self.timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._live: StreamEvent | None = None

    @property
    def job_id(self) -> str:
        return self.assembler.job_id

    @property
    def done(self) -> bool:
        """Whether the job's terminal event was applied."""
        return self.assembler.terminal is not None

    def wait_s(self) -> float:
        """How long to wait for the next live event; JobTimeout once the job's time is up."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout(f"no result within the timeout for job {self.job_id}",
                             model=self.assembler.model, job_id=self.job_id)
        return min(remaining, QUIET_CHECK_S)

    def take(self, raw: bytes | None) -> LogRange | None:
        """Take a live event (None: none came within `wait_s`); the log range to read first."""
        want = self.assembler.want
        if raw is None:
            self._live = None
            return want, None
        self._live = StreamEvent.model_validate_json(raw)
        return (want, self._live.seq - 1) if self._live.seq > want else None

    def apply(self, logged: list[StreamEvent]) -> list[ChatDelta]:
        """Apply the events read from the log, then the live one taken (if it is next); return
        what the caller should see. Nothing is applied after the terminal event."""
        live, self._live = self._live, None
        deltas = []
        for event in logged:
            if self.done:
                break
            deltas.extend(self._apply(event))
        if live is not None and not self.done and live.seq == self.assembler.want:
            deltas.extend(self._apply(live))
        return deltas

    def _apply(self, event: StreamEvent) -> list[ChatDelta]:
        delta = self.assembler.apply(event)
        return [delta] if delta is not None and event.seq >= self.from_seq else []

    def ending(self, kind: ModelKind) -> list[ChatDelta]:
        """After the terminal event: JobFailed for an error; a chat's last delta says why it ended."""
        terminal = self.assembler.terminal
        if terminal is not None and terminal.error_type == DEADLINE_EXCEEDED:
            raise JobTimeout(terminal.error_message or "the job's deadline passed",
                             model=self.assembler.model, job_id=self.job_id)
        if terminal is not None and terminal.type == "error":
            raise JobFailed(terminal.error_message or "job failed",
                            error_type=terminal.error_type or "JobFailed", model=self.assembler.model,
                            job_id=self.job_id)
        if terminal is not None and kind == "llm":
            return [ChatDelta(finish_reason=terminal.finish_reason, usage=terminal.usage,
                              seq=terminal.seq)]
        return []
