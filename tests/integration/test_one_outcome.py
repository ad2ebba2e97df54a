"""One outcome per record: never a dead letter AND an effect, never an effect reported wrong.

Regression tests for the pipeline attack (notes/attack-pipeline): each failed before the
dead-letter decision was recorded in the ledger (migration 0015), before a message failing
alone was retried ahead of the messages after it, before the database refusing the service
was ``Unavailable``, and before a batch's retries had a time budget.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faststream.kafka import KafkaBroker
from hypothesis import given
from hypothesis import strategies as st

from service import handlers
from service.adapters.unavailable import Backoff
from service.adapters.unit_of_work import PostgresUnitOfWork
from service.domain import errors
from service.domain.commands import DraftLine, FinalizeInvoice, IssueCreditNote, Trigger
from service.entrypoints import dead_letters
from service.entrypoints.consumer import (
    PER_RECORD_S,
    max_poll_interval_ms,
    retry_budget_seconds,
)
from service.handlers import (
    Delivery,
    Message,
    Outcome,
    UnitOfWork,
    apply_batch,
    decide_dead_letter,
)
from service.settings import Settings, Topics
from tests.support import Kafka, RunningService, cloudevent, creditnotes, fetch, invoice_data

pytestmark = pytest.mark.integration

CE_JSON = ("content-type", b"application/cloudevents+json")
TIMEOUT_S = 30.0


def issue(event_id: str, invoice_id: str, amount: int = 1_000) -> dict[str, Any]:
    return cloudevent("credit_note.issue", {"invoice_id": invoice_id, "amount": amount},
                      id_=event_id)


def finalized(invoice_id: str, unit_amount: int = 100_000) -> dict[str, Any]:
    return cloudevent("invoice.finalized", invoice_data(invoice_id, lines=[
        {"id": "il_1", "description": "Plan", "quantity": 1, "unit_amount": unit_amount}]),
        id_=f"fin-{invoice_id}")


def issued_for(kafka: Kafka, settings: Settings, trigger_id: str) -> list[Any]:
    return [r for r in kafka.on(settings.topics.credit_note_events, "credit_note.issued")
            if r.event["data"]["trigger"]["id"] == trigger_id]


def dead_for(kafka: Kafka, topic: str, event_id: str) -> list[Any]:
    return [r for r in kafka.on(f"{topic}.dlq")
            if r.value and json.loads(r.value).get("id") == event_id]


# ------------------------------------------------ a dead letter, then never an effect


async def test_a_dead_lettered_record_redelivered_after_a_nack_is_not_applied(
        settings: Settings, kafka: Kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch [credit on unknown in_x, credit on unknown in_y]: both wait in vain, in_x's dead
    letter is sent, the broker refuses in_y's once (the batch is NACKed: the same as a crash
    between a dead letter and the offset commit). in_x's invoice arrives meanwhile: the
    redelivered cmd-x is dead-lettered again, never applied."""
    real_write = dead_letters.DeadLetterWriter.write
    refused = {"done": False}

    async def write(self: Any, record: Any, failure: Any) -> None:
        if b"cmd-y" in (record.value or b"") and not refused["done"]:
            refused["done"] = True
            # in_x arrives before the batch is redelivered
            await kafka.publish(settings.topics.invoices, finalized("in_x"), key="in_x",
                                headers=[CE_JSON])
            for _ in range(200):
                if await fetch(settings, "SELECT 1 FROM invoices WHERE id = 'in_x'"):
                    break
                await asyncio.sleep(0.05)
            raise errors.Unavailable("the broker is unavailable: KafkaConnectionError")
        await real_write(self, record, failure)

    monkeypatch.setattr(dead_letters.DeadLetterWriter, "write", write)
    topic = settings.topics.credit_note_commands
    await kafka.publish(topic, issue("cmd-x", "in_x"), key="k", headers=[CE_JSON])
    await kafka.publish(topic, issue("cmd-y", "in_y"), key="k", headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.wait_for(lambda: dead_for(kafka, topic, "cmd-y"), TIMEOUT_S)
        await kafka.settle(3.0)
    assert refused["done"]
    assert dead_for(kafka, topic, "cmd-x")
    assert issued_for(kafka, settings, "cmd-x") == []
    [row] = await fetch(settings, "SELECT outcome, kafka_offset FROM processed_messages"
                                  " WHERE id = 'cmd-x'")
    assert (row["outcome"], row["kafka_offset"]) == ("dead_lettered:invoice_not_found", 0)
    assert {r.headers["dlq.error.reason"] for r in dead_for(kafka, topic, "cmd-x")} == {
        b"invoice_not_found"}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield created
    await created.close()


def units(pool: asyncpg.Pool) -> Callable[[], UnitOfWork]:
    return lambda: PostgresUnitOfWork(pool, Topics())


def finalize(invoice_id: str) -> Message:
    return Message(FinalizeInvoice(
        Trigger("/tests", f"fin-{invoice_id}", "invoice.finalized"), invoice_id,
        f"ACME-{invoice_id}", "cus_1", "usd", "open", (DraftLine("il_1", "Widget", 1, 10_000),)),
        Delivery("invoices", 0, 0))


def credit(id_: str, invoice_id: str, offset: int = 7) -> Message:
    return Message(IssueCreditNote(Trigger("/tests", id_, "credit_note.issue"), invoice_id,
                                   "other", amount=1_000), Delivery("commands", 0, offset))


async def test_a_waiting_record_another_replica_applied_is_not_dead_lettered(
        pool: asyncpg.Pool) -> None:
    """Replica A waits for in_z (the key is released); the partition moves to replica B,
    which applies the same delivery once in_z arrived. A's deadline: no dead letter, a
    duplicate."""
    [waiting] = await apply_batch([credit("cmd-z", "in_z")], units(pool))  # replica A
    assert waiting.error is not None and not waiting.decided
    await apply_batch([finalize("in_z")], units(pool))
    [applied] = await apply_batch([credit("cmd-z", "in_z")], units(pool))  # replica B
    assert applied.outcome is Outcome.APPLIED

    at_deadline = await decide_dead_letter(waiting.message, waiting.error, units(pool))

    assert (at_deadline.decided, at_deadline.outcome) == (False, Outcome.DUPLICATE)
    assert await pool.fetchval("SELECT outcome FROM processed_messages WHERE id = 'cmd-z'") == (
        "applied")


async def test_a_record_dead_lettered_by_one_replica_is_not_applied_by_another(
        pool: asyncpg.Pool) -> None:
    """Replica A dead-letters at its deadline; replica B, holding the same delivery, retries
    after the invoice arrived: it sends the dead letter again and applies nothing. A replay
    (another offset) may then apply it."""
    [waiting] = await apply_batch([credit("cmd-w", "in_w")], units(pool))
    assert waiting.error is not None
    decided = await decide_dead_letter(waiting.message, waiting.error, units(pool), 3)
    assert decided.decided
    await apply_batch([finalize("in_w")], units(pool))

    [again] = await apply_batch([credit("cmd-w", "in_w")], units(pool))  # replica B

    assert again.decided and again.outcome is None
    assert again.error is not None and again.error.code == "invoice_not_found"
    assert await pool.fetchval("SELECT count(*) FROM credit_notes") == 0
    [replayed] = await apply_batch([credit("cmd-w", "in_w", offset=99)], units(pool))
    assert replayed.outcome is Outcome.APPLIED
    assert await pool.fetchval("SELECT count(*) FROM credit_notes") == 1


@pytest.mark.parametrize(("before", "statement", "allowed"), [
    # the new moves, each from another transaction, stamped now()
    ("released:invoice_not_found",
     "outcome = 'dead_lettered:invoice_not_found', processed_at = now()", True),
    ("dead_lettered:invoice_not_found",
     "outcome = 'applied', kafka_offset = 99, processed_at = now()", True),
    ("dead_lettered:invoice_not_found",
     "outcome = 'dead_lettered:processing_failed', processed_at = now()", True),
    # still refused
    ("dead_lettered:invoice_not_found", "outcome = 'applied', processed_at = now()", False),
    ("applied", "outcome = 'dead_lettered:invoice_not_found', processed_at = now()", False),
    ("rejected:invoice_void", "outcome = 'dead_lettered:x', processed_at = now()", False),
    ("dead_lettered:invoice_not_found", "outcome = 'released:x', processed_at = now()", False),
    ("released:invoice_not_found", "outcome = 'dead_lettered:x'", False),
    ("released:invoice_not_found", "outcome = 'dead_lettered:', processed_at = now()", False),
])
async def test_the_ledger_allows_exactly_the_dead_letter_moves(
        database_url: str, before: str, statement: str, allowed: bool) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO processed_messages (source, id, type, topic, kafka_partition,"
            " kafka_offset, outcome, processed_at) VALUES ('/t', 'k', 'credit_note.issue',"
            " 'commands', 0, 7, $1, now() - interval '1 hour')", before)
        update = f"UPDATE processed_messages SET {statement} WHERE id = 'k'"
        if allowed:
            await connection.execute(update)
        else:
            with pytest.raises(asyncpg.IntegrityConstraintViolationError,
                               match="only by the transaction that claimed it"):
                await connection.execute(update)
    finally:
        await connection.close()


# ------------------------------------------------ the database refusing the service


@pytest.mark.parametrize("breakage", ["role-loses-login", "privilege-revoked"])
async def test_good_records_are_held_not_dead_lettered_while_the_database_refuses_the_service(
        settings: Settings, kafka: Kafka, breakage: str) -> None:
    """A login refused (28000) or a privilege missing (42501): held in place, applied once
    the DBA repairs it. Before: each good record dead-lettered processing_failed."""
    user = f"pf_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'CREATE ROLE "{user}" LOGIN IN ROLE creditnotes_app')
        as_app = settings.model_copy(update={
            "database_url": settings.database_url.replace("postgres@", f"{user}@")})
        topic = settings.topics.credit_note_commands
        await kafka.publish(settings.topics.invoices, finalized("in_r"), key="in_r",
                            headers=[CE_JSON])
        async with RunningService(as_app):
            await kafka.publish(topic, issue("cmd-warm", "in_r"), key="in_r", headers=[CE_JSON])
            await kafka.wait_for(lambda: issued_for(kafka, settings, "cmd-warm"), TIMEOUT_S)
            if breakage == "role-loses-login":
                await admin.execute(f'ALTER ROLE "{user}" NOLOGIN')
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                    " WHERE usename = $1", user)
            else:
                await admin.execute("REVOKE INSERT ON processed_messages FROM creditnotes_app")
            for n in range(3):
                await kafka.publish(topic, issue(f"cmd-good-{n}", "in_r", 100), key="in_r",
                                    headers=[CE_JSON])
            await kafka.settle(5.0)
            assert kafka.on(f"{topic}.dlq") == []
            if breakage == "role-loses-login":
                await admin.execute(f'ALTER ROLE "{user}" LOGIN')
            else:
                await admin.execute("GRANT INSERT ON processed_messages TO creditnotes_app")
            await kafka.wait_for(lambda: all(issued_for(kafka, settings, f"cmd-good-{n}")
                                             for n in range(3)), TIMEOUT_S)
        assert kafka.on(f"{topic}.dlq") == []
    finally:
        await admin.execute("GRANT INSERT ON processed_messages TO creditnotes_app")
        await admin.execute(f'DROP OWNED BY "{user}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


# ------------------------------------------------ order and reporting


async def test_a_message_retried_alone_is_applied_before_the_messages_after_it(
        settings: Settings, kafka: Kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """cmd-1 (70,000) then cmd-2 (50,000) on a 100,000 invoice, one batch; cmd-1 fails twice
    with a failure that is the record's as far as the pipeline knows (KeyError). In order:
    cmd-1 issued, cmd-2 rejected. Before: cmd-2 issued first, cmd-1 retried after it."""
    real = handlers._HANDLERS[IssueCreditNote]
    failures = {"n": 0}

    async def transient(command: Any, uow: Any) -> None:
        if command.trigger.id == "cmd-1" and failures["n"] < 2:
            failures["n"] += 1
            raise KeyError("transient")
        await real(command, uow)

    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote, transient)
    topic = settings.topics.credit_note_commands
    await kafka.publish(settings.topics.invoices, finalized("in_o"), key="in_o", headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.settle(3.0)
        await kafka.publish(topic, issue("cmd-1", "in_o", 70_000), key="in_o", headers=[CE_JSON])
        await kafka.publish(topic, issue("cmd-2", "in_o", 50_000), key="in_o", headers=[CE_JSON])
        await kafka.wait_for(lambda: len([r for r in kafka.on(settings.topics.credit_note_events)
                                          if r.event["type"] in ("credit_note.issued",
                                                                 "credit_note.rejected")]) >= 2,
                             TIMEOUT_S)
    outcomes = [(r.event["type"], r.event["data"]["trigger"]["id"])
                for r in kafka.on(settings.topics.credit_note_events)
                if r.event["type"] in ("credit_note.issued", "credit_note.rejected")]
    assert outcomes == [("credit_note.issued", "cmd-1"), ("credit_note.rejected", "cmd-2")]


async def test_a_message_applied_alone_before_an_outage_is_reported_applied(
        settings: Settings, kafka: Kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch [poison, good-1, good-2]: good-1 commits alone, good-2 meets a lost connection
    once; the batch is redelivered. good-1 is logged 'applied' (by the delivery that applied
    it), then 'duplicate'. Before: only 'duplicate'."""
    real = handlers._HANDLERS[IssueCreditNote]
    state = {"reset": 0}

    async def handler(command: Any, uow: Any) -> None:
        if command.trigger.id == "poison":
            raise KeyError("x")
        if command.trigger.id == "good-2" and state["reset"] == 0:
            state["reset"] += 1
            raise ConnectionResetError("connection reset by peer")
        await real(command, uow)

    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote, handler)
    topic = settings.topics.credit_note_commands
    await kafka.publish(settings.topics.invoices, finalized("in_d"), key="in_d", headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.settle(3.0)
    for event_id in ("poison", "good-1", "good-2"):
        await kafka.publish(topic, issue(event_id, "in_d", 100), key="in_d", headers=[CE_JSON])
    with structlog.testing.capture_logs() as logs:
        async with RunningService(settings):
            await kafka.wait_for(lambda: issued_for(kafka, settings, "good-2"), TIMEOUT_S)
            await kafka.settle(2.0)
    outcomes = [(e["event_id"], str(e["outcome"])) for e in logs
                if e["event"] == "message processed"]
    assert ("good-1", "applied") in outcomes
    assert len(dead_for(kafka, topic, "poison")) >= 1


async def test_the_ledger_names_the_first_copy_of_a_key_the_one_applied(
        settings: Settings, kafka: Kafka) -> None:
    await kafka.publish(settings.topics.invoices, finalized("in_s"), key="in_s",
                        headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.settle(3.0)
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_s", "amount": 500}, id_="twin"), key="in_s",
        headers=[CE_JSON])
    await kafka.publish(settings.topics.sla_breaches, cloudevent(
        "sla.breached", {"invoice_id": "in_s", "sla_id": "sla-1", "credit_bps": 5000},
        id_="twin"), key="in_s", headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.wait_for(lambda: kafka.on(settings.topics.credit_note_events,
                                              "credit_note.issued"), TIMEOUT_S)
        await kafka.settle(3.0)
    [note] = await fetch(settings, "SELECT trigger_type FROM credit_notes WHERE trigger_id = 'twin'")
    [row] = await fetch(settings, "SELECT type FROM processed_messages WHERE id = 'twin'")
    assert row["type"] == note["trigger_type"]
    assert (await creditnotes(settings, "verify")).returncode == 0


# ------------------------------------------------ a batch never outlasts the poll interval


@given(initial=st.floats(0.01, 60), cap=st.floats(0.01, 600), attempts=st.integers(1, 10),
       wait=st.floats(0, 3_600), records=st.integers(1, 10_000))
def test_the_poll_interval_exceeds_the_longest_a_batch_may_take(
        initial: float, cap: float, attempts: int, wait: float, records: int) -> None:
    backoff = Backoff(initial, cap)
    worst = (retry_budget_seconds(backoff, attempts) + wait + cap + records * PER_RECORD_S)
    assert max_poll_interval_ms(backoff, attempts, wait, records) / 1000 >= worst + 60


FOUR_BYTE_SOURCE = "".join(chr(0x20000 + (n * 7_919) % 40_000) for n in range(1_024))


async def test_a_stream_of_poison_records_is_dead_lettered_once_each_and_committed(
        settings: Settings, kafka: Kafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 records PostgreSQL refuses (an index row too large) in one batch, the poll interval
    scaled down to 8 s. Before: three attempts and two sleeps each, the batch outlasted the
    interval, was never committed and was dead-lettered again and again."""
    real = KafkaBroker.subscriber

    def subscriber(self: Any, *topics: str, **options: Any) -> Any:
        options["max_poll_interval_ms"] = 8_000
        return real(self, *topics, **options)

    monkeypatch.setattr(KafkaBroker, "subscriber", subscriber)
    topic = settings.topics.credit_note_commands
    await kafka.publish(settings.topics.invoices, finalized("in_q"), key="in_q",
                        headers=[CE_JSON])
    for n in range(40):
        await kafka.publish(topic, cloudevent("credit_note.issue", {
            "invoice_id": "in_q", "amount": 1}, id_=f"q{n}",
            source=FOUR_BYTE_SOURCE[:-4] + f"{n:04d}"), key="in_q", headers=[CE_JSON])
    await kafka.publish(topic, issue("good-after", "in_q", 1), key="in_q", headers=[CE_JSON])

    async def committed() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    group_id=settings.consumer_group, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic) or {0}
            return max([(await consumer.committed(TopicPartition(topic, p))) or 0
                        for p in partitions])
        finally:
            await consumer.stop()

    async with RunningService(settings.model_copy(update={
            "retry_initial_backoff_seconds": 0.2, "retry_max_backoff_seconds": 5.0})):
        await kafka.wait_for(lambda: issued_for(kafka, settings, "good-after"), 60)
        for _ in range(30):
            if await committed() >= 41:
                break
            await asyncio.sleep(1)
        await kafka.settle(10.0)  # past the scaled poll interval: nothing is redone
    per_offset = Counter(d.headers["dlq.original.offset"] for d in kafka.on(f"{topic}.dlq"))
    assert len(per_offset) == 40
    assert max(per_offset.values()) == 1
    assert await committed() >= 41


# ------------------------------------------------ a dead letter too large even without its value


async def test_a_bad_record_with_huge_headers_is_dead_lettered_without_them(
        settings: Settings, kafka: Kafka) -> None:
    topic = settings.topics.credit_note_commands
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                max_request_size=8_000_000, enable_idempotence=False)
    await producer.start()
    try:
        await kafka.publish(settings.topics.invoices, finalized("in_h"), key="in_h",
                            headers=[CE_JSON])
        await producer.send_and_wait(topic, b"not json!!", key=b"in_h",
                                     headers=[CE_JSON, ("x-trace-baggage", b"x" * 2_500_000)])
    finally:
        await producer.stop()
    await kafka.publish(topic, issue("cmd-after", "in_h", 100), key="in_h", headers=[CE_JSON])
    async with RunningService(settings):
        await kafka.wait_for(lambda: issued_for(kafka, settings, "cmd-after"), TIMEOUT_S)
    [dead] = kafka.on(f"{topic}.dlq")
    assert dead.value is None
    assert dead.headers["dlq.value.omitted"] == b"10"
    count, size = dead.headers["dlq.headers.omitted"].split(b";")
    assert int(count) == 2 and int(size) > 2_500_000
    assert "x-trace-baggage" not in dead.headers
    assert dead.headers["dlq.error.reason"] == b"invalid_message"
