"""The outbox relay: publishes committed outbox rows in order, then marks them.

- One relay is active at a time across replicas (a session advisory lock on
  its listening connection), which keeps events in ``seq`` order, and so in
  order per invoice on every topic.
- It wakes on ``NOTIFY creditnotes_outbox`` (sent by a trigger on insert) and
  also polls, so a lost notification only delays an event.
- Rows are marked published only after the broker acknowledged them. A crash
  in between publishes them again with the same event ids (at-least-once on
  the wire, deduplicable downstream by ``id``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import KafkaError
from opentelemetry import trace

from service.adapters.event_codec import CONTENT_TYPE
from service.adapters.kafka_producer import KafkaProducer
from service.tracing import context_from_traceparent, headers_for, messaging_attributes

_RELAY_LOCK_KEY = 0x6F757462  # "outb"
_CHANNEL = "creditnotes_outbox"
log = structlog.get_logger(__name__)


class OutboxRelay:
    def __init__(self, database_url: str, pool: asyncpg.Pool, producer: KafkaProducer,
                 batch_size: int = 500, poll_seconds: float = 1.0,
                 max_backoff_seconds: float = 5.0,
                 tracer: trace.Tracer | None = None) -> None:
        self._database_url = database_url
        self._pool = pool
        self._producer = producer
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._max_backoff = max_backoff_seconds
        self._wake = asyncio.Event()
        self._tracer = tracer or trace.NoOpTracer()

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping`` is set; survives database and broker outages."""
        backoff = self._poll_seconds
        while not stopping.is_set():
            try:
                await self._run_as_leader(stopping)
                backoff = self._poll_seconds
            except (TimeoutError, OSError, KafkaError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    RuntimeError) as error:
                log.warning("outbox relay interrupted, retrying", error=type(error).__name__,
                            retry_in_s=backoff)
                await _sleep_unless(stopping, backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _run_as_leader(self, stopping: asyncio.Event) -> None:
        listener = await asyncpg.connect(self._database_url)
        try:
            while not await listener.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK_KEY):
                await _sleep_unless(stopping, self._poll_seconds)
                if stopping.is_set():
                    return
            await listener.add_listener(_CHANNEL, self._on_notify)
            log.info("outbox relay active")
            while not stopping.is_set():
                # cleared before reading, so a NOTIFY that arrives while publishing
                # wakes the next round at once instead of waiting for the poll
                self._wake.clear()
                while await self.publish_pending() == self._batch_size:
                    pass
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait(stopping), self._poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 5)

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished rows in order; returns how many."""
        rows = await self._pool.fetch(
            """
            SELECT seq, topic, key, type, payload, traceparent FROM outbox
            WHERE published_at IS NULL ORDER BY seq LIMIT $1
            """,
            self._batch_size,
        )
        if not rows:
            return 0
        content_type = ("content-type", CONTENT_TYPE.encode())
        spans = [self._tracer.start_span(
            f"publish {row['type']}", context=context_from_traceparent(row["traceparent"]),
            kind=trace.SpanKind.PRODUCER, attributes=messaging_attributes(row["topic"]))
            for row in rows]
        try:
            await self._producer.send_all([
                (row["topic"], row["key"].encode() if row["key"] is not None else None,
                 row["payload"].encode(), [content_type, *headers_for(span)])
                for row, span in zip(rows, spans, strict=True)
            ])
        finally:
            for span in spans:
                span.end()
        await self._pool.execute(
            "UPDATE outbox SET published_at = now() WHERE seq = ANY($1::bigint[])",
            [row["seq"] for row in rows],
        )
        log.debug("outbox published", count=len(rows))
        return len(rows)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _wait(self, stopping: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
