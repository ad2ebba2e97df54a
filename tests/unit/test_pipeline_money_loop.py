"""The money loop through the consume pipeline and the in-memory unit of work.

Payments as facts, refund outcomes on ``refund-results`` (waiting for an unknown
refund like for an unknown invoice, duplicates without effect, the opposite
outcome dead-lettered), ``credit_note.update``, ``effective_at``, and the
metrics they count. No servers: the real broker's delivery semantics are
``tests/integration/test_money_loop_end_to_end.py``'s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.adapters.unavailable import Backoff
from service.entrypoints.consumer import Pipeline
from service.entrypoints.dead_letters import DeadLetterWriter
from service.entrypoints.metrics import Metrics
from service.entrypoints.translators import routes
from service.handlers import Outcome
from service.settings import Settings
from tests.fakes import FakeStore
from tests.unit.test_pipeline import Producer, Record, record

RESULTS = "refund-results"
COMMANDS = "credit-note-commands"


def finalized(invoice_id: str = "in_1", *, total: int = 10_000, paid: int = 0) -> Record:
    return record("invoices", "invoice.finalized", {"invoice": {
        "id": invoice_id, "number": f"N-{invoice_id}", "customer_id": "cus_1", "currency": "usd",
        "status": "open", "amount_paid": paid,
        "lines": [{"id": "il_1", "description": "Plan", "quantity": 1, "unit_amount": total}]}},
        f"fin-{invoice_id}")


def payment(id_: str, amount: int, payment_id: str | None = None,
            invoice_id: str = "in_1") -> Record:
    data: dict[str, Any] = {"invoice_id": invoice_id, "amount": amount, "currency": "usd"}
    if payment_id is not None:
        data["payment_id"] = payment_id
    return record("invoices", "invoice.payment_succeeded", data, id_)


def credit(id_: str, amount: int, *, refund: int = 0, invoice_id: str = "in_1",
           **extra: Any) -> Record:
    data: dict[str, Any] = {"invoice_id": invoice_id, "amount": amount, **extra}
    if refund:
        data["refund_amount"] = refund
    return record(COMMANDS, "credit_note.issue", data, id_)


def outcome(id_: str, refund_id: str, succeeded: bool = True, invoice_id: str = "in_1",
            **extra: Any) -> Record:
    type_ = "refund.succeeded" if succeeded else "refund.failed"
    return record(RESULTS, type_, {"refund_id": refund_id, "invoice_id": invoice_id, **extra},
                  id_)


def events(store: FakeStore, type_: str) -> list[dict[str, Any]]:
    """The ``data`` of the outbox rows of ``type_``, in order."""
    return [json.loads(row[4])["data"] for row in store.outbox if row[3] == type_]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def producer() -> Producer:
    return Producer()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


#: Runs while the pipeline sleeps before its next attempt (another replica's batch, say).
Meanwhile = list[Callable[[], Awaitable[object]]]


@pytest.fixture
def meanwhile(monkeypatch: pytest.MonkeyPatch) -> Meanwhile:
    pending: Meanwhile = []

    async def sleep(seconds: float) -> None:
        while pending:
            await pending.pop(0)()

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return pending


def make_pipeline(store: FakeStore, producer: Producer, metrics: Metrics,
                  *, wait_s: float = 0.0, **settings: Any) -> Pipeline:
    return Pipeline(store.unit_of_work, routes(Settings(_env_file=None, **settings)),
                    DeadLetterWriter(producer, "creditnotes", "test"),  # type: ignore[arg-type]
                    Backoff(0.01, 0.02), not_found_retry_s=wait_s, max_message_bytes=100_000,
                    metrics=metrics)


@pytest.fixture
def pipeline(store: FakeStore, producer: Producer, metrics: Metrics,
             meanwhile: Meanwhile) -> Pipeline:
    return make_pipeline(store, producer, metrics)


def reasons(producer: Producer) -> list[str]:
    return [headers["dlq.error.reason"].decode() for _, headers in producer.sent]


# --- payments -------------------------------------------------------------------------------


async def test_a_payment_id_told_again_under_another_event_id_has_no_effect(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    outcomes = await pipeline.process_batch(
        [finalized(), payment("p1", 6_000, "pay_1"), payment("p1-again", 6_000, "pay_1")])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]
    assert store.invoices["in_1"].amount_paid == 6_000
    assert store.outcome(("/tests", "p1-again")) == "duplicate:payment"
    assert producer.sent == []


async def test_the_same_payment_id_with_another_amount_is_dead_lettered(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    outcomes = await pipeline.process_batch(
        [finalized(), payment("p1", 6_000, "pay_1"), payment("p2", 5_000, "pay_1")])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, None]
    assert reasons(producer) == ["payment_conflict"]
    assert store.invoices["in_1"].amount_paid == 6_000


async def test_a_payment_racing_a_credit_goes_over_to_the_balance_not_to_a_dead_letter(
        pipeline: Pipeline, store: FakeStore, producer: Producer, metrics: Metrics) -> None:
    """Example 18: 100.00 open, 30.00 credited, then a payment of 100.00."""
    outcomes = await pipeline.process_batch(
        [finalized(), credit("c1", 3_000), payment("p1", 10_000, "pay_1")])
    assert outcomes == [Outcome.APPLIED] * 3
    invoice = store.invoices["in_1"]
    assert (invoice.amount_paid, invoice.status) == (7_000, "paid")
    [balance] = events(store, "customer_balance.credited")
    assert (balance["amount"], balance["reason"], balance["payment_id"]) == (
        3_000, "overpayment", "pay_1")
    assert producer.sent == []
    assert sample(metrics, "creditnotes_customer_balance_credited_total",
                  reason="overpayment") == 1


async def test_a_payment_in_another_currency_is_dead_lettered(
        pipeline: Pipeline, producer: Producer) -> None:
    wrong = record("invoices", "invoice.payment_succeeded",
                   {"invoice_id": "in_1", "amount": 100, "currency": "eur"}, "p-eur")
    assert await pipeline.process_batch([finalized(), wrong]) == [Outcome.APPLIED, None]
    assert reasons(producer) == ["currency_mismatch"]


# --- refund outcomes ------------------------------------------------------------------------


async def paid_with_pending_refunds(pipeline: Pipeline, store: FakeStore) -> list[str]:
    """Example 15: 60.00 by pay_1 then 40.00 by pay_2, then 70.00 credited by refund."""
    await pipeline.process_batch([finalized(), payment("p1", 6_000, "pay_1"),
                                  payment("p2", 4_000, "pay_2"),
                                  credit("c1", 7_000, refund=7_000)])
    requested = events(store, "refund.requested")
    assert [(r["payment_id"], r["amount"]) for r in requested] == [("pay_2", 4_000),
                                                                  ("pay_1", 3_000)]
    [issued] = events(store, "credit_note.issued")
    assert issued["refund_status"] == "pending"
    return [r["id"] for r in requested]


async def test_outcomes_settle_refunds_once_and_the_opposite_is_dead_lettered(
        pipeline: Pipeline, store: FakeStore, producer: Producer, metrics: Metrics) -> None:
    on_pay_2, on_pay_1 = await paid_with_pending_refunds(pipeline, store)
    outcomes = await pipeline.process_batch([
        outcome("o1", on_pay_2, succeeded=False, failure_reason="card expired"),
        outcome("o2", on_pay_1),
        outcome("o1-again", on_pay_2, succeeded=False),  # the same outcome: no effect
        outcome("o3", on_pay_1, succeeded=False),  # the opposite: for a person to look at
    ])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE, None]
    assert reasons(producer) == ["refund_state_conflict"]
    failed = events(store, "credit_note.refund_failed")
    succeeded = events(store, "credit_note.refund_succeeded")
    assert [(e["refund_id"], e["refund_status"], e["resettled_to"], e["failure_reason"])
            for e in failed] == [(on_pay_2, "pending", "customer_balance", "card expired")]
    assert [(e["refund_id"], e["refund_status"]) for e in succeeded] == [
        (on_pay_1, "partially_failed")]
    [balance] = events(store, "customer_balance.credited")
    assert (balance["amount"], balance["reason"], balance["refund_id"]) == (
        4_000, "refund_failed", on_pay_2)
    assert store.outcome(("/tests", "o1-again")) == "duplicate:refund_failed"
    counted = {name: sample(metrics, "creditnotes_refund_outcomes_total", outcome=name)
               for name in ("succeeded", "failed", "duplicate", "conflict", "not_found")}
    assert counted == {"succeeded": 1, "failed": 1, "duplicate": 1, "conflict": 1,
                       "not_found": 0}
    assert sample(metrics, "creditnotes_refunds_requested_total") == 2

    # example 16: 40.00 of pay_2 is refundable again
    await pipeline.process_batch([credit("c2", 3_000, refund=3_000)])
    [*_, again] = events(store, "refund.requested")
    assert (again["payment_id"], again["amount"]) == ("pay_2", 3_000)


async def test_a_failed_refund_stays_payable_when_the_setting_says_none(
        store: FakeStore, producer: Producer, metrics: Metrics, meanwhile: Meanwhile) -> None:
    pipeline = make_pipeline(store, producer, metrics, refund_failure_settlement="none")
    on_pay_2, _ = await paid_with_pending_refunds(pipeline, store)
    assert await pipeline.process_batch([outcome("o1", on_pay_2, succeeded=False)]) == [
        Outcome.APPLIED]
    [failed] = events(store, "credit_note.refund_failed")
    assert (failed["resettled_to"], failed["journal"]) == ("none", [])
    assert events(store, "customer_balance.credited") == []


async def test_an_unknown_refund_waits_then_is_dead_lettered_refund_not_found(
        pipeline: Pipeline, store: FakeStore, producer: Producer, metrics: Metrics) -> None:
    await paid_with_pending_refunds(pipeline, store)
    outcomes = await pipeline.process_batch([outcome("o1", "rf_nobody_knows")])
    assert outcomes == [None]
    assert reasons(producer) == ["refund_not_found"]
    assert store.outcome(("/tests", "o1")) == "dead_lettered:refund_not_found"
    assert sample(metrics, "creditnotes_refund_outcomes_total", outcome="not_found") == 1


async def test_an_outcome_before_its_credit_note_commits_waits_and_then_applies(
        store: FakeStore, producer: Producer, metrics: Metrics, meanwhile: Meanwhile) -> None:
    pipeline = make_pipeline(store, producer, metrics, wait_s=30.0)
    other_replica = make_pipeline(store, producer, metrics)
    await pipeline.process_batch([finalized(paid=10_000)])
    # the refund id the credit note will have, as the first try of this very pipeline shows
    scratch = FakeStore()
    await make_pipeline(scratch, Producer(), Metrics()).process_batch(
        [finalized(paid=10_000), credit("c1", 2_000, refund=2_000)])
    [refund] = events(scratch, "refund.requested")

    meanwhile.append(lambda: other_replica.process_batch([credit("c1", 2_000, refund=2_000)]))
    outcomes = await pipeline.process_batch([outcome("o1", refund["id"])])
    assert outcomes == [Outcome.APPLIED]
    assert producer.sent == []
    [succeeded] = events(store, "credit_note.refund_succeeded")
    assert (succeeded["refund_id"], succeeded["refund_status"]) == (refund["id"], "succeeded")


async def test_a_refund_of_another_invoice_is_not_found_there(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    on_pay_2, _ = await paid_with_pending_refunds(pipeline, store)
    await pipeline.process_batch([finalized("in_2")])
    outcomes = await pipeline.process_batch([outcome("o1", on_pay_2, invoice_id="in_2")])
    assert outcomes == [None]
    assert reasons(producer) == ["refund_not_found"]


# --- linked refunds, dates, updates -----------------------------------------------------------


async def test_a_linked_refund_is_recorded_succeeded_and_can_be_linked_only_once(
        pipeline: Pipeline, store: FakeStore, metrics: Metrics) -> None:
    """Example 17."""
    linked: dict[str, Any] = {"refunds": [{"refund_id": "re_1", "amount": 2_000}]}
    outcomes = await pipeline.process_batch([
        finalized(total=5_000, paid=5_000), credit("c1", 2_000, **linked),
        credit("c2", 2_000, **linked)])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED]
    [issued] = events(store, "credit_note.issued")
    assert (issued["refund_amount"], issued["refund_status"]) == (2_000, "succeeded")
    assert [(r["refund_id"], r["linked"], r["status"]) for r in issued["refunds"]] == [
        ("re_1", True, "succeeded")]
    assert events(store, "refund.requested") == []
    [rejected] = events(store, "credit_note.rejected")
    assert rejected["reason"] == "refund_already_linked"
    assert sample(metrics, "creditnotes_refunds_linked_total") == 1


async def test_an_effective_at_ahead_of_the_clock_is_rejected(
        pipeline: Pipeline, store: FakeStore) -> None:
    soon = (datetime.now(UTC) + timedelta(minutes=2)).isoformat()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    outcomes = await pipeline.process_batch([
        finalized(), credit("c1", 1_000, effective_at=soon),
        credit("c2", 1_000, effective_at=later),
        credit("c3", 1_000, effective_at="2026-01-01T00:00:00Z")])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED, Outcome.APPLIED]
    [rejected] = events(store, "credit_note.rejected")
    assert rejected["reason"] == "invalid_effective_at"
    first, backdated = events(store, "credit_note.issued")
    assert datetime.fromisoformat(first["effective_at"]) == datetime.fromisoformat(soon)
    assert datetime.fromisoformat(backdated["effective_at"]) == datetime(2026, 1, 1, tzinfo=UTC)


async def test_an_update_merges_metadata_and_a_null_memo_clears_it(
        pipeline: Pipeline, store: FakeStore, producer: Producer) -> None:
    await pipeline.process_batch([finalized(), credit(
        "c1", 1_000, memo="first", metadata={"ticket": "T-1", "keep": "yes"})])
    [issued] = events(store, "credit_note.issued")
    update = record(COMMANDS, "credit_note.update", {
        "credit_note_id": issued["id"], "memo": None,
        "metadata": {"ticket": None, "resolution": "replaced"}}, "u1")
    untouched = record(COMMANDS, "credit_note.update", {
        "credit_note_id": issued["id"], "metadata": {"more": "x"}}, "u2")
    empty = record(COMMANDS, "credit_note.update", {"credit_note_id": issued["id"]}, "u3")
    outcomes = await pipeline.process_batch([update, untouched, empty])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, None]
    assert reasons(producer) == ["invalid_message"]
    first, second = events(store, "credit_note.updated")
    assert (first["memo"], first["metadata"]) == (None, {"keep": "yes", "resolution": "replaced"})
    assert (second["memo"], second["metadata"]) == (
        None, {"keep": "yes", "resolution": "replaced", "more": "x"})
    note = store.credit_notes[issued["id"]]
    assert (note.memo, note.metadata, note.total) == (
        None, {"keep": "yes", "resolution": "replaced", "more": "x"}, 1_000)


async def test_an_update_of_an_unknown_credit_note_waits_then_is_dead_lettered(
        pipeline: Pipeline, producer: Producer) -> None:
    update = record(COMMANDS, "credit_note.update",
                    {"credit_note_id": "cn_unknown", "memo": "x"}, "u1")
    assert await pipeline.process_batch([update]) == [None]
    assert reasons(producer) == ["credit_note_not_found"]


async def test_one_refund_id_linked_on_two_invoices_in_one_batch_is_linked_once(
        pipeline: Pipeline, store: FakeStore) -> None:
    """The second link loses on the refund id's uniqueness, is tried alone, and is rejected."""
    linked: dict[str, Any] = {"refunds": [{"refund_id": "re_9", "amount": 1_000}]}
    outcomes = await pipeline.process_batch([
        finalized("in_1", paid=10_000), finalized("in_2", paid=10_000),
        credit("c1", 1_000, invoice_id="in_1", **linked),
        credit("c2", 1_000, invoice_id="in_2", **linked)])
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED]
    [rejected] = events(store, "credit_note.rejected")
    assert (rejected["invoice_id"], rejected["reason"]) == ("in_2", "refund_already_linked")
    assert [refund.refund_id for refund in store.invoices["in_1"].refunds] == ["re_9"]
    assert store.invoices["in_2"].refunds == []
