"""Batch embedding: a corpus of any size through a model's queue, in chunks, in input order.

Texts are read lazily (a generator of millions is never held in memory) and cut into chunks by
a token budget and a count. Each chunk is one job on the model's batch lane, so interactive jobs
overtake it; `window` chunks are in flight at once. A chunk's job id is `<run_id>-<index>`: a
resumed run that sends a chunk again finds its result in the job's event log, or the worker
sees the job finished and does not run it twice.

A chunk that fails is split in half and each half tried again, down to single texts; a text
that cannot be embedded is reported in `ChunkResult.failures` (its row is NaN), never dropped.
Timeouts and an unreachable broker are retried as they are.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import tenacity

from ..errors import BrokerUnavailable, JobFailed, JobTimeout, QueueFull
from ..jobs import StreamEvent, new_job_id

if TYPE_CHECKING:
    from ..client import AsyncClient

#: where the model's tokenizer is not at hand (tokens.py), a chunk's budget is checked against
#: an estimate: about 4 characters per token for English with BPE/WordPiece tokenizers, and one
#: token per extra UTF-8 byte of every other character, a bound that holds for CJK text (one or
#: more tokens per character, 3 bytes each) where 4 characters a token undercounted it 3-4x.
CHARS_PER_TOKEN = 4
#: errors that no split or retry can fix: the whole run stops with them.
FATAL_ERRORS = frozenset({"AuthenticationError", "PermissionDeniedError", "NotFoundError",
                          "WrongWorker", "InvalidRequest", "Cancelled"})
#: tries of a chunk that timed out or could not be sent, and the first backoff between them, s.
TRANSIENT_TRIES = 4
TRANSIENT_BACKOFF_S = 0.5


#: a text's token count, for a chunk's budget.
TokenCounter = Callable[[str], int]


def estimate_tokens(text: str) -> int:
    extra_bytes = len(text.encode("utf-8", "surrogatepass")) - len(text)  # 0 for ASCII
    return len(text) // CHARS_PER_TOKEN + extra_bytes + 1


@dataclass
class Chunk:
    index: int
    #: position of its first text in the input
    start: int
    texts: list[str]


@dataclass
class ChunkResult:
    """The vectors of one chunk; rows of texts that failed are NaN and listed in `failures`."""

    index: int
    start: int
    vectors: np.ndarray  # float32, one row per text of the chunk
    #: offset in the chunk → (error type, message)
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)
    tokens: int = 0

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


def plan_chunks(texts: Iterable[str], *, max_tokens: int, max_texts: int,
                count_tokens: TokenCounter = estimate_tokens) -> Iterator[Chunk]:
    """Cut `texts` into chunks of at most `max_texts` texts and `max_tokens` tokens as
    `count_tokens` counts them (a text over the budget alone makes a chunk of its own)."""
    index = start = 0
    chunk: list[str] = []
    budget = 0
    for text in texts:
        cost = count_tokens(text)
        if chunk and (len(chunk) >= max_texts or budget + cost > max_tokens):
            yield Chunk(index, start, chunk)
            index, start, chunk, budget = index + 1, start + len(chunk), [], 0
        chunk.append(text)
        budget += cost
    if chunk:
        yield Chunk(index, start, chunk)


async def embed_chunks(client: AsyncClient, model: str, texts: Iterable[str], *,
                       normalize: bool | None = None, max_tokens: int = 8192, max_texts: int = 256,
                       window: int = 8, run_id: str | None = None,
                       skip: Callable[[int], bool] | None = None,
                       count_tokens: TokenCounter | None = None) -> AsyncIterator[ChunkResult]:
    """Chunks of `texts` embedded by `model`, yielded in input order.

    `run_id` names the run's jobs (give the same one to resume); `skip(index)` leaves out chunks
    that a resumed run has committed already. At most `window` chunks are in flight.
    `count_tokens` counts a text's tokens for the budget (`tokens.model_token_counter` gives the
    model's own tokenizer); by default they are estimated.
    """
    client.config.model(model, "embedding")
    run = _ChunkRunner(client, model, normalize, run_id or new_job_id())
    in_flight: deque[asyncio.Task[ChunkResult]] = deque()
    try:
        for chunk in plan_chunks(texts, max_tokens=max_tokens, max_texts=max_texts,
                                 count_tokens=count_tokens or estimate_tokens):
            if skip is not None and skip(chunk.index):
                continue
            in_flight.append(asyncio.create_task(run.chunk(chunk)))
            while len(in_flight) >= max(1, window):
                yield await in_flight.popleft()
        while in_flight:
            yield await in_flight.popleft()
    finally:
        for task in in_flight:
            task.cancel()


class _ChunkRunner:
    def __init__(self, client: AsyncClient, model: str, normalize: bool | None, run_id: str):
        self.client = client
        self.model = model
        self.normalize = normalize
        self.run_id = run_id

    async def chunk(self, chunk: Chunk) -> ChunkResult:
        vectors, failures, tokens = await self._embed(chunk.texts, f"{self.run_id}-{chunk.index}")
        return ChunkResult(chunk.index, chunk.start, vectors, failures, tokens)

    async def _embed(self, texts: list[str],
                     job_id: str) -> tuple[np.ndarray, dict[int, tuple[str, str]], int]:
        try:
            end = await self._end_event(texts, job_id)
        except JobFailed as exc:
            if exc.error_type in FATAL_ERRORS:
                raise
            if len(texts) == 1:
                return np.full((1, 0), np.nan, dtype=np.float32), {0: (exc.error_type, exc.message)}, 0
            middle = len(texts) // 2  # too big for the worker, or a bad text inside: split
            left = await self._embed(texts[:middle], f"{job_id}.0")
            right = await self._embed(texts[middle:], f"{job_id}.1")
            return _join(left, right, middle)
        rows = np.frombuffer(base64.b64decode(end.vectors_b64 or ""), dtype="<f4")
        return rows.reshape(len(texts), end.dims or 0), {}, end.usage.prompt_tokens if end.usage else 0

    async def _end_event(self, texts: list[str], job_id: str) -> StreamEvent:
        """The job's `end` event: from its log if a previous run finished it, else by running it.

        A timeout or an unreachable broker is tried again, with the API proxies' policy
        (tenacity: exponential backoff with full jitter, so that many chunks of a run that all
        met the same outage do not come back in step), each try under a job id of its own.
        """
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(TRANSIENT_TRIES),
            wait=tenacity.wait_random_exponential(multiplier=TRANSIENT_BACKOFF_S, max=30),
            retry=tenacity.retry_if_exception_type((JobTimeout, BrokerUnavailable)), reraise=True)
        async for attempt in retrying:
            with attempt:
                tried = attempt.retry_state.attempt_number - 1
                retry_id = job_id if tried == 0 else f"{job_id}~{tried}"
                finished = await self._finished(retry_id)
                if finished is not None:
                    return finished
                return await self._when_queue_has_room(texts, retry_id)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _when_queue_has_room(self, texts: list[str], job_id: str) -> StreamEvent:
        """Run the chunk's job, waiting while the model's queue is full (max_queue_depth): a
        batch run is patient where an interactive caller gets QueueFull at once."""
        while True:
            try:
                return await self.client.embedding_job(
                    self.model, texts, normalize=self.normalize, fail_fast=False, job_id=job_id,
                    lane="batch")
            except QueueFull as full:
                await asyncio.sleep(full.retry_after_s)

    async def _finished(self, job_id: str) -> StreamEvent | None:
        events = await self.client.logged_events(job_id)
        if events and events[-1].type == "end":
            return events[-1]
        if events and events[-1].type == "error":
            raise JobFailed(events[-1].error_message or "job failed",
                            error_type=events[-1].error_type or "JobFailed", model=self.model,
                            job_id=job_id)
        return None


def _join(left: tuple[np.ndarray, dict[int, tuple[str, str]], int],
          right: tuple[np.ndarray, dict[int, tuple[str, str]], int],
          offset: int) -> tuple[np.ndarray, dict[int, tuple[str, str]], int]:
    """Two halves' results as one; failed rows become NaN rows of the other half's width."""
    dims = max(left[0].shape[1], right[0].shape[1])
    halves = [part if part.shape[1] == dims else np.full((part.shape[0], dims), np.nan, np.float32)
              for part in (left[0], right[0])]
    failures = {**left[1], **{offset + i: failure for i, failure in right[1].items()}}
    return np.vstack(halves), failures, left[2] + right[2]
