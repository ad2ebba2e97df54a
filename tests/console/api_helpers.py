"""What the API tests share: invoices put in through the real topics, and the end
offsets of a topic (to show that nothing was published)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from service.settings import Settings
from tests.support import Kafka, cloudevent, fetchrow, invoice_data


async def seed_invoice(settings: Settings, kafka: Kafka, invoice_id: str = "in_1001", *,
                       paid: int = 0, lines: list[dict[str, Any]] | None = None) -> None:
    """An invoice finalized (and ``paid`` through one payment) through the service."""
    await kafka.publish(settings.topics.invoices, cloudevent(
        "invoice.finalized", invoice_data(invoice_id, lines=lines)))
    await wait_for_row(settings, "SELECT 1 FROM invoices WHERE id = $1", invoice_id)
    if paid:
        await kafka.publish(settings.topics.invoices, cloudevent(
            "invoice.payment_succeeded", {"invoice_id": invoice_id, "amount": paid,
                                          "currency": "usd", "payment_id": f"pay_{invoice_id}"}))
        await wait_for_row(settings, "SELECT 1 FROM payments WHERE invoice_id = $1"
                           " AND payment_id IS NOT NULL", invoice_id)


async def wait_for_row(settings: Settings, query: str, *args: Any,
                       timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while (row := await fetchrow(settings, query, *args)) is None:
        assert time.monotonic() < deadline, f"no row for {query} {args}"
        await asyncio.sleep(0.05)
    return row


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's end offset: equal before and after means nothing was published."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:16]}"
