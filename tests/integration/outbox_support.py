"""Outbox relays on their own (real PostgreSQL and broker), and raw outbox rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from service.adapters.kafka_producer import KafkaProducer
from service.adapters.outbox_relay import OutboxRelay
from service.settings import Settings


@contextlib.asynccontextmanager
async def running_relay(settings: Settings, **options: Any) -> AsyncIterator[OutboxRelay]:
    """One relay with its own pool and producer, as a replica of the service has."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    producer = KafkaProducer(settings)
    await producer.start()
    relay = OutboxRelay(settings.database_url, pool, producer,
                        **{"poll_seconds": 0.1, "max_backoff_seconds": 0.5, **options})
    stopping = asyncio.Event()
    task = asyncio.create_task(relay.run(stopping))
    try:
        yield relay
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await pool.close()


async def insert_row(connection: asyncpg.Connection, topic: str, key: str | None,
                     event_id: str, pad: int = 0) -> int:
    """An outbox row as the unit of work writes one, ``pad`` bytes of data larger."""
    payload = json.dumps({"specversion": "1.0", "id": event_id, "source": "/credit-notes",
                          "type": "test.event", "data": {"pad": "x" * pad}},
                         separators=(",", ":"))
    seq: int = await connection.fetchval(
        "INSERT INTO outbox (event_id, topic, key, type, payload)"
        " VALUES ($1, $2, $3, 'test.event', $4) RETURNING seq", event_id, topic, key, payload)
    return seq
