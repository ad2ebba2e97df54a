"""Shards: several crediting batches in flight per replica, each owning the same partition
numbers on every crediting topic (range assignment), and a pool sized for them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError
from structlog.testing import capture_logs

from service.devtools.devstack import DEV_PARTITIONS, create_topics
from service.entrypoints import subscribers
from service.entrypoints.consumer import Pipeline
from service.entrypoints.translators import Route
from service.settings import Settings, pool_needed
from tests.support import RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration


class Idle:
    """A pipeline that takes every batch and does nothing (only the assignment matters)."""

    def __init__(self) -> None:
        #: (topic, partition, offset) of every record handed over, across its subscribers
        self.taken: set[tuple[str, int, int]] = set()

    def for_another_consumer(self) -> Idle:
        return self

    async def process_batch(self, records: Any) -> None:
        self.taken.update((record.topic, record.partition, record.offset) for record in records)


def table(settings: Settings) -> Mapping[str, Route]:
    return cast(Mapping[str, Route], dict.fromkeys(settings.topics.inputs()))


def crediting(settings: Settings) -> list[str]:
    topics = settings.topics
    return [topic for topic in topics.inputs()
            if topic not in (topics.invoices, topics.refund_results)]


class Replica:
    """One replica's subscribers (the service's own ``start_subscribers``), in this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker = subscribers.broker(settings)
        self.subscribers: list[Any] = []
        self.pipeline = Idle()

    async def start(self) -> None:
        await self.broker.start()
        self.subscribers = await subscribers.start_subscribers(
            self.broker, table(self.settings), cast(Pipeline, self.pipeline), self.settings)

    async def stop(self) -> None:
        await self.broker.stop()

    def shard_consumers(self) -> list[AIOKafkaConsumer]:
        names = set(crediting(self.settings))
        return [subscriber.consumer for subscriber in self.subscribers
                if set(subscriber.topic_names) == names and subscriber.consumer is not None]


def owned(consumer: AIOKafkaConsumer) -> dict[str, set[int]]:
    partitions: dict[str, set[int]] = {}
    for tp in consumer.assignment():
        partitions.setdefault(tp.topic, set()).add(tp.partition)
    return partitions


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        await replica.stop()


async def settled_assignment(group: list[Replica], topics: list[str],
                             timeout_s: float = 45.0) -> list[dict[str, set[int]]]:
    """Each shard's partitions, once every partition of every crediting topic has exactly
    one owner and the assignment stayed so for a second."""
    deadline = time.monotonic() + timeout_s
    last: list[dict[str, set[int]]] | None = None
    while True:
        shards = [owned(consumer) for replica in group for consumer in replica.shard_consumers()]
        counts = {topic: sorted(p for shard in shards for p in shard.get(topic, ()))
                  for topic in topics}
        complete = all(parts == list(range(DEV_PARTITIONS)) for parts in counts.values())
        if complete and shards == last:
            return shards
        last = shards if complete else None
        if time.monotonic() > deadline:
            raise AssertionError(f"no stable assignment in {timeout_s} s: {shards}")
        await asyncio.sleep(1.0)


async def test_every_shard_owns_the_same_partition_numbers_on_every_crediting_topic(
        settings: Settings, replicas: list[Replica]) -> None:
    # two replicas of three shards: 6 members share 8 partitions of each of 5 topics
    sharded = settings.model_copy(update={"consumer_shards": 3})
    for _ in range(2):
        replica = Replica(sharded)
        replicas.append(replica)
        await replica.start()
    topics = crediting(sharded)

    shards = await settled_assignment(replicas, topics)

    assert len(shards) == 6
    for shard in shards:
        assert set(shard) == set(topics), shard  # every shard reads every crediting topic
        numbers = {frozenset(partitions) for partitions in shard.values()}
        assert len(numbers) == 1, f"a shard holds different partitions per topic: {shard}"
    # every shard got work (8 partitions over 6 members: 2, 2, 1, 1, 1, 1)
    assert sorted(len(next(iter(shard.values()))) for shard in shards) == [1, 1, 1, 1, 2, 2]
    # the invoices and refund-results consumers are in the same group, on the same protocol
    for replica in replicas:
        assert len(replica.subscribers) == 2 + 3


# --- rolling upgrades: a group of old (round robin only) and new members -------------------


