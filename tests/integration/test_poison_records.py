"""Records that once held their partition for ever: each now gets one outcome, and the
valid record after it on the same partition is applied.

Each case runs on its own service, so a case that stalls cannot take the others down.
The good record after the bad one has the same key (the same partition) and the same
topic, so it can only be applied once the consumer has moved past the bad one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer

from service import handlers
from service.domain.commands import IssueCreditNote
from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetchrow, invoice_data

pytestmark = pytest.mark.integration

CE_JSON = ("content-type", b"application/cloudevents+json")
INVOICE = "in_poison"
#: A 30-day prepaid term, so cancellations and downgrades have unused time to credit.
PERIOD = {"start": "2026-10-01T00:00:00Z", "end": "2026-10-31T00:00:00Z"}
TIMEOUT_S = 15.0


def finalized(invoice_id: str = INVOICE, event_id: str | None = None,
              period: dict[str, str] | None = None) -> dict[str, Any]:
    return cloudevent("invoice.finalized", invoice_data(invoice_id, lines=[
        {"id": "il_1", "description": "Plan", "quantity": 1, "unit_amount": 30_000,
         "period": period or PERIOD}]), id_=event_id)


def issue(event_id: str, *, source: str = "/tests", amount: int = 1_000) -> dict[str, Any]:
    return cloudevent("credit_note.issue", {"invoice_id": INVOICE, "amount": amount},
                      id_=event_id, source=source)


def canceled(event_id: str, at: str) -> dict[str, Any]:
    return cloudevent("subscription.canceled", {"invoice_id": INVOICE, "invoice_line_id": "il_1",
                                                "canceled_at": at}, id_=event_id)


def downgraded(event_id: str, at: str) -> dict[str, Any]:
    return cloudevent("subscription.downgraded", {
        "invoice_id": INVOICE, "invoice_line_id": "il_1", "effective_at": at}, id_=event_id)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


@dataclass(frozen=True)
class Poison:
    topic: str  # attribute of Topics
    bad: bytes
    good: dict[str, Any]  # after it, same key and topic
    reason: str
    #: the invoice must exist first (a credit), or comes after the bad record (an invoice)
    invoice_first: bool = True
    headers: tuple[tuple[str, bytes], ...] = (CE_JSON,)


HUGE_INT = b'{"specversion": "1.0", "id": "cmd-huge", "source": "/tests", ' \
           b'"type": "credit_note.issue", "data": {"invoice_id": "' + INVOICE.encode() + \
           b'", "amount": 1' + b"0" * 5_000 + b"}}"

#: 1,024 different four-byte characters (CJK Extension B): 4,096 bytes PostgreSQL cannot compress.
FOUR_BYTE_SOURCE = "".join(chr(0x20000 + (n * 7_919) % 40_000) for n in range(1_024))

CASES = {
    # json.loads raises a plain ValueError (not JSONDecodeError) beyond 4,300 digits
    "json-integer-of-5000-digits": Poison(
        "credit_note_commands", HUGE_INT, issue("cmd-after"), "invalid_message"),
    # comparing a naive with an aware datetime raised TypeError in the period validator
    "period-one-naive-one-aware": Poison(
        "invoices", encode(finalized(event_id="inv-mixed", period={
            "start": "2026-10-01T00:00:00", "end": "2026-10-31T00:00:00Z"})),
        finalized(), "invalid_message", invoice_first=False),
    # compared with the aware period read back from PostgreSQL: TypeError
    "canceled-at-without-offset": Poison(
        "cancellations", encode(canceled("cancel-naive", "2026-10-16T00:00:00")),
        canceled("cancel-after", "2026-10-16T00:00:00Z"), "invalid_message"),
    "effective-at-without-offset": Poison(
        "downgrades", encode(downgraded("down-naive", "2026-10-16T00:00:00")),
        downgraded("down-after", "2026-10-16T00:00:00Z"), "invalid_message"),
    # the ledger's primary key cannot index 4 KiB that do not compress: SQLSTATE 54000
    "source-of-1024-four-byte-characters": Poison(
        "credit_note_commands", encode(issue("cmd-emoji", source=FOUR_BYTE_SOURCE)),
        issue("cmd-after"), "refused_by_database"),
    "cloudevent-time-without-offset": Poison(
        "credit_note_commands", encode({**issue("cmd-naive-time"),
                                        "time": "2026-10-16T00:00:00"}),
        issue("cmd-after"), "invalid_message"),
    # FastStream decoded a batch as JSON when its first record said application/json
    "binary-mode-json-content-type-invalid-utf-8": Poison(
        "credit_note_commands", b"\xff\xfe{}", issue("cmd-after"), "invalid_message",
        headers=(("content-type", b"application/json"), ("ce_specversion", b"1.0"),
                 ("ce_id", b"cmd-bin"), ("ce_source", b"/tests"),
                 ("ce_type", b"credit_note.issue"))),
    # ... and every header as UTF-8
    "a-header-that-is-not-utf-8": Poison(
        "credit_note_commands", encode(issue("cmd-header")), issue("cmd-after"),
        "invalid_message", headers=(CE_JSON, ("ce_source", b"/te\xffsts"))),
    "nan-token": Poison(
        "credit_note_commands", encode(issue("cmd-nan")).replace(b'"amount": 1000', b'"amount": NaN'),
        issue("cmd-after"), "invalid_message"),
}


async def publish(kafka: Kafka, topic: str, value: dict[str, Any] | bytes) -> None:
    await kafka.publish(topic, value, key=INVOICE, headers=[CE_JSON])


def applied(kafka: Kafka, settings: Settings, trigger_id: str) -> bool:
    return any(record.event["data"]["trigger"]["id"] == trigger_id
               for record in kafka.on(settings.topics.credit_note_events, "credit_note.issued"))


@pytest.mark.parametrize("name", CASES)
async def test_a_poison_record_is_dead_lettered_and_the_partition_flows(
        service: RunningService, kafka: Kafka, settings: Settings, name: str) -> None:
    case = CASES[name]
    topic = getattr(settings.topics, case.topic)
    if case.invoice_first:
        await publish(kafka, settings.topics.invoices, finalized())
    await kafka.publish(topic, case.bad, key=INVOICE, headers=list(case.headers))
    await publish(kafka, topic, case.good)

    [dead] = await kafka.expect(f"{topic}.dlq", timeout_s=TIMEOUT_S)
    assert dead.value == case.bad
    assert dead.headers["dlq.error.reason"] == case.reason.encode()
    if case.invoice_first:
        await kafka.wait_for(lambda: applied(kafka, settings, case.good["id"]), TIMEOUT_S)
    else:
        await until_stored(kafka, settings)


async def until_stored(kafka: Kafka, settings: Settings) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while await fetchrow(settings, "SELECT 1 FROM invoices WHERE id = $1", INVOICE) is None:
        assert time.monotonic() < deadline, "the valid invoice after the bad one never arrived"
        await kafka.poll()


def test_the_source_of_the_stalls_is_a_source_postgresql_cannot_index() -> None:
    assert len(FOUR_BYTE_SOURCE) == 1_024 and len(FOUR_BYTE_SOURCE.encode()) == 4_096


# ----------------------------------------------------- failures injected into the real service


def failing(calls: dict[str, int], trigger_id: str, error: Callable[[], Exception],
            times: int) -> Callable[[Any, Any], Awaitable[None]]:
    """The real issuing handler, except that ``trigger_id`` raises ``error`` ``times`` times."""
    real = handlers._HANDLERS[IssueCreditNote]

    async def handler(command: Any, uow: Any) -> None:
        if command.trigger.id == trigger_id and calls[trigger_id] < times:
            calls[trigger_id] += 1
            raise error()
        await real(command, uow)
    return handler


async def test_a_message_whose_handling_raises_is_tried_alone_three_times_then_dead_lettered(
        service: RunningService, kafka: Kafka, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"cmd-bug": 0}
    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote,
                        failing(calls, "cmd-bug", lambda: KeyError("jane@example.com"), 99))
    await publish(kafka, settings.topics.invoices, finalized())
    for event_id in ("cmd-before", "cmd-bug", "cmd-after"):
        await publish(kafka, settings.topics.credit_note_commands, issue(event_id))

    [dead] = await kafka.expect(f"{settings.topics.credit_note_commands}.dlq", timeout_s=TIMEOUT_S)
    for event_id in ("cmd-before", "cmd-after"):
        await kafka.wait_for(lambda e=event_id: applied(kafka, settings, e), TIMEOUT_S)  # type: ignore[misc]
    assert json.loads(dead.value or b"")["id"] == "cmd-bug"
    assert dead.headers["dlq.error.reason"] == b"processing_failed"
    assert dead.headers["dlq.error.class"] == b"KeyError"
    assert dead.headers["dlq.attempts"] == b"3"
    assert b"jane@example.com" not in dead.headers["dlq.error.message"]
    assert dead.headers["dlq.error.message"] == (  # where to look, never what it held
        b"applying the message raised KeyError in handlers.handle")
    assert calls["cmd-bug"] >= 3
    await kafka.settle(1.0)
    assert len(kafka.on(f"{settings.topics.credit_note_commands}.dlq")) == 1


async def test_a_lost_connection_is_waited_out_in_place_and_nothing_is_dead_lettered(
        service: RunningService, kafka: Kafka, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"cmd-flaky": 0}
    monkeypatch.setitem(handlers._HANDLERS, IssueCreditNote,
                        failing(calls, "cmd-flaky", ConnectionResetError, 5))
    await publish(kafka, settings.topics.invoices, finalized())
    with structlog.testing.capture_logs() as logs:
        for event_id in ("cmd-flaky", "cmd-after"):
            await publish(kafka, settings.topics.credit_note_commands, issue(event_id))
        for event_id in ("cmd-flaky", "cmd-after"):
            await kafka.wait_for(lambda e=event_id: applied(kafka, settings, e), 30)  # type: ignore[misc]
    await kafka.settle(1.0)

    assert kafka.on(f"{settings.topics.credit_note_commands}.dlq") == []
    assert calls["cmd-flaky"] == 5
    retries = [entry for entry in logs
               if entry["event"] == "processing failed, will retry the same records"]
    assert len(retries) >= 5 and all(entry["unavailable"] for entry in retries)
    assert {entry["error"] for entry in retries} == {"ConnectionResetError"}


async def test_a_record_larger_than_the_broker_takes_back_is_dead_lettered_without_its_value(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    """The input topic took 2.5 MB; the dead letter cannot carry them (the producer's limit is
    twice ``max_message_bytes``): before, the partition was held for ever."""
    topic = settings.topics.credit_note_commands
    huge = encode({**issue("cmd-huge-record"), "padding": "x" * 2_500_000})
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                max_request_size=4_000_000, enable_idempotence=False)
    await producer.start()
    try:
        await publish(kafka, settings.topics.invoices, finalized())
        sent = await producer.send_and_wait(topic, huge, key=INVOICE.encode(),
                                            headers=[CE_JSON])
        await publish(kafka, topic, issue("cmd-after"))
    finally:
        await producer.stop()

    [dead] = await kafka.expect(f"{topic}.dlq", timeout_s=TIMEOUT_S)
    await kafka.wait_for(lambda: applied(kafka, settings, "cmd-after"), TIMEOUT_S)
    assert dead.value is None
    assert dead.headers["dlq.value.omitted"] == str(len(huge)).encode()
    assert dead.headers["dlq.error.reason"] == b"message_too_large"
    assert (dead.headers["dlq.original.partition"], dead.headers["dlq.original.offset"]) == (
        str(sent.partition).encode(), str(sent.offset).encode())


async def test_two_events_cannot_be_made_to_share_a_derived_id(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    """``/billing\\npay-9`` + ``x`` and ``/billing`` + ``pay-9\\nx`` joined with newlines are the
    same text, so they derived the same credit-note id: the second took the first's place
    (or was refused by the database). A newline in ``source`` or ``id`` is now refused."""
    topic = settings.topics.credit_note_commands
    await publish(kafka, settings.topics.invoices, finalized())
    await publish(kafka, topic, issue("x", source="/billing\npay-9"))
    await publish(kafka, topic, issue("pay-9\nx", source="/billing"))
    await publish(kafka, topic, issue("cmd-after"))

    dead = await kafka.expect(f"{topic}.dlq", count=2, timeout_s=TIMEOUT_S)
    await kafka.wait_for(lambda: applied(kafka, settings, "cmd-after"), TIMEOUT_S)
    assert [record.headers["dlq.error.reason"] for record in dead] == [b"invalid_message"] * 2
    assert all(b"control characters" in record.headers["dlq.error.message"] for record in dead)
    notes = await fetchrow(settings, "SELECT count(*) AS n FROM credit_notes")
    assert notes is not None and notes["n"] == 1
