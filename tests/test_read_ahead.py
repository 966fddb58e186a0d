"""read_ahead: the helper that reads a blocking provider stream in a thread and merges what is ready."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from smmf_queue.providers.base import ChatChunk, read_ahead


def test_text_that_came_before_an_error_is_delivered_first() -> None:
    # Given a source that yields text and then fails, both ready before the reader wakes
    def source() -> Iterator[ChatChunk]:
        yield ChatChunk(text="par")
        yield ChatChunk(text="tial")
        raise ConnectionError("dropped")

    received: list[str] = []
    # Then the text arrives, then the error
    with pytest.raises(ConnectionError):
        for chunk in read_ahead(source(), "t"):
            received.append(chunk.text)
    assert "".join(received) == "partial"


def test_text_read_with_the_final_chunk_goes_in_it() -> None:
    # Given a source whose last text and end are both ready when the reader next wakes
    def source() -> Iterator[ChatChunk]:
        yield ChatChunk(text="first")
        yield ChatChunk(text=" last")
        yield ChatChunk(finish_reason="stop")

    stream = read_ahead(source(), "t")
    assert next(stream).text == "first"
    time.sleep(0.2)  # the helper has read the rest meanwhile
    # Then they come as one final chunk, which the worker writes with the end in one round trip
    assert list(stream) == [ChatChunk(text=" last", finish_reason="stop")]


def test_the_final_chunk_ends_the_stream_and_closing_stops_the_source() -> None:
    stopped = threading.Event()

    def source() -> Iterator[ChatChunk]:
        try:
            yield ChatChunk(text="a")
            yield ChatChunk(text="b")
            yield ChatChunk(finish_reason="stop")
            while True:
                yield ChatChunk(text="never read")
        finally:
            stopped.set()

    stream = read_ahead(source(), "t")
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.finish_reason:
            break
    stream.close()
    assert "".join(c.text for c in chunks) == "ab"
    assert chunks[-1].finish_reason == "stop"
    assert stopped.wait(5)


def test_the_first_text_is_read_in_the_callers_thread_and_closing_then_stops_the_source() -> None:
    readers: list[threading.Thread] = []
    stopped = threading.Event()

    def source() -> Iterator[ChatChunk]:
        try:
            for piece in ("", "first", "second"):
                readers.append(threading.current_thread())
                yield ChatChunk(text=piece)
        finally:
            stopped.set()

    stream = read_ahead(source(), "t")
    assert [next(stream).text, next(stream).text] == ["", "first"]
    assert readers == [threading.current_thread()] * 2  # no hop to a helper before the first text
    stream.close()
    assert stopped.is_set()
