"""The same thing twice: an event redelivered, the same event on another topic, a dead-letter
replay run twice; and 20 credits racing for one invoice across partitions and replicas."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.harness import (
    INVOICE_TOTAL,
    SOURCE,
    Deployment,
    Publisher,
    Record,
    ServiceProcess,
    Upstream,
    assert_never_lost_never_duplicated,
    check,
    cloudevent,
    collect,
    credit_note_id,
    creditnotes,
    drained,
    eventually,
    invoice_event,
    verify,
)

pytestmark = pytest.mark.faults

Replicas = Callable[..., ServiceProcess]


def finalized(deployment: Deployment, invoice_id: str, *,
              lines: list[dict[str, Any]] | None = None, total: int = INVOICE_TOTAL) -> Upstream:
    return Upstream(deployment.topics.invoices, invoice_id,
                    invoice_event(invoice_id, f"fin-{invoice_id}", lines=lines, total=total),
                    "applied")


def issue(deployment: Deployment, invoice_id: str, id_: str, amount: int) -> Upstream:
    return Upstream(deployment.topics.credit_note_commands, invoice_id,
                    cloudevent("credit_note.issue", {"invoice_id": invoice_id, "amount": amount},
                               id_, subject=invoice_id),
                    "applied", "credit_note.issued", credit_note_id(SOURCE, id_))


async def in_ledger(deployment: Deployment, *messages: Upstream, timeout_s: float = 60) -> None:
    async def present() -> bool:
        rows = await deployment.fetch(
            "SELECT id FROM processed_messages WHERE source = $1 AND id = ANY($2::text[])",
            SOURCE, [message.id for message in messages])
        return len(rows) == len({message.id for message in messages})

    await eventually(present, timeout_s, f"{[m.id for m in messages]} in the ledger")


def dead_letter_reasons(records: list[Record]) -> Counter[tuple[str, str, str]]:
    return Counter((record.topic, record.id, dict(record.headers)["dlq.error.reason"].decode())
                   for record in records if record.topic.endswith(".dlq"))


async def test_an_event_twice_on_another_topic_and_a_replay_run_twice_each_have_one_effect(
        deployment: Deployment, replicas: Replicas) -> None:
    topics = deployment.topics
    service = replicas(NOT_FOUND_RETRY_SECONDS="2")  # so the early command is dead-lettered
    await service.start_ready()
    invoice_a = finalized(deployment, "in_a")
    twice = issue(deployment, "in_a", "cmd-twice", 1_000)
    sla = Upstream(topics.sla_breaches, "in_a", cloudevent(
        "sla.breached", {"invoice_id": "in_a", "sla_id": "sla-1", "credit_amount": 500},
        "sla-1", subject="in_a"), "applied", "credit_note.issued", credit_note_id(SOURCE, "sla-1"))
    # the same upstream event (source + id) once more, as a return on the returns topic
    same_on_returns = Upstream(topics.returns, "in_a", cloudevent(
        "return.received", {"invoice_id": "in_a", "return_id": "r-1", "lines": [
            {"invoice_line_id": "il_1", "quantity": 1}]}, "sla-1", subject="in_a"), "applied")
    # and byte for byte, on a topic that does not read its type
    copy_on_returns = Upstream(topics.returns, "in_a", sla.event, "applied")
    early = issue(deployment, "in_b", "cmd-early", 2_000)  # its invoice comes later
    invoice_b = finalized(deployment, "in_b")
    dlq = deployment.dlq(topics.credit_note_commands)

    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish([invoice_a])
        await in_ledger(deployment, invoice_a)
        await publisher.publish([twice, twice, sla, early])
        await in_ledger(deployment, twice, sla)
        await publisher.publish([twice, same_on_returns, copy_on_returns])

        async def early_dead_lettered() -> bool:
            return bool(await collect(deployment, [dlq]))

        await eventually(early_dead_lettered, 60, "the early command in the dead-letter topic")
        await publisher.publish([invoice_b])
        await in_ledger(deployment, invoice_b)

    first = await creditnotes(deployment, "dlq", "replay", dlq)
    await in_ledger(deployment, early)
    second = await creditnotes(deployment, "dlq", "replay", dlq)
    upstream = [invoice_a, twice, sla, invoice_b, early]
    await drained(deployment, len(upstream), 60, [service])
    await asyncio.sleep(2)  # anything the duplicates would cause has had time to show

    assert (first.returncode, second.returncode) == (0, 0), first.output + second.output
    assert "republished 1," in first.output, first.output
    assert "republished 0," in second.output, second.output
    commands = await collect(deployment, [topics.credit_note_commands])
    assert Counter(record.id for record in commands) == {"cmd-twice": 3, "cmd-early": 2}, (
        "the first replay republished the dead letter once, the second not at all")
    ledger = {row["id"]: (row["topic"], row["outcome"]) for row in await deployment.fetch(
        "SELECT id, topic, outcome FROM processed_messages")}
    assert ledger == {"fin-in_a": (topics.invoices, "applied"),
                      "cmd-twice": (topics.credit_note_commands, "applied"),
                      "sla-1": (topics.sla_breaches, "applied"),
                      "fin-in_b": (topics.invoices, "applied"),
                      "cmd-early": (topics.credit_note_commands, "applied")}
    records = await assert_never_lost_never_duplicated(
        deployment, upstream, invoices={"in_a": (1_500, 2), "in_b": (2_000, 1)},
        allow_dead_letters=True, services=[service])
    assert dead_letter_reasons(records) == {
        (dlq, "cmd-early", "invoice_not_found"): 1,
        (deployment.dlq(topics.returns), "sla-1", "unsupported_type"): 1}


async def test_twenty_concurrent_ten_percent_credits_on_one_invoice_issue_exactly_ten(
        deployment: Deployment, replicas: Replicas) -> None:
    topics = deployment.topics
    group = [replicas(f"replica-{name}") for name in "abc"]
    for replica in group:
        replica.start()
    for replica in group:
        await replica.wait_ready()
    invoice = finalized(deployment, "in_race", total=100_000, lines=[
        {"id": "il_1", "description": "Widget", "quantity": 4, "unit_amount": 10_000,
         "tax_rate_bps": 2_000},
        {"id": "il_2", "description": "Plan", "quantity": 1, "unit_amount": 52_000}])
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish([invoice])
        await in_ledger(deployment, invoice)
        partitions = await publisher.partitions(topics.credit_note_commands)
        credits = [Upstream(topics.credit_note_commands, "in_race", cloudevent(
            "credit_note.issue", {"invoice_id": "in_race", "amount": 10_000},
            f"race-{n:02d}", subject="in_race"), outcome="applied or rejected: the race decides",
            partition=partitions[n % len(partitions)]) for n in range(20)]
        await publisher.publish(credits)
    await drained(deployment, 21, 120, group)

    records = await collect(deployment)
    events = {record.id: record.event for record in records
              if record.topic == topics.credit_note_events}
    issued = [e for e in events.values() if e["type"] == "credit_note.issued"]
    rejected = [e for e in events.values() if e["type"] == "credit_note.rejected"]
    paid = {record.id for record in records if record.topic == topics.invoice_events}
    [row] = await deployment.fetch(
        "SELECT status, pre_payment_credited + post_payment_credited AS credited, "
        "credit_note_count FROM invoices WHERE id = 'in_race'")
    outcomes = Counter(row["outcome"].split(":")[0] for row in await deployment.fetch(
        "SELECT outcome FROM processed_messages WHERE id LIKE 'race-%'"))
    racers = {replica.name for replica in group for entry in replica.log_lines("message processed")
              if entry["topic"] == topics.credit_note_commands}
    problems = await check(deployment, records, [invoice])
    verified = await verify(deployment)

    assert len({credit.partition for credit in credits}) == len(partitions) > 1
    assert len(racers) >= 2, f"only {racers} processed the credits: no race"
    assert problems == []
    assert verified.returncode == 0, verified.output
    assert outcomes == {"applied": 10, "rejected": 10}
    assert (len(issued), len(rejected), len(paid)) == (10, 10, 1)
    assert sorted(e["data"]["trigger"]["id"] for e in issued + rejected) == [
        credit.id for credit in credits]  # one outcome each
    assert sorted(e["data"]["number"] for e in issued) == [
        f"FLT-in_race-CN-{n:02d}" for n in range(1, 11)]
    assert {e["data"]["total"] for e in issued} == {10_000}
    assert (row["status"], row["credited"], row["credit_note_count"]) == ("paid", 100_000, 10)
    assert Counter(e["data"]["reason"] for e in rejected) == {"exceeds_creditable_amount": 10}, (
        "an explicit credit_note.issue asking for more than is left is rejected as "
        "exceeds_creditable_amount (docs/rules.md, the issue), also when nothing is left")


async def test_a_void_sent_twice_is_refused_the_second_time_under_its_invoice_key(
        deployment: Deployment, replicas: Replicas) -> None:
    topics = deployment.topics
    service = replicas()
    await service.start_ready()
    invoice = finalized(deployment, "in_void")
    credit = issue(deployment, "in_void", "cmd-credit", 3_000)
    note = credit.credit_note
    voids = [Upstream(topics.credit_note_commands, "in_void", cloudevent(
        "credit_note.void", {"credit_note_id": note}, f"void-{n}", subject="in_void"),
        outcome, emits, note) for n, (outcome, emits) in enumerate(
            [("applied", "credit_note.voided"),
             ("rejected:already_void", "credit_note.rejected")])]
    async with Publisher(deployment.bootstrap_servers) as publisher:
        await publisher.publish([invoice, credit, *voids])
    await drained(deployment, 4, 60, [service])

    records = await collect(deployment)
    [refusal] = [r for r in records if r.topic == topics.credit_note_events
                 and r.event["type"] == "credit_note.rejected"]
    assert (refusal.key, refusal.event["data"]["invoice_id"]) == (b"in_void", "in_void"), (
        "a refused void is invoice-scoped: keyed by its invoice, so it is ordered with the "
        "invoice's other events (docs/contract.md), and it names the invoice")
    await assert_never_lost_never_duplicated(
        deployment, [invoice, credit, *voids], invoices={"in_void": (0, 1)}, services=[service])