def protocols_chosen(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The protocols the group's leaders assigned with, from aiokafka's log (tansu's
    DescribeGroups leaves the protocol empty)."""
    prefix = "Elected group leader -- performing partition assignments using "
    return {record.getMessage().removeprefix(prefix) for record in caplog.records
            if record.getMessage().startswith(prefix)}


async def test_a_replica_of_the_previous_release_and_a_new_one_share_the_group(
        settings: Settings, replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    """A rolling upgrade: the previous release's member offers only aiokafka's default round
    robin; a new replica (range first, round robin second) joins the same group and is not
    refused. Both get partitions and both consume what lands on them, and nothing is
    consumed twice: the group fell back to round robin, the protocol both support."""
    caplog.set_level(logging.INFO, logger="aiokafka.consumer.group_coordinator")
    topics = crediting(settings)
    old = AIOKafkaConsumer(*topics, bootstrap_servers=settings.kafka_bootstrap_servers,
                           group_id=settings.consumer_group, auto_offset_reset="earliest",
                           enable_auto_commit=False,
                           session_timeout_ms=settings.kafka_session_timeout_ms,
                           heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms)
    await old.start()
    try:
        await old.getmany(timeout_ms=100)  # joins the group before the new replica
        new = Replica(settings.model_copy(update={"consumer_shards": 1}))
        replicas.append(new)
        await new.start()

        deadline = time.monotonic() + 45
        while True:
            old_owns = owned(old)
            new_owns = [owned(consumer) for consumer in new.shard_consumers()]
            every = sorted((topic, p) for shard in [old_owns, *new_owns]
                           for topic, parts in shard.items() for p in parts)
            if old_owns and all(new_owns) and every == sorted(
                    (topic, p) for topic in topics for p in range(DEV_PARTITIONS)):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no shared assignment: old {old_owns}, new {new_owns}")
            await old.getmany(timeout_ms=200)

        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    enable_idempotence=False, acks="all")
        await producer.start()
        try:
            for topic in topics:
                for partition in range(DEV_PARTITIONS):
                    await producer.send_and_wait(topic, b"{}", partition=partition)
        finally:
            await producer.stop()
        old_took: set[tuple[str, int, int]] = set()
        deadline = time.monotonic() + 30
        while len(old_took) + len(new.pipeline.taken) < len(topics) * DEV_PARTITIONS:
            if time.monotonic() > deadline:
                break
            fetched = await old.getmany(timeout_ms=200)
            old_took.update((r.topic, r.partition, r.offset)
                            for records in fetched.values() for r in records)
    finally:
        await old.stop()

    assert protocols_chosen(caplog) == {"roundrobin"}
    assert old_took and new.pipeline.taken, "one of the two members consumed nothing"
    assert not old_took & new.pipeline.taken, "a record was consumed by both"
    assert {(t, p) for t, p, _ in old_took} == {(t, p) for t, parts in old_owns.items()
                                                 for p in parts}
    assert len(old_took | new.pipeline.taken) == len(topics) * DEV_PARTITIONS


async def test_a_group_of_new_replicas_agrees_on_range(
        settings: Settings, replicas: list[Replica], caplog: pytest.LogCaptureFixture) -> None:
    """Replicas of this release offer round robin too, yet alone in a group they get range
    (each shard the same partition numbers on every crediting topic)."""
    caplog.set_level(logging.INFO, logger="aiokafka.consumer.group_coordinator")
    for _ in range(2):
        replica = Replica(settings.model_copy(update={"consumer_shards": 2}))
        replicas.append(replica)
        await replica.start()
    shards = await settled_assignment(replicas, crediting(settings))
    assert len(shards) == 4
    for shard in shards:
        assert len({frozenset(partitions) for partitions in shard.values()}) == 1, shard
    assert protocols_chosen(caplog) == {"range"}


async def test_crediting_topics_of_different_partition_counts_are_reported_once_at_start(
        settings: Settings, replicas: list[Replica]) -> None:
    odd = settings.model_copy(update={"topic_returns": settings.topic_returns + "-odd",
                                      "consumer_shards": 2})
    await create_topics(odd.kafka_bootstrap_servers, [odd.topic_returns], partitions=3)
    replica = Replica(odd)
    replicas.append(replica)

    with capture_logs() as logs:
        await replica.start()

    warnings = [entry for entry in logs
                if entry["event"] == "crediting topics' partition counts differ"]
    assert len(warnings) == 1, logs
    assert warnings[0]["partitions"][odd.topic_returns] == 3
    assert warnings[0]["partitions"][odd.topic_credit_note_commands] == DEV_PARTITIONS


async def test_aligned_topics_start_without_that_warning(
        settings: Settings, replicas: list[Replica]) -> None:
    replica = Replica(settings)
    replicas.append(replica)
    with capture_logs() as logs:
        await replica.start()
    assert [entry for entry in logs if "partition counts" in entry["event"]] == []
    assert len(replica.subscribers) == 2 + settings.consumer_shards


# --- several batches in flight --------------------------------------------------------------


async def lock_waiters(settings: Settings) -> int:
    """Service backends of this test's database waiting for a row lock."""
    database = settings.database_url.rsplit("/", 1)[1]
    [row] = await fetch(settings, "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1"
                                  " AND wait_event_type = 'Lock'", database)
    return int(row["n"])


async def until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_shard_blocked_in_its_transaction_leaves_the_other_shards_applying(
        settings: Settings) -> None:
    """The shard of partition 0 waits in its transaction on a row lock the test holds; the
    shard of partition 7 (4 shards on 8 partitions: another one) meanwhile applies and commits
    its own: two shard transactions at once, seen in PostgreSQL. With one crediting consumer
    the second credit would wait behind the first."""
    assert settings.consumer_shards == 4
    topics = settings.topics
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_idempotence=False, acks="all")
    await producer.start()
    holder: asyncpg.Connection | None = None
    try:
        async def send(topic: str, event: dict[str, Any], key: str,
                       partition: int | None = None) -> None:
            await producer.send_and_wait(topic, json.dumps(event).encode(), key=key.encode(),
                                         partition=partition, headers=[
                                             ("content-type", b"application/cloudevents+json")])

        async with RunningService(settings):
            for invoice in ("in_a", "in_b"):
                await send(topics.invoices, cloudevent("invoice.finalized",
                                                       invoice_data(invoice)), invoice)

            async def finalized() -> bool:
                row = await fetchrow(settings, "SELECT count(*) AS n FROM invoices")
                return row is not None and row["n"] == 2
            await until(finalized, 30, "both invoices")

            holder = await asyncpg.connect(settings.database_url)
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM invoices WHERE id = 'in_a' FOR UPDATE")
            await send(topics.credit_note_commands, cloudevent(
                "credit_note.issue", {"invoice_id": "in_a", "amount": 100}, id_="cmd-a"),
                "in_a", partition=0)

            async def blocked() -> bool:
                return await lock_waiters(settings) == 1
            await until(blocked, 30, "cmd-a's transaction to wait for in_a's lock")

            await send(topics.credit_note_commands, cloudevent(
                "credit_note.issue", {"invoice_id": "in_b", "amount": 100}, id_="cmd-b"),
                "in_b", partition=DEV_PARTITIONS - 1)

            async def applied(event_id: str) -> bool:
                return await fetchrow(settings, "SELECT 1 FROM processed_messages "
                                                "WHERE id = $1", event_id) is not None
            await until(lambda: applied("cmd-b"), 30, "another shard to apply cmd-b")
            still_blocked = await lock_waiters(settings)
            a_before_release = await applied("cmd-a")

            await holder.execute("COMMIT")
            await until(lambda: applied("cmd-a"), 30, "cmd-a once the lock is released")
    finally:
        if holder is not None:
            await holder.close()
        await producer.stop()

    assert still_blocked == 1, "cmd-a's transaction was still open when cmd-b's committed"
    assert not a_before_release
    notes = await fetch(settings, "SELECT invoice_id FROM credit_notes ORDER BY invoice_id")
    assert [row["invoice_id"] for row in notes] == ["in_a", "in_b"]


# --- the pool ---------------------------------------------------------------------------------


def test_a_pool_too_small_for_the_shards_is_refused_naming_both_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITNOTES_CONSUMER_SHARDS", "8")
    monkeypatch.setenv("CREDITNOTES_DATABASE_POOL_SIZE", "10")
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    message = str(refused.value)
    assert "CREDITNOTES_DATABASE_POOL_SIZE (10)" in message
    assert "CREDITNOTES_CONSUMER_SHARDS (8)" in message
    assert f"at least {pool_needed(8)}" in message

    monkeypatch.setenv("CREDITNOTES_DATABASE_POOL_SIZE", str(pool_needed(8)))
    assert Settings(_env_file=None).consumer_shards == 8


def test_the_defaults_fit_and_shards_are_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings(_env_file=None)
    assert (defaults.consumer_shards, defaults.database_pool_size) == (4, 10)
    assert defaults.database_pool_size >= pool_needed(defaults.consumer_shards)
    monkeypatch.setenv("CREDITNOTES_CONSUMER_SHARDS", "0")
    with pytest.raises(ValidationError, match="consumer_shards"):
        Settings(_env_file=None)
