"""Bad input on the real broker: dead-lettered unchanged, and the partition keeps flowing.

Every case of the matrix runs in one service lifetime (a service start costs
seconds of consumer-group joins): each case gets its own invoice, whose id is
the key of its bad record. On ``credit-note-commands`` the bad record is
followed, on the same partition, by a valid ``credit_note.issue``; on
``invoices`` it is followed by the invoice's valid ``invoice.finalized``, and
that by the same valid command. A case passes when the bad record sits on
``<topic>.dlq`` exactly as it was sent, with the ``dlq.*`` headers of
docs/contract.md, and the valid command behind it was applied while the bad record
changed nothing. That service is configured with ``max_message_bytes`` of
4 KiB, so a record just above it (and otherwise valid) is one of the cases.

Business refusals, by contrast, are not dead-lettered: they come out as
``credit_note.rejected``. Those tests share the same running service.

Last, records that pass the wire model but that the JSON parser or PostgreSQL
cannot take (nesting too deep, a NUL character in a text field) must be
dead-lettered too, not retried in place forever; each runs on its own service.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from service.adapters.migrations import migrate
from service.devtools.devstack import create_topics
from service.settings import MIGRATIONS_DIR, Settings, Topics
from tests.servers import Servers, create_database, drop_database
from tests.support import Kafka, Record, RunningService, cloudevent, fetch, fetchrow, invoice_data

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 4_096
FOLLOW_UP_AMOUNT = 1_000
#: Text a customer might have typed: it must never reach a dead-letter header.
MEMO = "Refund for Jane Roe, card ending 4242"
DLQ_HEADERS = {
    "dlq.original.topic", "dlq.original.partition", "dlq.original.offset",
    "dlq.original.timestamp", "dlq.consumer.group", "dlq.error.reason", "dlq.error.class",
    "dlq.error.message", "dlq.attempts", "dlq.first_failed_at", "dlq.failed_at",
    "dlq.service.version",
}
CE_JSON = ("content-type", b"application/cloudevents+json")


# ------------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class BadInput:
    """One bad record: where it goes, how it is built for an invoice id, why it is refused."""

    name: str
    topic: str  # attribute of Topics: "invoices" or "credit_note_commands"
    build: Callable[[str], bytes | None]
    reason: str
    #: Payload values the dead-letter message must not repeat.
    hidden: tuple[str, ...] = (MEMO,)
    headers: tuple[tuple[str, bytes], ...] = (CE_JSON,)
    event_id: str | None = None  # the bad record's CloudEvent id, when it has one


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def issue_event(invoice_id: str, event_id: str | None = None, /, **data: Any) -> dict[str, Any]:
    payload = {"invoice_id": invoice_id, "amount": FOLLOW_UP_AMOUNT, "memo": MEMO, **data}
    return cloudevent("credit_note.issue", {k: v for k, v in payload.items() if v is not None},
                      id_=event_id)


def finalized_event(invoice_id: str, event_id: str | None = None,
                    **invoice: Any) -> dict[str, Any]:
    return cloudevent("invoice.finalized", invoice_data(invoice_id, **invoice), id_=event_id)


def without(event: dict[str, Any], attribute: str) -> dict[str, Any]:
    return {name: value for name, value in event.items() if name != attribute}


def bad_id(name: str) -> str:
    return f"bad-{name}"


def generic_cases(topic: str, valid: Callable[..., dict[str, Any]], unknown_type: str,
                  wrong_type: str) -> list[BadInput]:
    """What any input topic refuses, whatever its message types."""
    short = "commands" if topic == "credit_note_commands" else topic
    utf8, array = f"{short}-invalid-utf8", f"{short}-json-array-not-object"
    cases = [
        BadInput(f"{short}-not-json", topic,
                 lambda k: b'{"specversion": "1.0", "data": {"memo": "' + MEMO.encode() + b'"',
                 "invalid_message"),
        BadInput(utf8, topic, lambda k: encode(valid(k, bad_id(utf8))).replace(
            b'"/tests"', b'"/te\xff\xfests"'), "invalid_message", event_id=bad_id(utf8)),
        BadInput(array, topic, lambda k: encode([valid(k, bad_id(array))]), "invalid_message",
                 event_id=bad_id(array)),
        BadInput(f"{short}-json-string-not-object", topic, lambda k: encode(MEMO),
                 "invalid_message"),
    ]
    for attribute in ("specversion", "id", "source", "type"):
        name = f"{short}-missing-{attribute}"
        cases.append(BadInput(name, topic, lambda k, a=attribute, n=name: encode(  # type: ignore[misc]
            without(valid(k, bad_id(n)), a)), "invalid_message",
            event_id=None if attribute == "id" else bad_id(name)))
    for label, type_ in (("unknown-type", unknown_type),
                         ("type-of-another-topic", wrong_type)):
        name = f"{short}-{label}"
        cases.append(BadInput(name, topic, lambda k, t=type_, n=name: encode(  # type: ignore[misc]
            {**valid(k, bad_id(n)), "type": t}), "unsupported_type", event_id=bad_id(name)))
    return cases


def too_large_issue(invoice_id: str) -> bytes:
    # Valid in every other way: a memo may hold 5,000 characters.
    return encode(issue_event(invoice_id, bad_id("commands-too-large"),
                              memo=(MEMO + " ") * 120))


def too_large_invoice(invoice_id: str) -> bytes:
    # Valid in every other way: a line description may hold 1,000 characters.
    lines = [{"id": f"il_{n}", "description": (MEMO + " ") * 25, "quantity": 1,
              "unit_amount": 20_000} for n in range(1, 6)]
    return encode(finalized_event(invoice_id, bad_id("invoices-too-large"), lines=lines))


def command_case(name: str, *, hidden: tuple[str, ...] = (), **data: Any) -> BadInput:
    """A ``credit_note.issue`` whose data breaks the wire model."""
    return BadInput(name, "credit_note_commands",
                    lambda k: encode(issue_event(k, bad_id(name), **data)), "invalid_message",
                    hidden=(MEMO, *hidden), event_id=bad_id(name))


LINE = {"type": "invoice_line_item", "invoice_line_id": "il_1"}

CASES: list[BadInput] = [
    *generic_cases("credit_note_commands", issue_event, "credit_note.explode", "invoice.finalized"),
    *generic_cases("invoices", finalized_event, "invoice.exploded", "credit_note.issue"),
    BadInput("commands-too-large", "credit_note_commands", too_large_issue, "message_too_large",
             event_id=bad_id("commands-too-large")),
    BadInput("invoices-too-large", "invoices", too_large_invoice, "message_too_large",
             event_id=bad_id("invoices-too-large")),
    BadInput("commands-tombstone", "credit_note_commands", lambda k: None, "invalid_message"),
    BadInput("commands-binary-mode-without-ce-id", "credit_note_commands",
             lambda k: encode({"invoice_id": k, "amount": 100, "memo": MEMO}), "invalid_message",
             headers=(("ce_specversion", b"1.0"), ("ce_source", b"/tests"),
                      ("ce_type", b"credit_note.issue"), ("content-type", b"application/json"))),
    command_case("issue-missing-invoice-id", invoice_id=None),
    command_case("issue-unknown-field", discount_code="SPRING-SALE-77",
                 hidden=("SPRING-SALE-77",)),
    command_case("issue-zero-amount", amount=0),
    command_case("issue-negative-amount", amount=-4_321, hidden=("4321",)),
    command_case("issue-float-amount", amount=10.5, hidden=("10.5",)),
    command_case("issue-string-amount", amount="100", hidden=("'100'", '"100"')),
    command_case("issue-amount-beyond-64-bits", amount=2**70, hidden=(str(2**70),)),
    command_case("issue-amount-and-lines", amount=100, lines=[{**LINE, "quantity": 1}]),
    command_case("issue-line-with-quantity-and-amount", amount=None,
                 lines=[{**LINE, "quantity": 1, "amount": 3_333}], hidden=("3333",)),
    BadInput("invoices-stated-total-differs", "invoices",
             lambda k: encode(finalized_event(k, bad_id("invoices-stated-total-differs"),
                                              total=99_999)),
             "invoice_total_mismatch", hidden=("99999",),
             event_id=bad_id("invoices-stated-total-differs")),
]
INVOICE_OF = {case.name: f"in_{n:04d}" for n, case in enumerate(CASES, start=1)}


@dataclass
class Sent:
    """Where a bad record landed on its input topic."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes
    value: bytes | None


