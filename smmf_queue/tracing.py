"""Traces: OpenTelemetry spans from the SDK and the gateway through the queue to the worker and
the provider's upstream call, one trace per request. The W3C trace context crosses the queue in
the job message's headers, and the upstream request's headers carry it on.

Nothing is recorded until a tracer provider is installed: by `setup` in the worker and the
gateway when the standard OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
set (OTLP/HTTP, the `otel` extra), or by an application using the SDK, as OpenTelemetry has
it. Until then `span` does nothing, at the cost of one check per job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)

#: the standard variables that name where spans go.
ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

def setup(service: str) -> None:
    """Export this process's spans over OTLP/HTTP, if an endpoint is configured."""
    if not any(os.environ.get(name) for name in ENDPOINT_ENV):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but the 'otel' extra is not installed: no traces")
        return
    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def _recording() -> bool:
    """Whether a tracer provider was installed (before, OpenTelemetry's is a placeholder)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


@contextlib.contextmanager
def span(name: str, kind: SpanKind, attributes: Mapping[str, Any] | None = None,
         parent: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span around the block, the current one's child (or `parent`'s: headers carrying a
    trace context); None and nothing done when tracing is off."""
    if not _recording():
        yield None
        return
    ctx = propagate.extract(parent) if parent is not None else None
    with trace.get_tracer("smmf_queue").start_as_current_span(
            name, context=ctx, kind=kind, attributes=dict(attributes or {})) as current:
        yield current


def annotate(**attributes: Any) -> None:
    """Add attributes to the current span (nothing when tracing is off)."""
    if _recording():
        trace.get_current_span().set_attributes(attributes)


def headers() -> dict[str, str]:
    """The current trace context as headers (`traceparent`), to send on; empty when off."""
    carrier: dict[str, str] = {}
    if _recording():
        propagate.inject(carrier, context=context.get_current())
    return carrier
