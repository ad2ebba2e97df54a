"""Shards under faults: several crediting batches in flight per replica, partitions moved in
the middle of a batch, a replica added and another killed. Nothing lost, nothing applied
twice, every invoice's events in order, ``creditnotes verify`` clean.

The workloads are random mixes (``Workload``: credits, line credits, voids, rejections, SLA
breaches, payments and their duplicates, refunds and their outcomes), from a seed drawn for
each run and named in any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.faults.harness import (
    SOURCE,
    Deployment,
    Publisher,
    ServiceProcess,
    Workload,
    assert_never_lost_never_duplicated,
    drained,
    eventually,
    processed,
)

pytestmark = pytest.mark.faults

Replicas = Callable[..., ServiceProcess]


@contextlib.asynccontextmanager
async def seeded() -> AsyncIterator[int]:
    """A fresh seed, named in the failure of whatever runs with it."""
    seed = random.SystemRandom().randrange(1_000_000)
    try:
        yield seed
    except AssertionError as error:
        raise AssertionError(f"[seed {seed}] {error}") from error


def processed_records(service: ServiceProcess, topics: set[str] | None = None,
                      after: str = "") -> set[tuple[str, int, int]]:
    """(topic, partition, offset) of every record this replica logged as processed."""
    return {(entry["topic"], entry["partition"], entry["offset"])
            for entry in service.log_lines("message processed")
            if (topics is None or entry["topic"] in topics) and entry["timestamp"] > after}


def crediting_topics(deployment: Deployment) -> set[str]:
    topics = deployment.topics
    return set(topics.inputs()) - {topics.invoices, topics.refund_results}


async def lock_waiters(deployment: Deployment) -> int:
    """Backends of this test's database waiting for a row lock."""
    database = deployment.database_url.rsplit("/", 1)[1]
    [row] = await deployment.fetch(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1"
        " AND wait_event_type = 'Lock'", database)
    return int(row["n"])


async def test_several_shards_of_a_replica_apply_a_random_mix_once_each_in_order(
        deployment: Deployment, replicas: Replicas) -> None:
    async with seeded() as seed:
        shards = random.Random(seed).randint(2, 6)
        workload = Workload(deployment.topics, messages=800, invoices=40, seed=seed, tag="s")
        service = replicas("replica-a", CONSUMER_SHARDS=str(shards))
        await service.start_ready()
        async with Publisher(deployment.bootstrap_servers) as publisher:
            await publisher.publish(workload.invoices)
            await publisher.publish(workload.commands)
        await drained(deployment, len(workload.messages), 90, [service])

        crediting = crediting_topics(deployment)
        partitions = {(topic, partition) for topic, partition, _ in
                      processed_records(service, crediting)}
        await assert_never_lost_never_duplicated(
            deployment, workload.messages, invoices=workload.expected_invoices(),
            services=[service])
        assert len(partitions) > shards, "the mix reached only a few partitions"


