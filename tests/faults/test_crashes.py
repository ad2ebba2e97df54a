"""Crashed service processes: ``kill -9`` at random moments, between publishing and marking
the outbox, between a credit note's commit and its refund requests' publishing, and of one
replica out of three. Nothing is lost, nothing happens twice."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from service.domain.refunds import PaymentCash, refund_id_for
from tests.faults.harness import (
    INVOICE_TOTAL,
    SOURCE,
    Deployment,
    Publisher,
    ServiceProcess,
    Upstream,
    Workload,
    assert_never_lost_never_duplicated,
    backlog,
    cloudevent,
    collect,
    credit_note_id,
    creditnotes,
    drained,
    eventually,
    invoice_event,
    processed,
    refund_id,
)

pytestmark = pytest.mark.faults
SEED = 20_261_121

Replicas = Callable[..., ServiceProcess]


async def reached(deployment: Deployment, count: int, timeout_s: float,
                  services: list[ServiceProcess]) -> None:
    """Until the ledger holds at least ``count`` upstream events."""
    async def condition() -> bool:
        return await processed(deployment) >= count

    async def describe() -> str:
        return "\n".join(service.describe() for service in services)

    await eventually(condition, timeout_s, f"{count} messages processed", describe)


async def test_kill_9_at_random_moments_while_5000_messages_flow_applies_each_exactly_once(
        deployment: Deployment, replicas: Replicas) -> None:
    workload = Workload(deployment.topics, messages=5_000, invoices=100, seed=SEED)
    rng = random.Random(SEED)
    total = len(workload.messages)
    service = replicas()
    await service.start_ready()
    commands = workload.commands
    stretches = [commands[n * len(commands) // 7:(n + 1) * len(commands) // 7]
                 for n in range(7)]
    flowing_at_kill = []
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish(workload.invoices)
        for stretch in stretches[:-1]:  # six kills, each while a stretch is streaming in
            feed = asyncio.create_task(publisher.publish_paced(stretch, over_s=3, chunks=10))
            await asyncio.sleep(rng.uniform(0.3, 2.4))
            service.kill()
            flowing_at_kill.append(not feed.done())
            await feed
            await service.start_ready()
        await publisher.publish(stretches[-1])
    await drained(deployment, total, 240, [service])

    assert service.kills == 6 and all(flowing_at_kill), flowing_at_kill
    await assert_never_lost_never_duplicated(
        deployment, workload.messages, invoices=workload.expected_invoices(),
        services=[service])
    assert service.terminate() == 0


REFUSE_MARKING = """
CREATE FUNCTION faults_refuse_marking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fault injection: outbox rows may not be marked published';
END $$;
CREATE TRIGGER faults_refuse_marking BEFORE UPDATE ON outbox
    FOR EACH ROW EXECUTE FUNCTION faults_refuse_marking();
"""
ALLOW_MARKING = """
DROP TRIGGER faults_refuse_marking ON outbox;
DROP FUNCTION faults_refuse_marking();
"""


async def test_relay_killed_after_publishing_and_before_marking_republishes_the_same_events(
        deployment: Deployment, replicas: Replicas) -> None:
    workload = Workload(deployment.topics, messages=300, invoices=10, seed=SEED + 4)
    total = len(workload.messages)
    outputs = deployment.topics.outputs()
    await deployment.execute(REFUSE_MARKING)  # the broker acks, then marking fails
    service = replicas()
    await service.start_ready()
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish(workload.messages)
    await reached(deployment, total, 120, [service])
    outbox = {row["event_id"]: row["payload"] for row in await deployment.fetch(
        "SELECT event_id, payload::text AS payload FROM outbox")}

    async def published_but_never_marked() -> bool:
        seen = Counter(record.id for record in await collect(deployment, outputs))
        failures = service.log_lines("outbox relay interrupted, retrying")
        return len(failures) >= 3 and all(seen[event_id] >= 2 for event_id in outbox)

    await eventually(published_but_never_marked, 60,
                     "the relay to publish every event and fail to mark it, again and again")
    assert await backlog(deployment) == len(outbox)  # not one row marked
    before = await collect(deployment, outputs)
    service.kill()
    await deployment.execute(ALLOW_MARKING)
    await service.start_ready()
    await drained(deployment, total, 60, [service])

    records = await assert_never_lost_never_duplicated(
        deployment, workload.messages, invoices=workload.expected_invoices(),
        services=[service])
    earlier = {(record.topic, record.partition, record.offset) for record in before}
    republished = {record.id: record.value for record in records
                   if record.topic in outputs
                   and (record.topic, record.partition, record.offset) not in earlier}
    first_copies = {record.id: record.value for record in before}
    assert set(republished) == set(outbox), "every unmarked row is published again"
    for event_id, payload in outbox.items():
        assert republished[event_id] == first_copies[event_id] == payload.encode(), event_id
    assert await deployment.fetch("SELECT seq FROM outbox WHERE published_at IS NULL") == []


async def test_three_replicas_one_killed_mid_stream_apply_every_message_exactly_once(
        deployment: Deployment, replicas: Replicas) -> None:
    workload = Workload(deployment.topics, messages=1_500, invoices=30, seed=SEED + 5)
    total = len(workload.messages)
    group = [replicas(f"replica-{name}") for name in "abc"]
    for replica in group:
        replica.start()
    for replica in group:
        await replica.wait_ready()
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish(workload.invoices)
        feed = asyncio.create_task(publisher.publish_paced(workload.commands, over_s=20))
        await asyncio.sleep(random.Random(SEED + 5).uniform(5, 8))
        victim, survivors = group[1], [group[0], group[2]]
        victim.kill()
        killed_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        assert not feed.done(), "the stream had ended before the kill"
        await feed
    await drained(deployment, total, 240, group)

    commands = deployment.topics.credit_note_commands
    held = {entry["partition"] for entry in victim.log_lines("message processed")
            if entry["topic"] == commands}
    taken_over = {entry["partition"] for survivor in survivors
                  for entry in survivor.log_lines("message processed")
                  if entry["topic"] == commands and entry["timestamp"] > killed_at}
    assert held, "the killed replica had processed commands before it died"
    assert held <= taken_over, (f"partitions {sorted(held - taken_over)} of {commands} were not "
                                "taken over by the survivors")
    assert all(survivor.alive for survivor in survivors)
    await assert_never_lost_never_duplicated(
        deployment, workload.messages, invoices=workload.expected_invoices(), services=group)
    assert await processed(deployment, SOURCE) == total


PARK_REFUND_REQUESTS = """
CREATE FUNCTION faults_park_refund_requests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.parked_at := now();
    NEW.park_error := 'fault injection: not published before the kill';
    RETURN NEW;
