"""The health endpoints cannot exhaust the service (issue 15, finding 8): a flood of
``/readyz`` takes no connection from the consumers' pool, and the HTTP server's limits
(connections, read timeout, line length) hold. ``/metrics`` can live on its own port."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.adapters.probe_connection import APPLICATION_NAME
from service.devtools.devstack import free_port
from service.entrypoints.http import Cached
from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration


async def http_get(port: int, path: str, *, request: bytes | None = None) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request or f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def turned_away(port: int) -> bool:
    """A request refused at once: ``503 busy``, or the connection closed before an answer."""
    try:
        return await http_get(port, "/healthz") == (503, "busy\n")
    except (ConnectionError, IndexError):
        return True


async def health_connections(settings: Settings) -> int:
    """Connections the health endpoints hold (their own, named ``creditnotes-health``)."""
    database = settings.database_url.rsplit("/", 1)[1]
    rows = await fetch(settings, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1"
                                 " AND application_name = $2", database, APPLICATION_NAME)
    return int(rows[0]["n"])


async def test_a_readyz_flood_takes_no_pool_connection_and_messages_keep_flowing(
        settings: Settings, kafka: Kafka) -> None:
    small = settings.model_copy(update={"database_pool_size": 2, "http_max_connections": 256})
    async with RunningService(small) as running:
        port = running.service.http_port
        assert port is not None
        await kafka.publish(small.topics.invoices, cloudevent("invoice.finalized", invoice_data()))
        while await fetchrow(small, "SELECT 1 FROM invoices") is None:
            await kafka.settle(0.1)

        commands = [cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 100},
                               id_=f"cmd-{n}") for n in range(20)]
        started = time.monotonic()
        flood = [asyncio.create_task(http_get(port, "/readyz")) for _ in range(200)]
        for command in commands:
            await kafka.publish(small.topics.credit_note_commands, command)
        peak = 0
        while not all(task.done() for task in flood):
            peak = max(peak, await health_connections(small))
            await asyncio.sleep(0.05)
        answers = [task.result() for task in flood]
        issued = await kafka.expect(small.topics.credit_note_events, "credit_note.issued",
                                    count=len(commands))
        elapsed = time.monotonic() - started
        health = running.service.health
        assert health is not None and isinstance(health.readiness, Cached)
        computed = health.readiness.computations

    assert len(issued) == len(commands)
    assert answers == [(200, "ready\n")] * len(flood)
    # computed at most once per readiness_cache_seconds (1 s), never once per request
    assert computed <= elapsed / small.readiness_cache_seconds + 2, computed
    # one connection of their own, never one per request, never the consumers' pool
    assert peak == 1, peak
    assert elapsed < 30


async def test_the_http_limits_hold(settings: Settings) -> None:
    limited = settings.model_copy(update={
        "http_max_connections": 3, "http_read_timeout_seconds": 0.5,
        "http_max_request_line_bytes": 256})
    async with RunningService(limited) as running:
        port = running.service.http_port
        assert port is not None

        long_line = b"GET /readyz?" + b"a" * 1_000 + b" HTTP/1.1\r\n\r\n"
        assert (await http_get(port, "", request=long_line))[0] == 431
        endless_headers = b"GET /readyz HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n"
        assert (await http_get(port, "", request=endless_headers))[0] == 431

        # three idle clients fill the server; a fourth is turned away at once
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert await turned_away(port)
        # an idle client is dropped after the read timeout, freeing its place
        for reader, _ in idle:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the server hung up
        for _, writer in idle:
            writer.close()
        assert await http_get(port, "/healthz") == (200, "ok\n")


async def test_metrics_can_be_served_on_their_own_port(settings: Settings) -> None:
    separate = settings.model_copy(update={"metrics_port": free_port()})
    async with RunningService(separate) as running:
        probes, metrics = running.service.http_port, running.service.metrics_port
        assert probes is not None and metrics == separate.metrics_port != probes
        assert (await http_get(probes, "/metrics"))[0] == 404
        assert (await http_get(probes, "/readyz")) == (200, "ready\n")
        status, body = await http_get(metrics, "/metrics")
        assert status == 200 and "creditnotes_outbox_backlog" in body
        assert (await http_get(metrics, "/readyz"))[0] == 404
