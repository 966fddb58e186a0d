"""Traces (#19): one chat through the gateway is one trace, from the client's span through the
gateway, the queue and the worker to the provider's upstream request, whose headers carry it
on. The client's span is recorded by the SDK's in-memory exporter; the gateway and worker
processes export theirs over OTLP/HTTP (the `otel` extra) to a receiver in this test, which
decodes them with OpenTelemetry's own protobuf classes. The upstream is the FAKE
(tests/fake_upstream.py), which shows what headers it received."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import propagate
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import GATEWAY_KEY, StartWorker, free_port, start_service, wait_until, write_config
from .fake_upstream import FakeUpstream, chat_chunk

TRACED = "traced-proxy"


class OtlpReceiver:
    """Collects the spans OTLP/HTTP exporters post to /v1/traces: one dict per span."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver._collect(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _collect(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    self.spans.append({"service": service, "name": span.name, "trace": span.trace_id.hex(),
                                       "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                       "attributes": attributes})


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    collector = OtlpReceiver()
    yield collector
    collector.server.shutdown()


def test_one_chat_is_one_trace_from_the_client_to_the_upstream(
        tmp_path: Path, redis_server: EmbeddedRedis, tiny_models: Path, upstream: FakeUpstream,
        receiver: OtlpReceiver, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a gateway and a worker exporting spans to the receiver
    config = write_config(tmp_path / "traced.toml", redis_server.url, tiny_models, extra=(
        f'[[models.llms]]\nname = "{TRACED}"\nprovider = "proxy/openai"\napi_base = "{upstream.url}/v1"\n'
        'api_key = "unused"\nmax_retries = 0\n'))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    start_worker(TRACED, config=config)
    port = free_port()
    gateway = start_service("gateway", config, tmp_path / "gateway.log", f"http://127.0.0.1:{port}/healthz",
                            "--port", str(port))
    upstream.reset()
    upstream.sse([chat_chunk("traced"), chat_chunk(finish="stop")])
    # When a client inside a span of its own sends a chat, with its trace context
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    try:
        with provider.get_tracer("test client").start_as_current_span("client request"):
            headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
            propagate.inject(headers)
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers, timeout=60,
                                json={"model": TRACED, "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
        [root] = client_spans.get_finished_spans()
        trace_id = f"{root.context.trace_id:032x}"

        def names() -> set[str]:
            return {span["name"] for span in receiver.spans if span["trace"] == trace_id}

        wait_until(lambda: {"POST /v1/chat/completions", "smmf.enqueue llm", "smmf.run llm",
                            "smmf.upstream"} <= names(), 20, "the spans of the chat")
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
    # Then they form one chain: client → gateway → enqueue → worker → upstream request
    spans = [span for span in receiver.spans if span["trace"] == trace_id]
    by_name = {span["name"]: span for span in spans}
    by_id = {span["id"]: span for span in spans}
    server, enqueue = by_name["POST /v1/chat/completions"], by_name["smmf.enqueue llm"]
    run, call = by_name["smmf.run llm"], by_name["smmf.upstream"]
    assert server["parent"] == f"{root.context.span_id:016x}"
    assert (run["parent"], call["parent"]) == (enqueue["id"], run["id"])
    ancestors = []  # FastAPI's own spans (its endpoint's) may sit between the request and the job
    parent = enqueue["parent"]
    while parent in by_id:
        ancestors.append(by_id[parent]["name"])
        parent = by_id[parent]["parent"]
    assert ancestors[-1] == "POST /v1/chat/completions"
    assert (server["service"], enqueue["service"]) == ("smmf-queue-gateway",) * 2
    assert (run["service"], call["service"]) == ("smmf-queue-worker",) * 2
    # with the job's model, id, attempt and queue wait, and the upstream's address
    job_id = answer.json()["id"].removeprefix("chatcmpl-")
    assert run["attributes"]["smmf.model"] == TRACED and run["attributes"]["smmf.job_id"] == job_id
    assert run["attributes"]["smmf.attempt"] == 1 and run["attributes"]["smmf.queue_wait_s"] >= 0
    assert server["attributes"]["http.response.status_code"] == 200 and server["attributes"]["http.route"]
    assert call["attributes"]["server.address"] == upstream.url.removeprefix("http://")
    # And the upstream received the trace, its parent the upstream span
    [received] = upstream.requests
    assert received.headers["traceparent"].split("-")[:3] == ["00", trace_id, call["id"]]


def test_no_endpoint_no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    from smmf_queue import tracing

    for name in tracing.ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    tracing.setup("nothing")
    with tracing.span("unused", kind=tracing.SpanKind.INTERNAL) as span:
        assert span is None and tracing.headers() == {}
