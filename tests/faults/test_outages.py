"""Outages of the servers under a running service: PostgreSQL crashed for 30 s, the broker
frozen for 20 s while the outbox relay publishes. The service waits them out in place."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from tests.faults.conftest import FaultStack
from tests.faults.harness import (
    Deployment,
    Publisher,
    Record,
    ServiceProcess,
    Workload,
    assert_never_lost_never_duplicated,
    collect,
    drained,
    eventually,
    processed,
)

pytestmark = pytest.mark.faults
SEED = 20_261_122

Replicas = Callable[..., ServiceProcess]


async def test_postgres_crashed_for_30_s_mid_stream_is_waited_out_without_skips_or_dead_letters(
        deployment: Deployment, replicas: Replicas, fault_stack: FaultStack) -> None:
    workload = Workload(deployment.topics, messages=1_200, invoices=30, seed=SEED)
    total = len(workload.messages)
    service = replicas()
    await service.start_ready()
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish(workload.invoices)
        # the stream goes on before, during and after the outage
        feed = asyncio.create_task(publisher.publish_paced(workload.commands, over_s=45))
        await asyncio.sleep(8)
        before_outage = await processed(deployment)
        fault_stack.postgres.kill()  # pg_ctl stop -m immediate: a crash
        try:
            await asyncio.sleep(30)
            assert service.alive, f"the service died during the outage:\n{service.describe()}"
        finally:
            fault_stack.postgres.start()  # crash recovery, same port
        await feed
    await drained(deployment, total, 180, [service])

    assert 0 < before_outage < total, "the outage came mid-stream"
    assert service.alive and service.kills == 0 and len(service.log_files) == 1
    assert service.log_lines("processing failed, will retry"), (
        "the outage never reached the consumers")
    dead_letters = await collect(deployment, [deployment.dlq(topic)
                                              for topic in deployment.topics.inputs()])
    assert dead_letters == [], "nothing is dead-lettered for an outage"
    await assert_never_lost_never_duplicated(
        deployment, workload.messages, invoices=workload.expected_invoices(),
        services=[service])
    assert service.terminate() == 0, "after the outage it still stops cleanly on SIGTERM"


def issued_numbers_in_offset_order(records: list[Record], topic: str) -> dict[str, list[str]]:
    """Per invoice: the numbers of its credit notes in the order they first appear."""
    numbers: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for record in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        if record.topic == topic and record.id not in seen:
            seen.add(record.id)
            event = record.event
            if event["type"] == "credit_note.issued":
                numbers[event["data"]["invoice_id"]].append(event["data"]["number"])
    return numbers


async def test_broker_frozen_for_20_s_while_the_relay_publishes_loses_nothing_and_keeps_order(
        deployment: Deployment, replicas: Replicas, fault_stack: FaultStack) -> None:
    workload = Workload(deployment.topics, messages=900, invoices=15, seed=SEED + 3)
    # small relay batches keep the relay at work on the burst for a few seconds
    # the burst before the freeze; the rest after the broker came back (in order: each
    # invoice's later messages after its earlier ones), which the consumers must then apply
    # and the relay publish, however fast the burst itself was applied
    burst, after = workload.commands[:600], workload.commands[600:]
    service = replicas(OUTBOX_BATCH_SIZE="10")
    await service.start_ready()
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish(workload.invoices)

        async def invoices_in() -> bool:
            return await processed(deployment) >= len(workload.invoices)

        await eventually(invoices_in, 60, "the invoices")
        await publisher.publish(burst)

        async def relay_busy() -> bool:
            [row] = await deployment.fetch(
                "SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published, "
                "count(*) FILTER (WHERE published_at IS NULL) AS waiting FROM outbox")
            return bool(row["published"] >= 50 and row["waiting"] > 0)

        await eventually(relay_busy, 60, "the relay to be publishing the burst",
                         interval_s=0.05)
        [paused_at] = await deployment.fetch("SELECT now() AS t")
        fault_stack.kafka.pause()  # SIGSTOP: connections stay open, nothing answers
        started = time.monotonic()
        try:
            await asyncio.sleep(20)
        finally:
            fault_stack.kafka.resume()
        paused_for = time.monotonic() - started
        [resumed_at] = await deployment.fetch("SELECT now() AS t")
        await publisher.publish(after)
    await drained(deployment, len(workload.messages), 180, [service])

    assert paused_for >= 20
    [row] = await deployment.fetch(
        "SELECT count(*) AS n FROM outbox WHERE created_at < $1 AND published_at >= $1",
        resumed_at["t"])
    assert row["n"] > 0, "no event waited out the frozen broker: the fault missed the relay"
    # the stream went on: every message sent after the resume was taken in after it (and
    # assert_never_lost_never_duplicated below checks each one's effect and output, once)
    # (a message sent again after the resume whose first copy came before it is left out)
    fresh = {message.id for message in after} - {message.id for message in burst}
    [row] = await deployment.fetch(
        "SELECT count(*) AS n FROM processed_messages WHERE id = ANY($1::text[])"
        " AND processed_at >= $2", sorted(fresh), resumed_at["t"])
    assert fresh and row["n"] == len(fresh), "the stream did not go on after the resume"
    [row] = await deployment.fetch(
        "SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published, count(*) AS n"
        " FROM outbox WHERE created_at >= $1", resumed_at["t"])
    assert row["n"] > 0 and row["published"] == row["n"], "the relay stopped after the resume"
    assert paused_at["t"] < resumed_at["t"]
    assert service.alive and service.kills == 0
    records = await assert_never_lost_never_duplicated(
        deployment, workload.messages, invoices=workload.expected_invoices(),
        services=[service])
    for invoice_id, numbers in issued_numbers_in_offset_order(
            records, deployment.topics.credit_note_events).items():
        assert numbers == sorted(numbers), f"{invoice_id}: published out of order: {numbers}"
    assert service.terminate() == 0, "after the freeze it still stops cleanly on SIGTERM"
