"""``creditnotes publish <topic> <file|->``: send CloudEvents as an upstream service would.

For an upstream developer trying the service, and for ops re-sending a fixed
event: it reads one CloudEvent (a JSON object), a JSON array of them, or JSON
lines, checks each envelope the way the service will, and publishes them in
order with the key the contract asks for (the invoice id), through the same
connection settings as every other Kafka client of the service.

Every event is checked before the first is sent, so a bad file publishes
nothing. ``--raw`` skips the check, to try what the service does with a bad
record.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.adapters.kafka_producer import connection_options
from service.domain import errors
from service.entrypoints import translators
from service.settings import Settings

CONTENT_TYPE = ("content-type", b"application/cloudevents+json")


class PublishError(Exception):
    """The input cannot be published as it is; nothing was sent."""


class NoSuchTopic(Exception):
    """The broker has no topic of that name (publishing would create one on some brokers)."""


@dataclass(frozen=True)
class Outgoing:
    key: str | None
    value: bytes
    label: str  # "<type> <id>", for the report


@dataclass(frozen=True)
class Sent:
    label: str
    topic: str
    partition: int
    offset: int
    key: str | None


def read_events(source: str) -> list[Any]:
    """The JSON values in a file (``-``: standard input): an object, an array, or JSON lines."""
    text = sys.stdin.read() if source == "-" else _read(Path(source))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise PublishError(f"{source}: not JSON or JSON lines ({error.msg}, "
                               f"line {error.lineno})") from None
    return value if isinstance(value, list) else [value]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PublishError(f"no file {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PublishError(f"cannot read {str(path)!r}: {error}") from None


def key_of(event: Any) -> str | None:
    """The record key the contract asks for: the invoice id (or the event's ``subject``)."""
    if not isinstance(event, dict):
        return None
    data = event.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("invoice_id"), str):
            return str(data["invoice_id"])
        invoice = data.get("invoice")
        if isinstance(invoice, dict) and isinstance(invoice.get("id"), str):
            return str(invoice["id"])
    subject = event.get("subject")
    return subject if isinstance(subject, str) else None


def prepare(events: Sequence[Any], key: str | None, raw: bool) -> list[Outgoing]:
    """Check every event's envelope (unless ``raw``) and pick its key; raise before sending any."""
    if not events:
        raise PublishError("nothing to publish: the input holds no event")
    prepared = []
    for number, event in enumerate(events, start=1):
        value = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        label = f"event {number}"
        if isinstance(event, dict):
            label = f"{event.get('type', '?')} {event.get('id', '?')}"
        if not raw:
            try:
                translators.decode_envelope(value, [])
            except errors.Undeliverable as error:
                raise PublishError(f"event {number} would be dead-lettered as {error.code}: "
                                   f"{error.message} (--raw publishes it anyway)") from None
        prepared.append(Outgoing(key if key is not None else key_of(event), value, label))
    return prepared


async def publish(settings: Settings, topic: str, events: Sequence[Outgoing]) -> list[Sent]:
    """Send in order, each acknowledged by the broker before the next; returns where each went."""
    if topic not in await existing_topics(settings):
        raise NoSuchTopic(f"no topic {topic!r} on the broker")
    producer = AIOKafkaProducer(**connection_options(settings), acks="all",
                                enable_idempotence=False)
    try:
        await producer.start()
        sent = []
        for event in events:
            metadata = await producer.send_and_wait(
                topic, value=event.value, key=event.key.encode() if event.key else None,
                headers=[CONTENT_TYPE])
            sent.append(Sent(event.label, topic, metadata.partition, metadata.offset, event.key))
        return sent
    finally:
        await producer.stop()


async def existing_topics(settings: Settings) -> set[str]:
    """The topics the broker has, asked without naming one (naming one auto-creates it on
    brokers that allow that, tansu among them)."""
    consumer = AIOKafkaConsumer(**connection_options(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        return set(await consumer.topics())
    finally:
        await consumer.stop()
