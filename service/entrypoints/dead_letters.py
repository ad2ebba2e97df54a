"""Dead letters: a record that cannot be processed goes, unchanged, to ``<topic>.dlq``.

The key, value, headers and timestamp are kept as they were; the ``dlq.*``
headers of docs/contract.md say where it came from and why it failed, in words
that carry no payload data. The caller commits the original offset only
after :meth:`DeadLetterWriter.write` returned, that is after the broker
acknowledged the dead-letter record. A broker that cannot take it raises
``errors.Unavailable``, and the record is tried again in place. A record too
large for the broker is dead-lettered without its value (``dlq.value.omitted``
says how many bytes it had; the original stays at ``dlq.original.*``), and if
still too large without the original's own headers too (``dlq.headers.omitted``:
``<count>;<bytes>``, names and values counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from service.adapters.kafka_producer import KafkaProducer
from service.adapters.unavailable import mapped_to_unavailable
from service.domain.errors import Undeliverable
from service.headers import Header


class Record(Protocol):
    """The parts of a consumed Kafka record a dead letter keeps (aiokafka's ConsumerRecord)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] | list[Header]


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(frozen=True)
class Failure:
    error: Undeliverable
    attempts: int
    first_failed_at: datetime


class DeadLetterWriter:
    def __init__(self, producer: KafkaProducer, consumer_group: str, service_version: str) -> None:
        self._producer = producer
        self._group = consumer_group
        self._version = service_version

    async def write(self, record: Record, failure: Failure) -> None:
        error = failure.error
        failed_at = datetime.now(UTC)
        headers = [(name, value) for name, value in record.headers
                   if not name.startswith("dlq.")]  # a replayed record fails afresh
        headers += [(name, value.encode()) for name, value in {
            "dlq.original.topic": record.topic,
            "dlq.original.partition": str(record.partition),
            "dlq.original.offset": str(record.offset),
            "dlq.original.timestamp": str(record.timestamp),
            "dlq.consumer.group": self._group,
            "dlq.error.reason": error.code,
            "dlq.error.class": error.error_class,
            "dlq.error.message": error.message[:1000],
            "dlq.attempts": str(failure.attempts),
            "dlq.first_failed_at": _iso(failure.first_failed_at),
            "dlq.failed_at": _iso(failed_at),
            "dlq.service.version": self._version,
        }.items()]
        topic = dead_letter_topic(record.topic)
        with mapped_to_unavailable("the broker"):
            try:
                await self._producer.send(topic, value=record.value, key=record.key,
                                          headers=headers, timestamp_ms=record.timestamp)
            except (MessageSizeTooLargeError, RecordTooLargeError):
                # Larger than the broker takes (the input topic allowed more): the dead
                # letter keeps where the original is, not its value, rather than hold the
                # partition for ever; then not the original's headers either.
                headers.append(("dlq.value.omitted", str(len(record.value or b"")).encode()))
                try:
                    await self._producer.send(topic, value=None, key=record.key,
                                              headers=headers, timestamp_ms=record.timestamp)
                except (MessageSizeTooLargeError, RecordTooLargeError):
                    kept = [(name, value) for name, value in headers if name.startswith("dlq.")]
                    dropped = [(name, value) for name, value in headers
                               if not name.startswith("dlq.")]
                    size = sum(len(name.encode()) + len(value) for name, value in dropped)
                    kept.append(("dlq.headers.omitted", f"{len(dropped)};{size}".encode()))
                    await self._producer.send(topic, value=None, key=record.key, headers=kept,
                                              timestamp_ms=record.timestamp)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
