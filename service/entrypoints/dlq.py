"""``creditnotes dlq list|show|replay``: ops tooling for dead-letter topics.

- ``list`` and ``show`` read a dead-letter topic from its beginning without
  committing anything (looking never changes what a replay will do).
- ``replay`` republishes matching records, unchanged but for the ``dlq.*``
  headers, to the topic they came from, under its own consumer group
  (``<group>.dlq-replay``). Each record is committed on the dead-letter topic
  only after the broker acknowledged the republished copy, and recorded in the
  ``dlq_replays`` table; a record already recorded there is never republished,
  so replaying the same records twice has no second effect (and the service
  itself ignores an upstream event it has already applied).
- Filters (``--reason``, ``--since``, ``--key``) select records. A record a
  filter leaves out stays replayable: the replay group's committed offset
  never moves past it, and later records are kept apart by the audit table.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from service.adapters.kafka_producer import KafkaProducer, connection_options
from service.adapters.replay_audit import ReplayAudit, ReplayedRecord
from service.settings import Settings


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return None

    @property
    def reason(self) -> str:
        return self.header("dlq.error.reason") or "?"

    @property
    def failed_at(self) -> datetime | None:
        text = self.header("dlq.failed_at")
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
        except ValueError:
            return None

    @property
    def key_text(self) -> str:
        return self.key.decode("utf-8", "replace") if self.key is not None else ""

    def original_headers(self) -> list[tuple[str, bytes]]:
        return [(name, value) for name, value in self.headers if not name.startswith("dlq.")]


@dataclass(frozen=True)
class Filters:
    reason: str | None = None
    since: datetime | None = None
    key: str | None = None

    def match(self, record: DeadLetter) -> bool:
        if self.reason is not None and record.reason != self.reason:
            return False
        if self.key is not None and record.key_text != self.key:
            return False
        if self.since is not None:
            failed_at = record.failed_at
            if failed_at is None or failed_at < self.since:
                return False
        return True


async def read_all(settings: Settings, dlq_topic: str) -> list[DeadLetter]:
    """Every record now on ``dlq_topic``, without joining a group or committing."""
    consumer = AIOKafkaConsumer(**connection_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = _partitions(consumer, dlq_topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        return await _read_until(consumer, ends)
    finally:
        await consumer.stop()


def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise SystemExit(f"creditnotes dlq: no topic {topic!r} on the broker")
    return [TopicPartition(topic, partition) for partition in sorted(found)]


async def _read_until(consumer: AIOKafkaConsumer,
                      ends: dict[TopicPartition, int]) -> list[DeadLetter]:
    """Everything from the current positions to the end of each partition.

    Reads past the reported end offsets until the broker has nothing more:
    some Kafka-protocol brokers (tansu) report the end of the last record
    batch's first record, not of its last.
    """
    records: list[DeadLetter] = []
    while True:
        batches = await consumer.getmany(*ends, timeout_ms=500)
        for batch in batches.values():
            records.extend(DeadLetter(record.partition, record.offset, record.timestamp,
                                      record.key, record.value, tuple(record.headers))
                           for record in batch)
        if not batches and all([await consumer.position(tp) >= end
                                for tp, end in ends.items()]):
            break
    records.sort(key=lambda record: (record.partition, record.offset))
    return records


def list_table(dlq_topic: str, records: Iterable[DeadLetter]) -> Table:
    table = Table(title=f"{dlq_topic}", title_justify="left")
    for column in ("partition:offset", "failed at", "reason", "from", "key", "attempts",
                   "message"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            f"{record.partition}:{record.offset}", record.header("dlq.failed_at") or "",
            record.reason,
            f"{record.header('dlq.original.topic')}[{record.header('dlq.original.partition')}]"
            f"@{record.header('dlq.original.offset')}",
            record.key_text, record.header("dlq.attempts") or "",
            (record.header("dlq.error.message") or "")[:120])
    return table


def show_panel(record: DeadLetter) -> Panel:
    headers = Table.grid(padding=(0, 2))
    for name, value in record.headers:
        headers.add_row(name, value.decode("utf-8", "replace"))
    body = record.value.decode("utf-8", "replace") if record.value is not None else "(no value)"
    with contextlib.suppress(ValueError):
        body = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    table = Table.grid(padding=(0, 1))
    table.add_row("key", record.key_text)
    table.add_row("timestamp", str(record.timestamp))
    table.add_row("headers", headers)
    table.add_row("value", body)
    return Panel(table, title=f"partition {record.partition}, offset {record.offset}: "
                              f"{record.reason}", title_align="left")


@dataclass
class ReplaySummary:
    republished: int = 0
    already_replayed: int = 0
    filtered_out: int = 0
    unreplayable: int = 0
    would_replay: list[DeadLetter] = field(default_factory=list)


async def replay(settings: Settings, dlq_topic: str, filters: Filters, *, dry_run: bool,
                 console: Console) -> ReplaySummary:
    """Republish matching dead letters to their original topics, each exactly once."""
    summary = ReplaySummary()
    group = f"{settings.consumer_group}.dlq-replay"
    consumer = AIOKafkaConsumer(**connection_options(settings), group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = KafkaProducer(settings)
    connection = await asyncpg.connect(settings.database_url)
    audit = ReplayAudit(connection, run=secrets.token_hex(6), operator=getpass.getuser())
    await consumer.start()
    try:
        partitions = _partitions(consumer, dlq_topic)
        consumer.assign(partitions)
        for tp in partitions:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        ends = await consumer.end_offsets(partitions)
        records = await _read_until(consumer, ends)
        if not dry_run:
            await producer.start()
        can_commit = dict.fromkeys(partitions, True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(f"replaying {dlq_topic}", total=len(records))
            for record in records:
                tp = TopicPartition(dlq_topic, record.partition)
                outcome = await _replay_one(record, dlq_topic, filters, dry_run, producer,
                                            audit, summary)
                if outcome == "kept":
                    can_commit[tp] = False
                elif not dry_run and can_commit[tp]:
                    await consumer.commit({tp: OffsetAndMetadata(record.offset + 1, "")})
                progress.advance(task)
    finally:
        await consumer.stop()
        if not dry_run:
            await producer.stop()
        await connection.close()
    return summary


async def _replay_one(record: DeadLetter, dlq_topic: str, filters: Filters, dry_run: bool,
                      producer: KafkaProducer, audit: ReplayAudit,
                      summary: ReplaySummary) -> str:
    """Returns "done" (replayed now or before) or "kept" (left for a later replay)."""
    if await audit.replayed_before(dlq_topic, record.partition, record.offset):
        summary.already_replayed += 1
        return "done"
    if not filters.match(record):
        summary.filtered_out += 1
        return "kept"
    original = record.header("dlq.original.topic")
    if not original:
        summary.unreplayable += 1
        return "kept"
    if dry_run:
        summary.would_replay.append(record)
        return "kept"
    await producer.send(original, value=record.value, key=record.key,
                        headers=record.original_headers(), timestamp_ms=None)
    partition = record.header("dlq.original.partition")
    offset = record.header("dlq.original.offset")
    await audit.record(ReplayedRecord(
        dlq_topic=dlq_topic, dlq_partition=record.partition, dlq_offset=record.offset,
        original_topic=original, original_partition=int(partition) if partition else None,
        original_offset=int(offset) if offset else None, reason=record.reason,
        record_key=record.key_text or None))
    summary.republished += 1
    return "done"