async def committed_offsets(deployment: Deployment,
                            partitions: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The group's committed offsets (read without joining the group)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.bootstrap_servers,
                                group_id=deployment.group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {(topic, partition): await consumer.committed(TopicPartition(topic, partition))
                or -1 for topic, partition in sorted(partitions)}
    finally:
        await consumer.stop()


async def test_partitions_moved_in_the_middle_of_a_batch_wait_for_it_and_nothing_is_redone(
        deployment: Deployment, replicas: Replicas) -> None:
    """Replica a's shard owning one invoice is stuck in its transaction (the test holds the
    invoice's row lock) when replica b joins and the group takes every partition back. The
    shard's listener holds the rebalance until the batch and its offset commit are done (the
    lock is released once a logs the revocation): its commit is not deadlocked by the
    rebalance (it is committed when the wait ends), b starts after the batch, and no
    crediting record is processed by both replicas."""
    async with seeded() as seed:
        workload = Workload(deployment.topics, messages=600, invoices=20, seed=seed, tag="m")
        commands = workload.commands
        first, second = commands[:len(commands) // 2], commands[len(commands) // 2:]
        # a longer session: the listener waits at most that long, the test must act within it
        slow = {"KAFKA_SESSION_TIMEOUT_MS": "8000", "KAFKA_HEARTBEAT_INTERVAL_MS": "500"}
        a = replicas("replica-a", **slow)
        b = replicas("replica-b", **slow)
        await a.start_ready()
        crediting = crediting_topics(deployment)
        stuck = random.Random(seed).choice(workload.plans).id
        holder: asyncpg.Connection | None = None
        async with Publisher(deployment.bootstrap_servers) as publisher:
            try:
                await publisher.publish(workload.invoices)
                await drained(deployment, len(workload.invoices), 30, [a])
                holder = await asyncpg.connect(deployment.database_url)
                await holder.execute("BEGIN")
                await holder.execute("SELECT 1 FROM invoices WHERE id = $1 FOR UPDATE", stuck)
                await publisher.publish(first)

                async def blocked() -> bool:
                    return await lock_waiters(deployment) >= 1
                await eventually(blocked, 30, f"a batch waiting for {stuck}'s lock")

                b.start()

                async def revoked() -> bool:
                    return any(entry["shard"].startswith("crediting-")
                               for entry in a.log_lines("partitions revoked mid-batch"))
                await eventually(revoked, 30, "a's stuck shard to be asked for its partitions",
                                 lambda: _describe(a, b))
                await holder.execute("COMMIT")
            finally:
                if holder is not None:
                    await holder.close()

            def crediting_lines(event: str) -> list[dict[str, Any]]:
                return [entry for entry in a.log_lines(event)
                        if entry["shard"].startswith("crediting-")]

            async def finished() -> bool:
                ended = (crediting_lines("batch finished before its partitions moved")
                         + crediting_lines("partitions moved before the batch finished"))
                return len(ended) == len(crediting_lines("partitions revoked mid-batch"))
            await eventually(finished, 30, "a's batches to finish", lambda: _describe(a, b))
            handed_over = max(entry["timestamp"] for entry in crediting_lines(
                "batch finished before its partitions moved"))
            before = [entry for entry in a.log_lines("message processed")
                      if entry["topic"] in crediting and entry["timestamp"] <= handed_over]
            last: dict[tuple[str, int], int] = {}
            for entry in before:
                key = (entry["topic"], entry["partition"])
                last[key] = max(last.get(key, -1), entry["offset"])
            committed = await committed_offsets(deployment, set(last))
            await b.wait_ready()
            await publisher.publish(second)
        await drained(deployment, len(workload.messages), 90, [a, b])

        waits = [entry for entry in a.log_lines("partitions revoked mid-batch")
                 if entry["shard"].startswith("crediting-")]
        gave_up = [entry for entry in a.log_lines("partitions moved before the batch finished")
                   if entry["shard"].startswith("crediting-")]
        uncommitted = a.log_lines("offsets not committed")
        twice = processed_records(a, crediting) & processed_records(b, crediting)
        await assert_never_lost_never_duplicated(
            deployment, workload.messages, invoices=workload.expected_invoices(),
            services=[a, b])
        assert len(waits) >= 1 and gave_up == [] and uncommitted == [], (waits, gave_up)
        assert any(entry["invoice_id"] == stuck for entry in before), "the stuck batch ran"
        assert {key: committed[key] > offset for key, offset in last.items()} == dict.fromkeys(
            last, True), f"not committed by the handover: {committed} vs processed {last}"
        assert processed_records(b, crediting), "b took over no crediting partition"
        assert twice == set(), f"records processed by both replicas: {sorted(twice)[:10]}"


async def test_a_replica_added_then_another_killed_mid_stream_loses_nothing_and_keeps_order(
        deployment: Deployment, replicas: Replicas) -> None:
    async with seeded() as seed:
        rng = random.Random(seed)
        workload = Workload(deployment.topics, messages=1_200, invoices=30, seed=seed, tag="k")
        total = len(workload.messages)
        a, b = replicas("replica-a"), replicas("replica-b")
        await a.start_ready()
        crediting = crediting_topics(deployment)
        async with Publisher(deployment.bootstrap_servers) as publisher:
            await publisher.publish(workload.invoices)
            feed = asyncio.create_task(publisher.publish_paced(workload.commands, over_s=25))
            await asyncio.sleep(rng.uniform(2, 4))
            await b.start_ready()

            async def b_working() -> bool:
                return bool(processed_records(b, crediting))
            await eventually(b_working, 30, "b to process crediting records",
                             lambda: _describe(a, b))
            await asyncio.sleep(rng.uniform(0, 2))
            assert not feed.done(), "the stream had ended before the kill"
            a.kill()
            killed_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            await feed
        await drained(deployment, total, 120, [a, b])

        taken_over = processed_records(b, crediting, after=killed_at)
        assert processed_records(a, crediting), "a processed no crediting record before the kill"
        assert b.alive
        await assert_never_lost_never_duplicated(
            deployment, workload.messages, invoices=workload.expected_invoices(),
            services=[a, b])
        assert await processed(deployment, SOURCE) == total
        assert taken_over, "b processed no crediting record after a was killed"


async def _describe(*services: ServiceProcess) -> str:
    return "\n".join(service.describe() for service in services)
