"""Load generation and observation: the messages, a fast or paced publisher, an output reader.

Every benchmark message is a CloudEvent in structured JSON mode, keyed by its
invoice id, exactly as upstream services publish them (docs/contract.md). Invoices
are large (about 2.2 * 10^12 minor units over two lines) and each message asks
for a small credit, so every credit is issued: the measured work is the
service's normal path, not rejections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.adapters.kafka_producer import connection_options
from service.settings import Settings, Topics

#: The default topic names (the ceiling's topics are named after them).
DEFAULT_TOPICS = Topics()

HEADERS = [("content-type", b"application/cloudevents+json")]
PERIOD = {"start": "2026-10-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}

#: The measured mix: type -> share. Mostly explicit commands, then the triggers.
MIX: tuple[tuple[str, float], ...] = (
    ("credit_note.issue", 0.70),
    ("return.received", 0.15),
    ("sla.breached", 0.12),
    ("subscription.canceled", 0.03),
)
SOURCES = {
    "invoice.finalized": "/bench/billing",
    "credit_note.issue": "/bench/support",
    "return.received": "/bench/warehouse",
    "sla.breached": "/bench/monitoring",
    "subscription.canceled": "/bench/subscriptions",
}


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    id: str


def invoice_id(number: int) -> str:
    return f"in_bench_{number:07d}"


HOT_INVOICE = "in_bench_hot"


def topic_of(topics: Topics, type_: str) -> str:
    return {
        "invoice.finalized": topics.invoices,
        "credit_note.issue": topics.credit_note_commands,
        "return.received": topics.returns,
        "sla.breached": topics.sla_breaches,
        "subscription.canceled": topics.cancellations,
    }[type_]


def _event(type_: str, id_: str, subject: str, data: dict[str, Any]) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": id_, "source": SOURCES[type_], "type": type_,
        "time": "2026-11-21T10:00:00Z", "subject": subject,
        "datacontenttype": "application/json", "data": data,
    }, separators=(",", ":")).encode()


def invoices(settings: Settings, count: int, run: str) -> Iterator[Outgoing]:
    """``count`` invoices plus the hot one: a taxed quantity line and a subscription line."""
    topic = settings.topics.invoices
    for number in [*range(count), -1]:
        ident = HOT_INVOICE if number < 0 else invoice_id(number)
        data = {"invoice": {
            "id": ident, "number": f"BENCH-{run}-{number if number >= 0 else 'HOT'}",
            "customer_id": f"cus_{max(number, 0) % 997}", "currency": "usd", "status": "open",
            "lines": [
                {"id": "il_1", "description": "Widget", "quantity": 1_000_000_000,
                 "unit_amount": 1_000, "tax_rate_bps": 2_000},
                {"id": "il_2", "description": "Platform subscription", "quantity": 1,
                 "unit_amount": 1_000_000_000_000, "period": PERIOD},
            ],
        }}
        id_ = f"inv-{run}-{ident}"
        yield Outgoing(topic, ident.encode(), _event("invoice.finalized", id_, ident, data), id_)


def message(settings: Settings, type_: str, id_: str, invoice: str, sequence: int) -> Outgoing:
    if type_ == "credit_note.issue":
        data: dict[str, Any] = {"invoice_id": invoice, "amount": 100 + sequence % 900,
                                "reason": "order_change", "memo": f"bench credit {sequence}",
                                "metadata": {"ticket": f"SUP-{sequence}"}}
    elif type_ == "return.received":
        data = {"invoice_id": invoice, "return_id": f"rma_{sequence}",
                "lines": [{"invoice_line_id": "il_1", "quantity": 1 + sequence % 3}],
                "reason": "product_unsatisfactory"}
    elif type_ == "sla.breached":
        data = {"invoice_id": invoice, "sla_id": f"sla_uptime_{sequence}",
                "credit_amount": 500 + sequence % 500}
    else:  # subscription.canceled, one minute before the period ends: a small prorated credit
        data = {"invoice_id": invoice, "invoice_line_id": "il_2",
                "canceled_at": "2026-10-31T23:59:00Z"}
    return Outgoing(topic_of(settings.topics, type_), invoice.encode(),
                    _event(type_, id_, invoice, data), id_)


def mix(settings: Settings, count: int, invoice_count: int, run: str, phase: str,
        hot_share: float = 0.0, seed: int = 7) -> Iterator[Outgoing]:
    """``count`` messages of :data:`MIX` over the invoices; ``hot_share`` of them on one invoice."""
    rng = random.Random(f"{seed}-{phase}")  # noqa: S311 - test data, not secrets
    types = [name for name, _ in MIX]
    weights = [share for _, share in MIX]
    for sequence in range(count):
        type_ = rng.choices(types, weights)[0]
        hot = hot_share > 0 and rng.random() < hot_share
        invoice = HOT_INVOICE if hot else invoice_id(rng.randrange(invoice_count))
        yield message(settings, type_, f"{phase}-{run}-{sequence}", invoice, sequence)


class Publisher:
    """An aiokafka producer for load: as fast as possible, or paced at a fixed rate."""

    def __init__(self, settings: Settings, linger_ms: int = 5) -> None:
        self._producer = AIOKafkaProducer(
            **connection_options(settings), enable_idempotence=False, acks="all",
            linger_ms=linger_ms, max_batch_size=256 * 1024, request_timeout_ms=60_000)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def fast(self, messages: Iterable[Outgoing], topic_map: dict[str, str] | None = None,
                   window: int = 20_000) -> tuple[int, float]:
        """Publish everything as fast as the broker takes it; returns (count, seconds)."""
        started = time.monotonic()
        pending: list[asyncio.Future[Any]] = []
        count = 0
        for item in messages:
            topic = topic_map[item.topic] if topic_map else item.topic
            pending.append(await self._producer.send(topic, value=item.value, key=item.key,
                                                     headers=HEADERS))
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return count, time.monotonic() - started

    async def paced(self, messages: Iterable[Outgoing], rate: float,
                    sent_at: dict[str, float]) -> tuple[int, float]:
        """Publish at ``rate`` messages per second, noting each id's publish time (epoch s)."""
        iterator = iter(messages)
        pending: list[asyncio.Future[Any]] = []
        started = time.monotonic()
        count = 0
        exhausted = False
        while not exhausted:
            due = int((time.monotonic() - started) * rate) + 1
            while count < due:
                item = next(iterator, None)
                if item is None:
                    exhausted = True
                    break
                now = time.time()
                sent_at[item.id] = now
                pending.append(await self._producer.send(
                    item.topic, value=item.value, key=item.key, headers=HEADERS,
                    timestamp_ms=int(now * 1000)))
                count += 1
            if len(pending) > 2_000:
                done = [future for future in pending if future.done()]
                for future in done:
                    future.result()
                pending = [future for future in pending if not future.done()]
            await asyncio.sleep(0.002)
        await asyncio.gather(*pending)
        return count, time.monotonic() - started


