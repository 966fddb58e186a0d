"""The one interface every provider implements, and the boundary that maps its errors.

A worker builds a provider, checks it can run here (`check_hardware`), loads it once
(`load`), then calls `stream_chat`, `embed` or `rerank` from up to `model.slots` threads at a
time.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from ..config import ModelConfig
from ..errors import JobFailed, ProviderUnavailable, SmmfError
from ..jobs import ChatRequest, ToolCallDelta, Usage
from ..tool_calls import merge


@dataclass
class ChatChunk:
    """A piece of generated output; the last chunk of a reply carries finish_reason and usage."""

    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    #: fragments of tool calls, id and name once per call (tool_calls.FragmentCleaner).
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    #: OpenAI's `logprobs.content` entries of its tokens, when asked.
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def output(self) -> bool:
        """Whether it carries anything a reader sees before the end."""
        return bool(self.text or self.reasoning or self.tool_calls or self.logprobs)


@dataclass
class Embeddings:
    #: one row per text: lists of floats, or a 2-D numpy array (packed without copying to lists)
    vectors: list[list[float]] | np.ndarray
    usage: Usage = field(default_factory=Usage)


@dataclass
class Reranked:
    #: one relevance score per document, in input order (higher: more relevant).
    scores: list[float]
    usage: Usage = field(default_factory=Usage)


class Provider(abc.ABC):
    """A model served by one engine or API; one instance per model per worker process."""

    def __init__(self, model: ModelConfig):
        self.model = model

    def check_hardware(self) -> None:
        """Raise ProviderUnavailable when this host cannot serve the model (before consuming)."""

    def refuse_if_missing(self, missing: list[str]) -> None:
        """Raise ProviderUnavailable naming everything this host lacks, if anything."""
        if missing:
            raise ProviderUnavailable(f"model '{self.model.name}' ({self.model.provider}) cannot run "
                                      "here: " + "; ".join(missing), model=self.model.name)

    def hardware(self) -> str:
        """A short description of what this provider runs on, for the registry."""
        return "cpu"

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights or open clients; called once per worker process."""

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        """Yield the reply as it is generated; each chunk holds all the text ready at that moment
        (see `drain`), so a fast engine does not cost a Redis round trip per token."""
        raise JobFailed(f"model '{self.model.name}' does not chat", model=self.model.name)

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        """Vectors for `texts`, in input order."""
        raise JobFailed(f"model '{self.model.name}' does not embed", model=self.model.name)

    def embed_shortened(self, texts: list[str], normalize: bool | None, dimensions: int) -> Embeddings:
        """Vectors of `dimensions` numbers (OpenAI's `dimensions`), for providers that declare
        it (ProviderSpec.supports); the SDK refuses it for the others."""
        raise JobFailed(f"model '{self.model.name}' cannot shorten its vectors", model=self.model.name,
                        error_type="InvalidRequest")

    def rerank(self, query: str, documents: list[str]) -> Reranked:
        """A relevance score for each document, in input order."""
        raise JobFailed(f"model '{self.model.name}' does not rerank", model=self.model.name)

    def wants_unit_vectors(self, requested: bool | None, default: bool) -> bool:
        """The request's `normalize`, else the model entry's, else the provider's default."""
        if requested is not None:
            return requested
        return bool(self.model.options.get("normalize", default))


def unit_vectors(vectors: list[list[float]]) -> list[list[float]]:
    """Each vector scaled to length 1 (a zero vector stays zero)."""
    scaled = []
    for vector in vectors:
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        scaled.append([x / norm for x in vector])
    return scaled


@contextlib.contextmanager
def provider_errors(model: ModelConfig, job_id: str) -> Iterator[None]:
    """Map any foreign error from a provider call to JobFailed, with no secret in its message.
    A Redis error is the job's own writes failing, not the provider: it stays itself (the
    worker hands the job's message back: worker.WorkerRuntime.execute)."""
    try:
        yield
    except (SmmfError, redis.RedisError):
        raise
    except Exception as exc:  # the boundary: whatever an engine or SDK raises
        message = f"{type(exc).__name__}: {exc}"
        if model.api_key is not None:
            message = message.replace(model.api_key.get_secret_value(), "***")
        raise JobFailed(message[:2000], error_type=type(exc).__name__, model=model.name,
                        job_id=job_id) from exc


