"""OpenTelemetry tracing: off by default, on with ``CREDITNOTES_TRACING_ENABLED=true``.

The trace follows a message through the service:

- ``process <type>``: one span per consumed record, a child of the upstream
  producer's span when the record carries a W3C ``traceparent`` header;
- ``postgresql transaction``: the batch's transaction, linked to every record
  it applied;
- the ``traceparent`` of the record's span is stored with the outbox rows it
  wrote, and ``publish <type>``, the relay's span for each event, is its
  child; the published record carries that span's ``traceparent`` header.

No global state: the composition root builds one tracer provider and hands
tracers to the pipeline and the relay. With tracing off every tracer is a
no-op one (an upstream ``traceparent`` is still passed on to the events);
with it on, the ``tracing`` extra must be installed, or the service refuses
to start rather than silently not tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.headers import Header

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(enabled: bool, endpoint: str | None,
                    service_version: str) -> trace.TracerProvider:
    """The provider the service uses: OTLP over HTTP when enabled, no-op otherwise."""
    if not enabled:
        return trace.NoOpTracerProvider()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": "creditnotes", "service.version": service_version}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()))
    return provider


def context_from_headers(headers: Sequence[Header]) -> Context:
    """The upstream span's context, from a record's ``traceparent``/``tracestate`` headers."""
    carrier = {name: value.decode("latin-1") for name, value in headers
               if name in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier)


def traceparent_of(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` that makes a span the parent of what comes next."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> Context:
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def headers_for(span: trace.Span) -> list[Header]:
    traceparent = traceparent_of(span)
    return [("traceparent", traceparent.encode())] if traceparent else []


def messaging_attributes(topic: str, partition: int | None = None,
                         offset: int | None = None, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"messaging.system": "kafka",
                                  "messaging.destination.name": topic}
    if partition is not None:
        attributes["messaging.destination.partition.id"] = str(partition)
    if offset is not None:
        attributes["messaging.kafka.offset"] = offset
    attributes.update({key: value for key, value in extra.items() if value is not None})
    return attributes
