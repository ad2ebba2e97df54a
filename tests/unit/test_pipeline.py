"""The consume pipeline (``entrypoints/consumer.Pipeline``) through the in-memory unit of work.

Records in, outcomes and dead letters out, no servers: a fake producer keeps
the dead letters. The real broker's delivery semantics (offsets, commits,
redelivery) stay with the integration and fault tests.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.adapters.unavailable import Backoff
from service.domain import errors
from service.entrypoints.consumer import Pipeline
from service.entrypoints.dead_letters import DeadLetterWriter
from service.entrypoints.translators import routes
from service.handlers import Outcome
from service.settings import Settings
from tests.fakes import FakeStore

CE_JSON = ("content-type", b"application/cloudevents+json")


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = b"in_1"
    timestamp: int = 1_764_000_000_000
    headers: tuple[tuple[str, bytes], ...] | list[tuple[str, bytes]] = (CE_JSON,)


@dataclass
class Producer:
    """Keeps what is sent (the dead letters) instead of sending it."""

    sent: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    async def send(self, topic: str, *, value: bytes | None, key: bytes | None,
                   headers: list[tuple[str, bytes]], timestamp_ms: int | None = None) -> None:
        self.sent.append((topic, dict(headers)))


_offsets = iter(range(1, 1_000_000))


def record(topic: str, type_: str, data: dict[str, Any], id_: str) -> Record:
    event = {"specversion": "1.0", "id": id_, "source": "/tests", "type": type_,
             "datacontenttype": "application/json", "data": data}
    return Record(topic, 0, next(_offsets), json.dumps(event).encode())


def finalized(invoice_id: str = "in_1") -> Record:
    return record("invoices", "invoice.finalized", {"invoice": {
        "id": invoice_id, "number": "ACME-0001", "customer_id": "cus_1", "currency": "usd",
        "status": "open", "lines": [{"id": "il_1", "description": "Widget", "quantity": 1,
                                     "unit_amount": 10_000}]}}, f"fin-{invoice_id}")


def issue(id_: str, amount: int = 1_000, invoice_id: str = "in_1") -> Record:
    return record("credit-note-commands", "credit_note.issue",
                  {"invoice_id": invoice_id, "amount": amount}, id_)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def producer() -> Producer:
    return Producer()


@pytest.fixture
def pipeline(store: FakeStore, producer: Producer, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    async def no_sleep(seconds: float) -> None:
        return None

    monkeypatch.setattr(asyncio, "sleep", no_sleep)  # the backoffs, not waited out here
    return Pipeline(store.unit_of_work, routes(Settings()),
                    DeadLetterWriter(producer, "creditnotes", "test"),  # type: ignore[arg-type]
                    Backoff(0.01, 0.02), not_found_retry_s=0.0, max_message_bytes=100_000)


async def test_a_batch_of_records_gets_one_outcome_each(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    outcomes = await pipeline.process_batch(
        [finalized(), issue("c1", 4_000), issue("c2", 9_000), issue("c1", 4_000)])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED, Outcome.DUPLICATE]
    assert producer.sent == []
    assert store.invoices["in_1"].pre_payment_credited == 4_000
    assert store.commits == 1


async def test_a_record_that_does_not_decode_is_dead_lettered_and_the_rest_applied(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    garbage = Record("credit-note-commands", 0, next(_offsets), b"{not json")
    outcomes = await pipeline.process_batch([finalized(), garbage, issue("c1")])
    assert outcomes == [Outcome.APPLIED, None, Outcome.APPLIED]
    [(topic, headers)] = producer.sent
    assert topic == "credit-note-commands.dlq"
    assert headers["dlq.error.reason"] == b"invalid_message"
    assert headers["dlq.original.offset"] == str(garbage.offset).encode()


async def test_a_record_whose_invoice_never_comes_is_dead_lettered_after_waiting(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    outcomes = await pipeline.process_batch([issue("c1", invoice_id="in_never")])
    assert outcomes == [None]
    [(_, headers)] = producer.sent
    assert headers["dlq.error.reason"] == b"invoice_not_found"
    assert store.outcome(("/tests", "c1")) == "dead_lettered:invoice_not_found"


async def test_a_record_refused_by_storage_is_dead_lettered_alone(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    def refuse_bad(uow: Any) -> None:  # say, a constraint only the database knows
        if ("/tests", "bad") in uow.claimed:
            raise errors.RefusedByDatabase("PostgreSQL refused the effect (SQLSTATE 23514)")

    store.before_commit = refuse_bad
    await pipeline.process_batch([finalized()])
    bad = issue("bad", 100)
    outcomes = await pipeline.process_batch([issue("c1"), bad, issue("c2")])
    assert outcomes == [Outcome.APPLIED, None, Outcome.APPLIED]
    [(_, headers)] = producer.sent
    assert (headers["dlq.error.reason"], headers["dlq.attempts"]) == (
        b"refused_by_database", b"3")
    # redelivered (the offsets were not committed): the same dead letter, no effect
    outcomes = await pipeline.process_batch([bad])
    assert outcomes == [None]
    assert len(producer.sent) == 2
    assert store.invoices["in_1"].credit_note_count == 2


async def test_an_outage_raises_so_the_same_records_come_again(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    def outage(uow: Any) -> None:
        raise errors.Unavailable("PostgreSQL: connection refused")

    store.before_commit = outage
    with pytest.raises(errors.Unavailable):
        await pipeline.process_batch([finalized(), issue("c1")])
    assert producer.sent == [] and store.commits == 0

    store.before_commit = None
    assert await pipeline.process_batch([finalized(), issue("c1")]) == [Outcome.APPLIED] * 2


async def test_each_consumer_backs_off_on_its_own_failures_only(
        store: FakeStore, producer: Producer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards run their batches at once: one shard's outage count never lengthens another's wait."""
    waits: list[float] = []

    async def record_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", record_sleep)
    first = Pipeline(store.unit_of_work, routes(Settings()),
                     DeadLetterWriter(producer, "creditnotes", "test"),  # type: ignore[arg-type]
                     Backoff(1.0, 60.0), not_found_retry_s=0.0, max_message_bytes=100_000)
    second = first.for_another_consumer()

    def outage(uow: Any) -> None:
        raise errors.Unavailable("PostgreSQL: connection refused")

    store.before_commit = outage
    for _ in range(3):
        with pytest.raises(errors.Unavailable):
            await first.process_batch([finalized()])
    with pytest.raises(errors.Unavailable):
        await second.process_batch([finalized("in_2")])
    assert waits[3] == waits[0] < waits[2]  # the second starts from the first step
    store.before_commit = None
    assert await second.process_batch([finalized("in_2")]) == [Outcome.APPLIED]
    assert await first.process_batch([finalized()]) == [Outcome.APPLIED]
