"""The one Kafka producer the service writes with (outbox relay and dead letters).

aiokafka directly rather than FastStream's publisher, because dead letters must
go out with the original headers unchanged (FastStream adds its own), and the
relay wants the send futures to pipeline a batch. ``acks="all"``; idempotence
is off because not every Kafka-protocol broker supports it (ordering then
relies on one in-flight request per partition, which aiokafka keeps).

What aiokafka 0.14's sender does (``producer/sender.py``, ``message_accumulator.py``):
one produce request in flight per broker, and a partition muted while its batch
is in flight; a batch refused with a retriable error goes back to the FRONT of
its partition's queue (``reenqueue``: ``appendleft``) before the partition is
unmuted. So a partition's batches reach the log in the order they were handed
over, as long as each succeeds. A batch that fails for good (a non-retriable
error, or expired after ``request_timeout_ms``) does not stop the partition's
next batch: without idempotence, a later record of a key may then land while an
earlier one failed. The relay therefore hands a key's next record over only once
the previous one is acked (its chains), and pipelines different keys.

Batches are as large as the largest event the relay may send
(``outbox_max_event_bytes``, which the topics must accept): a relay batch of a
few hundred events goes out in one or two produce requests per partition instead
of one per 16 KB, and a batch is never larger than a record the topic accepts.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from service.headers import Header
from service.settings import Settings


def connection_options(settings: Settings) -> dict[str, Any]:
    """Security options shared by every Kafka client (no silent plaintext fall-back)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in {"SSL", "SASL_SSL"}:
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None)
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # checked by Settings
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


class KafkaProducer:
    def __init__(self, settings: Settings) -> None:
        self._producer = AIOKafkaProducer(
            **connection_options(settings),
            acks="all",
            enable_idempotence=False,
            linger_ms=2,
            max_batch_size=settings.outbox_max_event_bytes,
            max_request_size=max(settings.max_message_bytes * 2, 1_048_576,
                                 settings.outbox_max_event_bytes),
            request_timeout_ms=30_000,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   headers: Sequence[Header] = (), timestamp_ms: int | None = None) -> None:
        """Send one record and wait until the broker acknowledges it."""
        await self._producer.send_and_wait(topic, value=value, key=key, headers=list(headers),
                                           timestamp_ms=timestamp_ms)

    async def enqueue(self, topic: str, key: bytes | None, value: bytes,
                      headers: Sequence[Header]) -> asyncio.Future[Any]:
        """Hand one record to the producer; the future resolves when the broker acked it.

        Raises at once for a record the producer itself refuses (for example
        ``MessageSizeTooLargeError`` above ``max_request_size``), so a caller
        that pipelines can tell that record's fault from the broker's answer.
        """
        future: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key, headers=list(headers))
        return future

    @staticmethod
    def estimated_size(key: bytes | None, value: bytes, headers: Sequence[Header]) -> int:
        """The bytes a record takes in a batch of its own, as the broker counts them."""
        size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
        return size
