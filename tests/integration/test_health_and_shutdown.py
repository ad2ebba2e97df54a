"""Operating the running service: health, readiness and metrics over HTTP, and a stop
while messages are flowing that loses none of them."""

from __future__ import annotations

import asyncio

import pytest

from service.settings import Settings
from tests.support import Kafka, Record, RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the service's health port: (status code, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1]), body.decode()


async def test_health_readiness_and_metrics_answer_over_http(service: RunningService) -> None:
    port = service.service.http_port
    assert port is not None

    assert await http_get(port, "/healthz") == (200, "ok\n")
    assert await http_get(port, "/readyz") == (200, "ready\n")
    status, metrics = await http_get(port, "/metrics")
    assert status == 200
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line and not line.startswith("#"))
    assert float(samples["creditnotes_outbox_backlog"]) == 0
    status, _ = await http_get(port, "/no-such-page")
    assert status == 404


async def test_stopping_while_messages_flow_loses_none_and_numbers_stay_gapless(
        settings: Settings, kafka: Kafka) -> None:
    commands = [cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 100},
                           id_=f"cmd-{n:02d}") for n in range(1, 51)]
    numbers = [f"ACME-1001-CN-{n:02d}" for n in range(1, 51)]

    def issued() -> list[Record]:
        return kafka.on(settings.topics.credit_note_events, "credit_note.issued")

    async with RunningService(settings) as first:
        await kafka.publish(settings.topics.invoices, cloudevent("invoice.finalized", invoice_data()))
        while await fetchrow(settings, "SELECT 1 FROM invoices") is None:
            await kafka.settle(0.1)
        for command in commands:
            await kafka.publish(settings.topics.credit_note_commands, command)
        await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
        await first.stop()
    stopped_with = len(await fetch(settings, "SELECT 1 FROM credit_notes"))

    async with RunningService(settings):
        await kafka.wait_for(lambda: len({r.event["id"] for r in issued()}) >= 50, timeout_s=60)
        await kafka.settle(1.0)

    context = f"the first service stopped with {stopped_with} of 50 credit notes"
    assert len({r.event["id"] for r in issued()}) == 50, context
    first_seen = list(dict.fromkeys(r.event["data"]["number"] for r in issued()))
    assert first_seen == numbers, context  # gapless, and published in the order issued
    assert sorted({r.event["data"]["trigger"]["id"] for r in issued()}) == [c["id"] for c in commands]
    notes = await fetch(settings, "SELECT number, total FROM credit_notes ORDER BY sequence")
    assert [row["number"] for row in notes] == numbers
    assert {row["total"] for row in notes} == {100}
    assert kafka.on(settings.topics.credit_note_events, "credit_note.rejected") == []
    assert kafka.on(f"{settings.topics.credit_note_commands}.dlq") == []
    row = await fetchrow(settings, "SELECT pre_payment_credited, credit_note_count FROM invoices")
    assert row is not None and (row["pre_payment_credited"], row["credit_note_count"]) == (5_000, 50)
    assert await fetch(settings, "SELECT 1 FROM outbox WHERE published_at IS NULL") == []
