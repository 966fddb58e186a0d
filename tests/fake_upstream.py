"""FAKE upstream APIs: a scripted HTTP server that records each request and answers what a test
queued, in the documented wire formats (OpenAI SSE, Azure's URL shape, DeepSeek's
`reasoning_content`, Ollama's NDJSON).

It stands in only where no real server can run here (Azure, DeepSeek and Ollama are remote
services or are not installable from PyPI); the OpenAI-compatible path is also tested against a
real server, llama-cpp-python's `llama_cpp.server`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: Any
    #: the client's port: two requests with the same one came over the same TCP connection
    client_port: int = 0


@dataclass
class Reply:
    status: int = 200
    #: a JSON body, or None for a streamed one
    json_body: Any = None
    #: streamed lines (already framed: "data: {...}\n\n" for SSE, "{...}\n" for NDJSON)
    lines: list[str] = field(default_factory=list)
    content_type: str = "application/json"
    #: stop after this many streamed lines without finishing the body (a dropped connection)
    cut_after: int | None = None
    #: seconds to wait before answering (a slow upstream)
    delay_s: float = 0.0
    #: keep the body open after the last line until this is set (a server that holds the stream)
    hold: threading.Event | None = None
    #: more response headers (e.g. a 429's Retry-After)
    headers: dict[str, str] = field(default_factory=dict)


class FakeUpstream:
    """A scripted server on 127.0.0.1: queue replies with `reply`/`sse`/`ndjson`, read `requests`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._replies: list[Reply] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                fake._record(Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                                      body, self.client_address[1]))
                fake._answer(self, fake._next_reply())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._replies.clear()

    def reply(self, status: int = 200, json_body: Any = None, delay_s: float = 0.0,
              headers: dict[str, str] | None = None) -> None:
        self._queue(Reply(status=status, json_body=json_body if json_body is not None else {},
                          delay_s=delay_s, headers=headers or {}))

    def sse(self, events: list[dict[str, Any]], cut_after: int | None = None,
            hold: threading.Event | None = None, done: bool = True) -> None:
        """Stream `events` as SSE, then `[DONE]` unless `done` is false (with `hold`: a reply
        still under way until the event is set)."""
        lines = [f"data: {json.dumps(event)}\n\n" for event in events] + (["data: [DONE]\n\n"] if done else [])
        self._queue(Reply(lines=lines, content_type="text/event-stream", cut_after=cut_after,
                          hold=hold))

    def ndjson(self, objects: list[dict[str, Any]]) -> None:
        self._queue(Reply(lines=[json.dumps(o) + "\n" for o in objects],
                          content_type="application/x-ndjson"))

    def _queue(self, reply: Reply) -> None:
        with self._lock:
            self._replies.append(reply)

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_reply(self) -> Reply:
        with self._lock:
            if self._replies:
                return self._replies.pop(0)
        return Reply(status=500, json_body={"error": {"message": "the fake has no reply queued"}})

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        time.sleep(reply.delay_s)
        if reply.json_body is not None:
            data = json.dumps(reply.json_body).encode()
            handler.send_response(reply.status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(reply.status)
        handler.send_header("content-type", reply.content_type)
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        for index, line in enumerate(reply.lines):
            if reply.cut_after is not None and index >= reply.cut_after:
                handler.wfile.flush()
                handler.close_connection = True
                handler.connection.shutdown(2)  # drop the connection mid-body
                return
            data = line.encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()
        if reply.hold is not None:
            reply.hold.wait(30)
        handler.wfile.write(b"0\r\n\r\n")


def chat_chunk(text: str = "", reasoning: str | None = None, finish: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One OpenAI chat.completion.chunk (DeepSeek adds `reasoning_content` to the delta)."""
    delta: dict[str, Any] = {"content": text} if text else {}
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                             "model": "fake", "choices": [{"index": 0, "delta": delta,
                                                           "finish_reason": finish}]}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = {**usage, "total_tokens": sum(usage.values())}
    return chunk