END $$;
CREATE TRIGGER faults_park_refund_requests BEFORE INSERT ON outbox
    FOR EACH ROW WHEN (NEW.type = 'refund.requested')
    EXECUTE FUNCTION faults_park_refund_requests();
"""
UNPARK_REFUND_REQUESTS = """
DROP TRIGGER faults_park_refund_requests ON outbox;
DROP FUNCTION faults_park_refund_requests();
"""


async def test_kill_9_between_a_credit_notes_commit_and_its_refund_requests_publishes_them_once(
        deployment: Deployment, replicas: Replicas) -> None:
    """The credit note is committed with its ``refund.requested`` rows, none published (parked
    by a trigger standing in for the relay's bad luck), and the service is killed. After the
    restart the same command arrives again (as Kafka redelivers an uncommitted offset): no
    second refund. The rows are published under the refund ids derived from the credit note,
    one refund each, whatever the crash."""
    topics = deployment.topics
    await deployment.execute(PARK_REFUND_REQUESTS)
    service = replicas()
    await service.start_ready()
    paid = Upstream(topics.invoices, "k_in_paid", invoice_event("k_in_paid", "k-fin-1", paid=True),
                    "applied")
    opened = Upstream(topics.invoices, "k_in_open", invoice_event("k_in_open", "k-fin-2"),
                      "applied")
    payment = Upstream(topics.invoices, "k_in_open", cloudevent(
        "invoice.payment_succeeded", {"invoice_id": "k_in_open", "amount": INVOICE_TOTAL,
                                      "currency": "usd", "payment_id": "pay_k"}, "k-pay-1"),
        "applied", payment_id="pay_k")
    notes = {id_: credit_note_id(SOURCE, id_) for id_ in ("k-cmd-1", "k-cmd-2")}
    expected = {notes["k-cmd-1"]: refund_id(notes["k-cmd-1"]),  # the finalization payment
                notes["k-cmd-2"]: refund_id_for(notes["k-cmd-2"], PaymentCash(1, "pay_k", 0))}
    credits = [Upstream(topics.credit_note_commands, invoice_id, cloudevent(
        "credit_note.issue", {"invoice_id": invoice_id, "amount": 700, "refund_amount": 700},
        id_), "applied", "credit_note.issued", notes[id_], refund_id=expected[notes[id_]])
        for invoice_id, id_ in (("k_in_paid", "k-cmd-1"), ("k_in_open", "k-cmd-2"))]
    upstream = [paid, opened, payment, *credits]
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish([paid, opened, payment])
        await reached(deployment, 3, 60, [service])  # the credit refunds pay_k, so after it
        await publisher.publish(credits)

        async def committed_unpublished() -> bool:
            rows = await deployment.fetch(
                "SELECT o.published_at, o.parked_at FROM outbox AS o "
                "WHERE o.type = 'refund.requested'")
            return len(rows) == 2 and all(row["published_at"] is None for row in rows)

        await eventually(committed_unpublished, 60, "both credit notes committed, refunds parked")
        service.kill()
        assert await collect(deployment, [topics.refund_requests]) == []
        await deployment.execute(UNPARK_REFUND_REQUESTS)
        await service.start_ready()
        await publisher.publish(credits)  # redelivered: the offsets might not have been committed
        retried = await creditnotes(deployment, "outbox", "retry", "--all")
        assert retried.returncode == 0, retried.output
    await drained(deployment, len(upstream), 60, [service])

    records = await assert_never_lost_never_duplicated(deployment, upstream, services=[service])
    requested = [record for record in records if record.topic == topics.refund_requests]
    assert {record.event["data"]["id"]: record.event["data"]["credit_note_id"]
            for record in requested} == {refund: note for note, refund in expected.items()}
    assert len({record.id for record in requested}) == 2  # one event per refund, however sent
    assert {record.event["data"]["payment_id"] for record in requested} == {None, "pay_k"}
    refunds = await deployment.fetch("SELECT refund_id, credit_note_id, amount FROM refunds")
    assert sorted((row["credit_note_id"], row["refund_id"], row["amount"]) for row in refunds) \
        == sorted((note, refund, 700) for note, refund in expected.items())
    assert service.terminate() == 0