class StopFilter:
    """Cut streamed text at the first stop string, holding back text that might begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[:min(hits)]
        keep = max((_overlap(buffer, s) for s in self.stops), default=0)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string came)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


@dataclass
class _Raised:
    error: BaseException


_SOURCE_DONE = object()


def read_ahead(chunks: Iterator[ChatChunk], name: str) -> Iterator[ChatChunk]:
    """The chunks of a blocking source (an HTTP stream, an engine's iterator), merged per wake-up.

    The job thread reads the source itself until the first text: that piece goes out without a
    hop between threads. Then a helper thread pulls the rest while the job thread writes
    events, so text that arrives during one Redis round trip goes out in the next event (see
    `drain`) instead of one event per token. The final chunk (finish_reason, usage) carries
    the text read with it. Closing this generator closes `chunks` (the helper does so at its next
    item), which ends an HTTP stream or stops an engine; once the final chunk is passed on, the
    helper lets the source run out instead (an HTTP body read to its end keeps its connection).
    The helper does not `hand_over` after each chunk: the first text has gone out already and
    the rest is merged anyway, while with many streams in one worker every yield passed the
    GIL around for nothing (single streams no slower without it, docs/performance-log.md).
    """
    try:
        for chunk in chunks:
            yield chunk
            if chunk.output or chunk.finish_reason is not None:
                break
        else:
            return
    except BaseException:
        close_chunks(chunks)
        raise
    ready: queue.Queue[object] = queue.Queue()
    closed = threading.Event()

    def pump() -> None:
        try:
            for chunk in chunks:
                ready.put(chunk)
                if closed.is_set() and chunk.finish_reason is None:
                    break  # the caller left early; after the final chunk, the source runs out
        except BaseException as exc:  # handed to the job thread, which raises it
            ready.put(_Raised(exc))
        finally:
            close_chunks(chunks)
            ready.put(_SOURCE_DONE)

    threading.Thread(target=pump, name=f"read-ahead-{name}", daemon=True).start()
    try:
        for batch in drain(ready, _SOURCE_DONE):
            yield from _merge(batch)
    finally:
        closed.set()


def hand_over() -> None:
    """Let the thread that was just given work run now, on this core.

    Linux wakes a thread on its waker's core; while the waker keeps computing (the next token),
    the woken job thread waited there before it could publish. Yielding the CPU (and the GIL)
    lets it run at once (the measured gap: docs/performance-log.md)."""
    if hasattr(os, "sched_yield"):
        os.sched_yield()


def close_chunks(chunks: Iterator[ChatChunk]) -> None:
    """Close a provider's chunk iterator, if it can be closed (ends an HTTP stream, stops an
    engine); an error while closing is not the job's error."""
    close = getattr(chunks, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _merge(batch: list[object]) -> Iterator[ChatChunk]:
    """One chunk for the output of a batch. Output that came before an error goes first; output
    that came with the final chunk goes in it, so that the worker writes the last text and the
    end in one round trip (WorkerRuntime._chat)."""
    pending: list[ChatChunk] = []
    for item in batch:
        if isinstance(item, ChatChunk) and item.finish_reason is None:
            if item.output:
                pending.append(item)
            continue
        if isinstance(item, _Raised):
            if pending:
                yield _joined(pending)
            raise item.error
        assert isinstance(item, ChatChunk)
        final = _joined(pending) if pending else ChatChunk()
        final.finish_reason, final.usage = item.finish_reason, item.usage
        yield final
        pending = []
    if pending:
        yield _joined(pending)


def _joined(chunks: list[ChatChunk]) -> ChatChunk:
    return ChatChunk(text="".join(c.text for c in chunks),
                     reasoning="".join(c.reasoning for c in chunks),
                     tool_calls=merge(f for c in chunks for f in c.tool_calls),
                     logprobs=[entry for c in chunks for entry in c.logprobs])


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