@dataclass
class Seen:
    """Output records observed in one phase."""

    seen_at: list[float] = field(default_factory=list)     # epoch seconds, when read
    record_ts: list[float] = field(default_factory=list)   # epoch seconds, record timestamp
    trigger_ids: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)
    unique: set[str] = field(default_factory=set)
    bytes_total: int = 0
    dead_letters: int = 0
    #: only outputs whose trigger id starts with this count; others are "foreign"
    prefix: str = ""
    foreign: int = 0
    foreign_examples: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.record_ts)

    @property
    def done(self) -> int:
        """Distinct inputs accounted for: unique outputs (all outputs if unparsed) + dead letters."""
        return (len(self.unique) if self.unique else self.count) + self.dead_letters

    @property
    def duplicates(self) -> int:
        return self.count - len(self.unique) if self.unique else 0


class Observer:
    """Reads output (and dead-letter) topics from their current end, in the background."""

    def __init__(self, settings: Settings, topics: list[str], dead_letter_topics: list[str],
                 parse: bool = True, keep_ids: bool = True) -> None:
        self._settings = settings
        self._keep_ids = keep_ids  # the per-record trigger id list (latency); off for big drains
        self._topics = topics
        self._dead_letter_topics = dead_letter_topics
        self._parse = parse
        self._consumer = AIOKafkaConsumer(
            **connection_options(settings), enable_auto_commit=False, group_id=None,
            fetch_max_wait_ms=10, max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024)
        self._task: asyncio.Task[None] | None = None
        self.seen = Seen()

    async def start(self) -> None:
        await self._consumer.start()
        partitions = []
        for topic in [*self._topics, *self._dead_letter_topics]:
            for partition in self._consumer.partitions_for_topic(topic) or {0}:
                partitions.append(TopicPartition(topic, partition))
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for partition in partitions:  # resolve the end offsets now, before anything is sent
            await self._consumer.position(partition)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def reset(self, prefix: str = "") -> Seen:
        """Start a new tally (the reader keeps its position); returns the previous one.

        With ``prefix``, outputs of other messages (another phase's, a republished
        event) are counted apart and left out of the figures.
        """
        previous, self.seen = self.seen, Seen(prefix=prefix)
        return previous

    async def _read(self) -> None:
        dead = set(self._dead_letter_topics)
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=10_000)
            now = time.time()
            seen = self.seen
            for partition, records in batches.items():
                if partition.topic in dead:
                    seen.dead_letters += len(records)
                    continue
                for record in records:
                    if self._parse:
                        event = json.loads(record.value)
                        trigger = (event.get("data") or {}).get("trigger") or {}
                        trigger_id = trigger.get("id") or event.get("id", "")
                        if not trigger_id.startswith(seen.prefix):
                            seen.foreign += 1
                            if len(seen.foreign_examples) < 10:
                                seen.foreign_examples.append(
                                    f"{partition.topic}/{partition.partition}@{record.offset}:"
                                    f"{trigger_id}:{record.timestamp}")
                            continue
                        kind = event.get("type", "?")
                        seen.types[kind] = seen.types.get(kind, 0) + 1
                        if self._keep_ids:
                            seen.trigger_ids.append(trigger_id)
                        seen.unique.add(trigger_id)
                    seen.seen_at.append(now)
                    seen.record_ts.append(record.timestamp / 1000)
                    seen.bytes_total += len(record.value or b"")