@dataclass
class Stack:
    settings: Settings
    kafka: Kafka
    producer: AIOKafkaProducer
    sent: dict[str, Sent] = field(default_factory=dict)
    waiting_for: list[str] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return self.settings.topics

    async def publish_raw(self, case: BadInput, key: str, timestamp: int) -> Sent:
        topic = getattr(self.topics, case.topic)
        headers = [*case.headers, ("x-test-case", case.name.encode())]
        value = case.build(key)
        metadata = await self.producer.send_and_wait(topic, value=value, key=key.encode(),
                                                     headers=headers, timestamp_ms=timestamp)
        return Sent(topic, metadata.partition, metadata.offset, timestamp, key.encode(), value)

    def dead_letters(self, case: BadInput) -> list[Record]:
        return [record for record in
                self.kafka.on(f"{getattr(self.topics, case.topic)}.dlq")
                if record.headers.get("x-test-case") == case.name.encode()]

    def issued(self, trigger_id: str) -> list[Record]:
        return [record for record in
                self.kafka.on(self.topics.credit_note_events, "credit_note.issued")
                if record.event["data"]["trigger"]["id"] == trigger_id]

    def rejected(self, trigger_id: str) -> list[Record]:
        return [record for record in
                self.kafka.on(self.topics.credit_note_events, "credit_note.rejected")
                if record.event["data"]["trigger"]["id"] == trigger_id]


