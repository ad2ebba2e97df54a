"""The money loop's facts and linked refunds, as a hostile upstream sends them (attack 12a).

An outcome, a void and a payment are facts: never refused for a failure reason's
length or characters, nor for their event's ``time`` (clamped to when processed,
and not before the credit note). Linked refunds are placed whenever they fit,
may not take the service's ``rf_`` ids, and an explicit ``refund_amount`` of 0
is below their sum.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors
from service.domain.commands import Trigger
from service.domain.events import CreditNoteVoided, CustomerBalanceCredited
from service.domain.invoice import fact_date
from service.domain.refunds import LinkedRefund, PaymentCash, place_linked
from service.entrypoints import wire
from service.entrypoints.translators import decode_envelope
from service.handlers import Outcome
from tests.fakes import FakeStore
from tests.unit import builders
from tests.unit.test_pipeline import Producer, Record
from tests.unit.test_pipeline_money_loop import (
    credit,
    events,
    finalized,
    outcome,
    paid_with_pending_refunds,
    reasons,
)

# the fixtures, re-exported under their names
from tests.unit.test_pipeline_money_loop import meanwhile as meanwhile
from tests.unit.test_pipeline_money_loop import metrics as metrics
from tests.unit.test_pipeline_money_loop import pipeline as pipeline
from tests.unit.test_pipeline_money_loop import producer as producer
from tests.unit.test_pipeline_money_loop import store as store

_offsets = itertools.count(50_000)


def timed(record_: Record, time: str) -> Record:
    """``record_`` with its CloudEvent ``time`` set."""
    assert record_.value is not None
    event = json.loads(record_.value)
    event["time"] = time
    return Record(record_.topic, record_.partition, next(_offsets), json.dumps(event).encode())


def when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["effective_at"])


# --- 1. failure reasons ----------------------------------------------------------------------

@pytest.mark.parametrize(("reason", "kept"), [
    ("x" * 600, "x" * 500),
    ("card\x00expired", "card\ufffdexpired"),
    ("a\nb\x1fc\x85d", "a\ufffdb\ufffdc\ufffdd"),
])
async def test_a_long_or_control_character_failure_reason_settles_the_refund(
        pipeline: Any, store: FakeStore, producer: Producer, reason: str, kept: str) -> None:
    on_pay_2, _ = await paid_with_pending_refunds(pipeline, store)
    assert await pipeline.process_batch(
        [outcome("o1", on_pay_2, succeeded=False, failure_reason=reason)]) == [Outcome.APPLIED]
    [failed] = events(store, "credit_note.refund_failed")
    assert failed["failure_reason"] == kept
    assert reasons(producer) == []


def test_nul_is_replaced_only_in_an_outcomes_failure_reason() -> None:
    def envelope(type_: str, data: dict[str, Any]) -> bytes:
        return json.dumps({"specversion": "1.0", "id": "e1", "source": "/s", "type": type_,
                           "data": data}).encode()

    data = {"refund_id": "rf_1", "invoice_id": "in_1", "failure_reason": "a\x00b"}
    event = decode_envelope(envelope("refund.failed", data), [])
    assert isinstance(event.data, dict)
    assert event.data["failure_reason"] == "a\ufffdb"
    binary = decode_envelope(json.dumps(data).encode(), [
        ("ce_specversion", b"1.0"), ("ce_id", b"e2"), ("ce_source", b"/s"),
        ("ce_type", b"refund.failed")])
    assert isinstance(binary.data, dict)
    assert binary.data["failure_reason"] == "a\ufffdb"
    for type_, hostile in [("refund.failed", {**data, "refund_id": "rf\x00"}),
                           ("credit_note.issue", {"invoice_id": "in_1", "failure_reason": "\x00"}),
                           ("refund.failed", {**data, "memo": "\x00"})]:
        with pytest.raises(errors.InvalidMessage, match="NUL"):
            decode_envelope(envelope(type_, hostile), [])


def test_the_wire_model_cleans_a_failure_reason_too() -> None:
    model = wire.RefundOutcome.model_validate(
        {"refund_id": "rf_1", "invoice_id": "in_1", "failure_reason": "\x07" * 700})
    assert model.failure_reason == "\ufffd" * 500


# --- 2. dates of facts -----------------------------------------------------------------------

async def test_an_outcome_is_dated_no_later_than_processed_and_no_earlier_than_its_note(
        pipeline: Any, store: FakeStore, producer: Producer) -> None:
    on_pay_2, on_pay_1 = await paid_with_pending_refunds(pipeline, store)
    [issued] = events(store, "credit_note.issued")
    before = datetime.now(UTC)
    assert await pipeline.process_batch([
        timed(outcome("o1", on_pay_2), "9999-12-31T00:00:00Z"),
        timed(outcome("o2", on_pay_1, succeeded=False), "1970-01-01T00:00:00Z"),
    ]) == [Outcome.APPLIED, Outcome.APPLIED]
    [succeeded] = events(store, "credit_note.refund_succeeded")
    [failed] = events(store, "credit_note.refund_failed")
    assert before <= when(succeeded) <= datetime.now(UTC)
    assert when(failed) == when(issued)
    assert reasons(producer) == []


def test_a_void_and_an_overpayment_are_dated_no_later_than_processed() -> None:
    far, early = datetime(9999, 12, 31, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)
    inv = builders.invoice()
    first, second = builders.issue(inv, amount=1_000), builders.issue(inv, amount=1_000)
    assert first.effective_at == builders.NOW
    inv.void_credit_note(first, Trigger("/s", "v1", "credit_note.void", far),
                         now=builders.NOW + timedelta(hours=1))
    inv.void_credit_note(second, Trigger("/s", "v2", "credit_note.void", early),
                         now=builders.NOW + timedelta(hours=1))
    late_void, early_void = builders.events_of(inv, CreditNoteVoided)
    assert late_void.effective_at == builders.NOW + timedelta(hours=1)
    assert early_void.effective_at == second.effective_at
    inv.receive_payment("pay_1", inv.amount_remaining + 500, "usd",
                        Trigger("/s", "p1", "invoice.payment_succeeded", far),
                        now=builders.NOW)
    [overpaid] = builders.events_of(inv, CustomerBalanceCredited)
    assert (overpaid.amount, overpaid.effective_at) == (500, builders.NOW)


_times = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                      timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(time=st.none() | _times, now=_times, not_before=st.none() | _times)
def test_a_fact_is_dated_its_time_within_its_note_and_now(
        time: datetime | None, now: datetime, not_before: datetime | None) -> None:
    at = fact_date(Trigger("/s", "e", "t", time), now, not_before=not_before)
    assert at is not None
    floor = not_before or at
    assert at >= floor
    assert at <= max(now, floor)
    if time is not None and floor <= time <= now:
        assert at == time


# --- 3. linked refunds placed whenever they fit ----------------------------------------------

def _cash(*applied: int) -> tuple[PaymentCash, ...]:
    return tuple(PaymentCash(sequence, f"pay_{sequence}", amount)
                 for sequence, amount in enumerate(applied, start=1))


def test_linked_refunds_that_fit_only_when_searched_are_placed() -> None:
    linked = [LinkedRefund("re_a", 2_000), LinkedRefund("re_b", 2_000), LinkedRefund("re_c", 3_000)]
    placed, after = place_linked(linked, _cash(3_000, 4_000))
    assert {refund_id: cash.payment_id for refund_id, cash in placed.items()} == {
        "re_a": "pay_2", "re_b": "pay_2", "re_c": "pay_1"}
    assert [cash.refundable for cash in after] == [0, 0]


def _first_fit(linked: list[LinkedRefund], payments: tuple[PaymentCash, ...]
               ) -> dict[str, int] | None:
    """The placement before the search: largest first, each on the newest that holds it."""
    left = {cash.sequence: cash.refundable for cash in payments}
    homes: dict[str, int] = {}
    for refund in sorted(linked, key=lambda refund: -refund.amount):
        home = next((seq for seq in sorted(left, reverse=True) if left[seq] >= refund.amount),
                    None)
        if home is None:
            return None
        left[home] -= refund.amount
        homes[refund.refund_id] = home
    return homes


@settings(max_examples=400, deadline=None)
@given(amounts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       applied=st.lists(st.integers(1, 20), min_size=1, max_size=4))
def test_linked_refunds_are_placed_whenever_some_placement_fits(
        amounts: list[int], applied: list[int]) -> None:
    linked = [LinkedRefund(f"re_{i}", amount) for i, amount in enumerate(amounts)]
    payments = _cash(*applied)
    fits = any(
        all(sum(a for a, home in zip(amounts, homes, strict=True) if home == cash.sequence)
            <= cash.applied for cash in payments)
        for homes in itertools.product([cash.sequence for cash in payments], repeat=len(amounts)))
    if not fits:
        with pytest.raises(errors.ExceedsRefundableAmount):
            place_linked(linked, payments)
        return
    placed, after = place_linked(linked, payments)
    assert set(placed) == {refund.refund_id for refund in linked}
    assert all(cash.refundable >= 0 for cash in after)
    taken = {cash.sequence: cash.refunded for cash in after}
    for cash in payments:
        assert taken[cash.sequence] == sum(refund.amount for refund in linked
                                           if placed[refund.refund_id].sequence == cash.sequence)
    first_fit = _first_fit(linked, payments)
    if first_fit is not None:  # as before the search: newest payments first
        assert {refund_id: cash.sequence for refund_id, cash in placed.items()} == first_fit


# --- 4, 5. linked refunds on the wire --------------------------------------------------------

async def test_a_linked_refund_id_with_the_services_prefix_is_an_invalid_message(
        pipeline: Any, store: FakeStore, producer: Producer) -> None:
    linked: dict[str, Any] = {
        "refunds": [{"refund_id": "rf_0123456789abcdef01234567", "amount": 1_000}]}
    outcomes = await pipeline.process_batch([finalized(total=5_000, paid=5_000),
                                             credit("c1", 1_000, **linked)])
    assert outcomes[1] is not Outcome.APPLIED
    assert events(store, "credit_note.issued") == []
    assert "invalid_message" in reasons(producer) + [
        rejected["reason"] for rejected in events(store, "credit_note.rejected")]


async def test_an_explicit_refund_amount_of_0_below_the_linked_sum_is_a_settlement_mismatch(
        pipeline: Any, store: FakeStore) -> None:
    linked: dict[str, Any] = {"refunds": [{"refund_id": "re_1", "amount": 2_000}]}
    outcomes = await pipeline.process_batch([
        finalized(total=5_000, paid=5_000),
        credit("c1", 2_000, refund_amount=0, **linked),  # was read as not given
        credit("c2", 3_000, credit_amount=1_000, **linked)])  # not given: their sum
    assert outcomes == [Outcome.APPLIED, Outcome.REJECTED, Outcome.APPLIED]
    [rejected] = events(store, "credit_note.rejected")
    assert rejected["reason"] == "settlement_mismatch"
    [issued] = events(store, "credit_note.issued")
    assert (issued["refund_amount"], issued["credit_amount"]) == (2_000, 1_000)

