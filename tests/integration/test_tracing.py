"""Tracing: a message's trace runs from the upstream producer through the service to its events."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, invoice_data

pytestmark = pytest.mark.integration
UPSTREAM_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UPSTREAM_SPAN = "00f067aa0ba902b7"


async def test_the_trace_of_a_command_continues_through_the_database_to_the_published_events(
        settings: Settings, kafka: Kafka) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    async with RunningService(settings, tracer_provider=provider):
        await kafka.publish(settings.topics.invoices,
                            cloudevent("invoice.finalized", invoice_data("in_1001")))
        await kafka.publish(
            settings.topics.credit_note_commands,
            cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 100_000},
                       id_="traced-1"),
            headers=[("content-type", b"application/cloudevents+json"),
                     ("traceparent", f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01".encode())])
        [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
        [paid] = await kafka.expect(settings.topics.invoice_events, "invoice.paid")

    for record in (issued, paid):
        assert record.headers["traceparent"].decode().split("-")[1] == UPSTREAM_TRACE
    finished = spans.get_finished_spans()
    process = next(s for s in finished if s.name == "process credit_note.issue")
    assert process.parent is not None
    assert (format(process.context.trace_id, "032x"), format(process.parent.span_id, "016x")) == (
        UPSTREAM_TRACE, UPSTREAM_SPAN)
    transactions = [s for s in finished if s.name == "postgresql transaction"
                    and any(link.context.span_id == process.context.span_id for link in s.links)]
    assert transactions
    publishes = [s for s in finished if s.name.startswith("publish ")
                 and s.context.trace_id == process.context.trace_id]
    assert sorted(s.name for s in publishes) == ["publish credit_note.issued",
                                                 "publish invoice.paid"]
    assert all(s.parent is not None and s.parent.span_id == process.context.span_id
               for s in publishes)


async def test_without_tracing_nothing_is_added_to_published_events(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data("in_1001")))
    await kafka.publish(settings.topics.credit_note_commands,
                        cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 10}))
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert set(issued.headers) == {"content-type"}