def module_settings(servers: Servers, database_url: str) -> Settings:
    """As the ``settings`` fixture of tests/conftest.py, with a small message-size limit."""
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    names = ["invoices", "returns", "sla_breaches", "downgrades", "cancellations",
             "credit_note_commands", "credit_note_events", "invoice_events", "refund_requests"]
    settings = Settings(
        database_url=database_url, kafka_bootstrap_servers=servers.bootstrap_servers,
        consumer_group=f"{prefix}credit-notes", http_port=0, log_format="console",
        not_found_retry_seconds=3.0, retry_initial_backoff_seconds=0.05,
        retry_max_backoff_seconds=0.5, outbox_poll_seconds=0.2, shutdown_timeout_seconds=5.0,
        kafka_session_timeout_ms=2_000, kafka_heartbeat_interval_ms=300,
        kafka_fetch_max_wait_ms=10, max_message_bytes=MAX_MESSAGE_BYTES, allow_any_source=True,
    )
    return settings.model_copy(
        update={f"topic_{name}": prefix + name.replace("_", "-") for name in names})


@pytest.fixture(scope="module")
async def stack(servers: Servers) -> AsyncIterator[Stack]:
    """One running service (4 KiB message limit) with its database, topics and a reader."""
    database_url = await create_database(servers.database_url)
    try:
        await migrate(database_url, MIGRATIONS_DIR)
        settings = module_settings(servers, database_url)
        await create_topics(settings.kafka_bootstrap_servers, settings.topics.all())
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    enable_idempotence=False, acks="all")
        await producer.start()
        try:
            async with Kafka(settings) as kafka, RunningService(settings):
                yield Stack(settings, kafka, producer)
        finally:
            await producer.stop()
    finally:
        await drop_database(servers.database_url, database_url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
async def matrix(stack: Stack) -> Stack:
    """Every bad record, each followed on its partition by a valid command; all outcomes in."""
    topics, kafka = stack.topics, stack.kafka
    base_timestamp = 1_700_000_000_000
    # An invoice-topic bad record comes before its invoice, a command-topic one after it:
    # either way the follow-up command is only applied once the partition moved past it.
    for n, case in enumerate(CASES):
        if case.topic == "invoices":
            stack.sent[case.name] = await stack.publish_raw(case, INVOICE_OF[case.name],
                                                            base_timestamp + n)
    for case in CASES:
        await kafka.publish(topics.invoices, finalized_event(INVOICE_OF[case.name]))

    async def all_invoices_stored() -> bool:
        rows = await fetch(stack.settings, "SELECT 1 FROM invoices WHERE id = ANY($1::text[])",
                           list(INVOICE_OF.values()))
        return len(rows) == len(CASES)

    await until(all_invoices_stored, kafka, timeout_s=60)
    for n, case in enumerate(CASES):
        if case.topic == "credit_note_commands":
            stack.sent[case.name] = await stack.publish_raw(case, INVOICE_OF[case.name],
                                                            base_timestamp + n)
    for case in CASES:
        await kafka.publish(topics.credit_note_commands,
                            issue_event(INVOICE_OF[case.name], f"follow-up-{case.name}"))

    async def every_case_done() -> bool:
        stack.waiting_for = [case.name for case in CASES if not (
            stack.dead_letters(case) and stack.issued(f"follow-up-{case.name}"))]
        return not stack.waiting_for

    await until(every_case_done, kafka, timeout_s=60, waiting_for=lambda: stack.waiting_for)
    await kafka.settle(1.5)
    return stack


async def until(check: Callable[[], Awaitable[bool]], kafka: Kafka, timeout_s: float,
                waiting_for: Callable[[], object] = lambda: "") -> None:
    """Wait until ``check`` holds, reading the output topics meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"still waiting after {timeout_s} s {waiting_for()}"
        await kafka.poll()


def _iso(text: bytes) -> datetime:
    return datetime.fromisoformat(text.decode().replace("Z", "+00:00"))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_a_bad_record_is_dead_lettered_unchanged_with_its_reason(
        matrix: Stack, case: BadInput) -> None:
    sent = matrix.sent[case.name]
    [record] = matrix.dead_letters(case)

    assert (record.key, record.value) == (sent.key, sent.value)
    assert record.timestamp == sent.timestamp
    for name, original in case.headers:
        assert record.headers.get(name) == original, f"original header {name} was not kept"
    headers = record.headers
    assert set(headers) >= DLQ_HEADERS, f"missing: {DLQ_HEADERS - set(headers)}"
    assert headers["dlq.error.reason"] == case.reason.encode()
    assert (headers["dlq.original.topic"], headers["dlq.original.partition"],
            headers["dlq.original.offset"], headers["dlq.original.timestamp"]) == (
        sent.topic.encode(), str(sent.partition).encode(), str(sent.offset).encode(),
        str(sent.timestamp).encode())
    assert headers["dlq.consumer.group"] == matrix.settings.consumer_group.encode()
    assert headers["dlq.attempts"] == b"1"
    assert headers["dlq.service.version"] == matrix.settings.service_version.encode()
    assert headers["dlq.error.class"]
    assert _iso(headers["dlq.first_failed_at"]) <= _iso(headers["dlq.failed_at"])
    message = headers["dlq.error.message"].decode()
    assert message
    for value in (*case.hidden, "input_value", "input_type"):
        assert value not in message, f"the dead-letter message repeats {value!r}: {message!r}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
async def test_after_a_bad_record_the_partition_keeps_flowing_and_nothing_else_changes(
        matrix: Stack, case: BadInput) -> None:
    invoice_id = INVOICE_OF[case.name]
    [issued] = matrix.issued(f"follow-up-{case.name}")

    assert issued.event["data"]["total"] == FOLLOW_UP_AMOUNT
    assert issued.event["data"]["number"] == f"ACME-{invoice_id[-4:]}-CN-01"
    notes = await fetch(matrix.settings, "SELECT trigger_id FROM credit_notes WHERE invoice_id = $1",
                        invoice_id)
    assert [note["trigger_id"] for note in notes] == [f"follow-up-{case.name}"]
    invoice = await fetchrow(matrix.settings, "SELECT total, pre_payment_credited, "
                             "credit_note_count FROM invoices WHERE id = $1", invoice_id)
    assert invoice is not None and tuple(invoice) == (100_000, FOLLOW_UP_AMOUNT, 1)
    lines = await fetch(matrix.settings, "SELECT line_id, description FROM invoice_lines "
                        "WHERE invoice_id = $1", invoice_id)
    assert [tuple(line) for line in lines] == [("il_1", "Widget")]
    if case.event_id is not None:  # no ledger entry, or its dead-letter decision
        ledger = await fetch(matrix.settings, "SELECT outcome FROM processed_messages"
                             " WHERE id = $1", case.event_id)
        assert all(row["outcome"].startswith("dead_lettered:") for row in ledger)
    assert matrix.rejected(bad_id(case.name)) == []


# ------------------------------------------------------------- refusals that are not bad input


async def finalize_and_wait(stack: Stack, invoice_id: str, **invoice: Any) -> None:
    await stack.kafka.publish(stack.topics.invoices, finalized_event(invoice_id, **invoice))

    async def stored() -> bool:
        return await fetchrow(stack.settings, "SELECT 1 FROM invoices WHERE id = $1",
                              invoice_id) is not None

    await until(stored, stack.kafka, timeout_s=30)


async def issue_and_wait(stack: Stack, invoice_id: str, event_id: str, **data: Any) -> Record:
    await stack.kafka.publish(stack.topics.credit_note_commands,
                              issue_event(invoice_id, event_id, **data))
    issued: list[Record] = await stack.kafka.wait_for(lambda: stack.issued(event_id))
    return issued[0]


@pytest.mark.parametrize(("data", "reason"), [
    pytest.param({"currency": "eur"}, "currency_mismatch", id="currency-differs"),
    pytest.param({"amount": None, "lines": [{**LINE, "invoice_line_id": "il_404", "quantity": 1}]},
                 "unknown_invoice_line", id="unknown-invoice-line"),
    pytest.param({"amount": None, "lines": [{**LINE, "quantity": 3}]},
                 "exceeds_creditable_amount", id="quantity-beyond-the-line"),
])
async def test_a_business_refusal_is_published_as_rejected_and_not_dead_lettered(
        stack: Stack, data: dict[str, Any], reason: str) -> None:
    invoice_id = f"in_refused_{reason}"
    await finalize_and_wait(stack, invoice_id, lines=[
        {"id": "il_1", "description": "Widget", "quantity": 2, "unit_amount": 50_000}])
    await stack.kafka.publish(stack.topics.credit_note_commands,
                              issue_event(invoice_id, f"refused-{reason}", **data))

    [rejected] = await stack.kafka.wait_for(lambda: stack.rejected(f"refused-{reason}"))
    assert rejected.key == invoice_id.encode()
    assert rejected.event["data"]["reason"] == reason
    assert rejected.event["data"]["invoice_id"] == invoice_id
    assert rejected.event["data"]["trigger"] == {
        "source": "/tests", "id": f"refused-{reason}", "type": "credit_note.issue"}
    await issue_and_wait(stack, invoice_id, f"accepted-after-{reason}")
    dlq = stack.kafka.on(f"{stack.topics.credit_note_commands}.dlq")
    assert [record for record in dlq if record.key == invoice_id.encode()] == []
    notes = await fetch(stack.settings, "SELECT trigger_id FROM credit_notes WHERE invoice_id = $1",
                        invoice_id)
    assert [note["trigger_id"] for note in notes] == [f"accepted-after-{reason}"]
    ledger = await fetchrow(stack.settings, "SELECT outcome FROM processed_messages WHERE id = $1",
                            f"refused-{reason}")
    assert ledger is not None and ledger["outcome"] == f"rejected:{reason}"


async def test_a_command_for_an_unknown_invoice_is_dead_lettered_after_the_retry_window(
        stack: Stack) -> None:
    ghost = "in_ghost"
    await stack.kafka.publish(stack.topics.credit_note_commands, issue_event(ghost, "cmd-ghost"))

    [record] = await stack.kafka.wait_for(lambda: [
        r for r in stack.kafka.on(f"{stack.topics.credit_note_commands}.dlq")
        if r.key == ghost.encode()], timeout_s=30)
    headers = record.headers
    assert headers["dlq.error.reason"] == b"invoice_not_found"
    assert int(headers["dlq.attempts"]) > 1
    waited = _iso(headers["dlq.failed_at"]) - _iso(headers["dlq.first_failed_at"])
    assert waited.total_seconds() >= 0.9 * stack.settings.not_found_retry_seconds
    assert headers["dlq.consumer.group"] == stack.settings.consumer_group.encode()
    assert MEMO not in headers["dlq.error.message"].decode()
    assert json.loads(record.value or b"")["id"] == "cmd-ghost"

    # The invoice arriving later does not revive the dead-lettered command, and the
    # partition goes on: a new command for it is applied, alone.
    await finalize_and_wait(stack, ghost)
    await issue_and_wait(stack, ghost, "cmd-ghost-again")
    notes = await fetch(stack.settings, "SELECT trigger_id FROM credit_notes WHERE invoice_id = $1",
                        ghost)
    assert [note["trigger_id"] for note in notes] == ["cmd-ghost-again"]
    [ledger] = await fetch(stack.settings, "SELECT outcome FROM processed_messages"
                           " WHERE id = 'cmd-ghost'")
    # the dead-letter decision: a replay (another offset) may still apply it
    assert ledger["outcome"] == "dead_lettered:invoice_not_found"


async def test_sql_in_ids_is_treated_as_plain_text(stack: Stack) -> None:
    invoice_id = "in_1'; DROP TABLE invoices; --"
    line_id = "il_1'); DELETE FROM invoice_lines; --"
    event_id = "cmd'; TRUNCATE processed_messages; --"
    await finalize_and_wait(stack, invoice_id, number="ACME-'||pg_sleep(5)||'", lines=[
        {"id": line_id, "description": "Robert'); DROP TABLE students;--", "quantity": 1,
         "unit_amount": 100_000}])
    await stack.kafka.publish(stack.topics.credit_note_commands, cloudevent(
        "credit_note.issue",
        {"invoice_id": invoice_id, "memo": "'; UPDATE invoices SET total = 0; --",
         "lines": [{**LINE, "invoice_line_id": line_id, "amount": 2_500}]},
        id_=event_id, source="/tests'); --"))

    [issued] = await stack.kafka.wait_for(lambda: stack.issued(event_id))
    note = issued.event["data"]
    assert issued.key == invoice_id.encode()
    assert (note["invoice_id"], note["number"], note["total"]) == (
        invoice_id, "ACME-'||pg_sleep(5)||'-CN-01", 2_500)
    assert [line["invoice_line_id"] for line in note["lines"]] == [line_id]
    assert note["trigger"] == {"source": "/tests'); --", "id": event_id,
                               "type": "credit_note.issue"}
    invoice = await fetchrow(stack.settings, "SELECT total, pre_payment_credited FROM invoices "
                             "WHERE id = $1", invoice_id)
    assert invoice is not None and tuple(invoice) == (100_000, 2_500)
    line = await fetchrow(stack.settings, "SELECT description, credited_net FROM invoice_lines "
                          "WHERE invoice_id = $1 AND line_id = $2", invoice_id, line_id)
    assert line is not None and tuple(line) == ("Robert'); DROP TABLE students;--", 2_500)
    memo = await fetchrow(stack.settings, "SELECT memo FROM credit_notes WHERE trigger_id = $1",
                          event_id)
    assert memo is not None and memo["memo"] == "'; UPDATE invoices SET total = 0; --"
    ledger = await fetchrow(stack.settings, "SELECT outcome FROM processed_messages "
                            "WHERE source = $1 AND id = $2", "/tests'); --", event_id)
    assert ledger is not None and ledger["outcome"] == "applied"
    zeroed = await fetch(stack.settings, "SELECT id FROM invoices WHERE total = 0")
    assert zeroed == []


# ------------------------------------------------ records that pass the wire model but no further
#
# Each runs on its own service: should one hold its partition, it must not take other tests
# down with it. Dead-lettering takes well under a second, so a few seconds of waiting suffice.

NESTED = (b'{"specversion": "1.0", "id": "cmd-nested", "source": "/tests", '
          b'"type": "credit_note.issue", "data": ' + b"[" * 5_000 + b"]" * 5_000 + b"}")


@pytest.mark.parametrize(("topic", "value"), [
    pytest.param("credit_note_commands", NESTED, id="json-nested-5000-deep"),
    pytest.param("credit_note_commands", encode(issue_event("in_1001", "cmd-\x00-nul")),
                 id="nul-character-in-event-id"),
    pytest.param("credit_note_commands", encode(issue_event("in_1001", "cmd-nul-memo",
                                                            memo="Refund\x00")),
                 id="nul-character-in-memo"),
    pytest.param("credit_note_commands", encode(issue_event("in_1001", "cmd-nul-metadata",
                                                            metadata={"ticket": "T-1\x00"})),
                 id="nul-character-in-metadata"),
    pytest.param("invoices", encode(finalized_event("in_1001", "inv-nul", lines=[
        {"id": "il_1", "description": "Wid\x00get", "quantity": 1, "unit_amount": 100_000}])),
                 id="nul-character-in-invoice-line"),
])
async def test_a_record_the_parser_or_database_refuses_is_dead_lettered_not_retried_forever(
        service: RunningService, kafka: Kafka, settings: Settings, topic: str,
        value: bytes) -> None:
    topics = settings.topics
    if topic == "credit_note_commands":
        await kafka.publish(topics.invoices, finalized_event("in_1001"))
    await kafka.publish(getattr(topics, topic), value, key="in_1001", headers=[CE_JSON])
    if topic == "invoices":
        await kafka.publish(topics.invoices, finalized_event("in_1001"))
    await kafka.publish(topics.credit_note_commands, issue_event("in_1001", "cmd-after"))

    [record] = await kafka.expect(f"{getattr(topics, topic)}.dlq", timeout_s=8)
    assert record.value == value
    assert record.headers["dlq.error.reason"] == b"invalid_message"
    [issued] = await kafka.expect(topics.credit_note_events, "credit_note.issued", timeout_s=8)
    assert issued.event["data"]["trigger"]["id"] == "cmd-after"
    notes = await fetch(settings, "SELECT trigger_id FROM credit_notes")
    assert [note["trigger_id"] for note in notes] == ["cmd-after"]
