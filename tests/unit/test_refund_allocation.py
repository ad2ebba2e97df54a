"""Refunds against payments: newest first, capped per payment, linked refunds first, stable ids.

Worked examples 15 to 17 of docs/rules.md at the level of the pure rules, and properties: an
allocation never takes more of a payment than it has left and adds up exactly, newest
first; any sequence of credits and refund outcomes keeps every payment's pending and
succeeded refunds within its applied cash and every credit note's refunds equal to its
refund amount.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors
from service.domain.payments import Payment
from service.domain.refunds import (
    FailureSettlement,
    LinkedRefund,
    PaymentCash,
    Refund,
    RefundState,
    RefundStatus,
    Transition,
    allocate_newest_first,
    cash_of,
    plan_refunds,
    refund_id_for,
    refund_status,
    refundable,
    transition,
)

SUCCEEDED, FAILED, PENDING = RefundState.SUCCEEDED, RefundState.FAILED, RefundState.PENDING


def paid_by(*amounts: tuple[str | None, int]) -> list[Payment]:
    """Payments received in this order (sequence 1, 2, ...), each applied whole."""
    return [Payment(sequence=position, payment_id=payment_id, amount=amount, applied=amount)
            for position, (payment_id, amount) in enumerate(amounts, 1)]


def states_of(refunds: list[Refund], note: str) -> list[RefundState]:
    return [refund.state for refund in refunds if refund.credit_note_id == note]


def settle(refunds: list[Refund], refund_id: str, outcome: RefundState) -> list[Refund]:
    return [refund.settled(outcome) if refund.refund_id == refund_id else refund
            for refund in refunds]


# Worked example 15: 100.00 paid by pay_1 60.00 then pay_2 40.00; a credit of 70.00 refunded.

def test_credit_refunds_the_newest_payment_first_then_the_older_one() -> None:
    payments = paid_by(("pay_1", 6_000), ("pay_2", 4_000))

    refunds = plan_refunds("cn_a", 7_000, cash_of(payments, []))

    assert [(r.payment_id, r.amount, r.state, r.linked) for r in refunds] == [
        ("pay_2", 4_000, PENDING, False), ("pay_1", 3_000, PENDING, False)]
    assert refund_status(r.state for r in refunds) is RefundStatus.PENDING


# Worked example 16: pay_2's refund fails, pay_1's succeeds; a later credit of 30.00.

def test_failed_refund_gives_its_payment_back_and_a_later_credit_refunds_it_again() -> None:
    payments = paid_by(("pay_1", 6_000), ("pay_2", 4_000))
    refunds = list(plan_refunds("cn_a", 7_000, cash_of(payments, [])))
    on_pay_2, on_pay_1 = refunds

    refunds = settle(refunds, on_pay_2.refund_id, FAILED)
    assert refund_status(states_of(refunds, "cn_a")) is RefundStatus.PENDING  # pay_1 still is
    refunds = settle(refunds, on_pay_1.refund_id, SUCCEEDED)
    assert refund_status(states_of(refunds, "cn_a")) is RefundStatus.PARTIALLY_FAILED

    cash = cash_of(payments, refunds)
    assert [(c.payment_id, c.refundable) for c in cash] == [("pay_1", 3_000), ("pay_2", 4_000)]
    later = plan_refunds("cn_b", 3_000, cash)
    assert [(r.payment_id, r.amount) for r in later] == [("pay_2", 3_000)]
    assert later[0].refund_id != on_pay_2.refund_id  # a new refund, of another credit note


# Worked example 17: a paid 50.00 invoice; a credit of 20.00 with a linked refund re_1.

def test_linked_refund_is_recorded_succeeded_and_requests_nothing() -> None:
    finalized = [Payment(sequence=0, payment_id=None, amount=5_000, applied=5_000)]

    refunds = plan_refunds("cn_a", 2_000, cash_of(finalized, []),
                           linked=[LinkedRefund("re_1", 2_000)])

    assert refunds == (Refund(refund_id="re_1", credit_note_id="cn_a", payment_sequence=0,
                              payment_id=None, amount=2_000, linked=True, state=SUCCEEDED),)
    assert [r for r in refunds if r.state is PENDING] == []  # no refund.requested
    assert refund_status(r.state for r in refunds) is RefundStatus.SUCCEEDED
    assert refundable(cash_of(finalized, refunds)) == 3_000


def test_linked_refunds_take_the_cash_before_the_new_part_is_requested() -> None:
    payments = paid_by(("pay_1", 6_000), ("pay_2", 4_000))

    refunds = plan_refunds("cn_a", 5_000, cash_of(payments, []),
                           linked=[LinkedRefund("re_9", 3_000)])

    assert [(r.refund_id, r.payment_id, r.amount, r.linked) for r in refunds] == [
        ("re_9", "pay_2", 3_000, True),
        (refund_id_for("cn_a", cash_of(payments, [])[1]), "pay_2", 1_000, False),
        (refund_id_for("cn_a", cash_of(payments, [])[0]), "pay_1", 1_000, False)]


def test_linked_refund_goes_whole_to_the_newest_payment_that_holds_it() -> None:
    payments = paid_by(("pay_1", 3_000), ("pay_2", 5_000))

    refunds = plan_refunds("cn_a", 8_000, cash_of(payments, []),
                           linked=[LinkedRefund("re_small", 3_000), LinkedRefund("re_big", 5_000)])

    # largest first: re_big fills pay_2, so re_small still fits on pay_1
    assert [(r.refund_id, r.payment_id) for r in refunds] == [
        ("re_small", "pay_1"), ("re_big", "pay_2")]


def test_linked_refund_larger_than_any_one_payment_is_rejected() -> None:
    payments = paid_by(("pay_1", 3_000), ("pay_2", 3_000))

    with pytest.raises(errors.ExceedsRefundableAmount):
        plan_refunds("cn_a", 5_000, cash_of(payments, []), linked=[LinkedRefund("re_1", 5_000)])


def test_refund_amount_below_the_linked_refunds_is_a_settlement_mismatch() -> None:
    payments = paid_by(("pay_1", 6_000))

    with pytest.raises(errors.SettlementMismatch):
        plan_refunds("cn_a", 1_000, cash_of(payments, []), linked=[LinkedRefund("re_1", 2_000)])


def test_the_same_refund_id_linked_twice_in_one_command_is_invalid() -> None:
    payments = paid_by(("pay_1", 6_000))

    with pytest.raises(errors.InvalidMessage):
        plan_refunds("cn_a", 2_000, cash_of(payments, []),
                     linked=[LinkedRefund("re_1", 1_000), LinkedRefund("re_1", 1_000)])


def test_refund_beyond_the_cash_left_is_rejected_and_plans_nothing() -> None:
    payments = paid_by(("pay_1", 6_000))
    refunds = plan_refunds("cn_a", 5_000, cash_of(payments, []))

    with pytest.raises(errors.ExceedsRefundableAmount):
        plan_refunds("cn_b", 1_001, cash_of(payments, refunds))


def test_refund_ids_are_the_same_when_recomputed_and_differ_per_note_and_payment() -> None:
    payments = paid_by(("pay_1", 6_000), ("pay_2", 4_000))

    first = plan_refunds("cn_a", 7_000, cash_of(payments, []))
    again = plan_refunds("cn_a", 7_000, cash_of(payments, []))  # a redelivery after a crash
    other = plan_refunds("cn_b", 7_000, cash_of(payments, []))

    assert [r.refund_id for r in first] == [r.refund_id for r in again]
    assert len({r.refund_id for r in first + other}) == 4
    assert all(r.refund_id.startswith("rf_") and len(r.refund_id) == 27 for r in first)


def test_payments_without_an_id_are_told_apart_by_their_sequence() -> None:
    at_finalization = PaymentCash(sequence=0, payment_id=None, applied=100)
    later_without_id = PaymentCash(sequence=3, payment_id=None, applied=100)
    named_like_a_sequence = PaymentCash(sequence=1, payment_id="#3", applied=100)

    ids = {refund_id_for("cn_a", payment)
           for payment in (at_finalization, later_without_id, named_like_a_sequence)}

    assert len(ids) == 3


@pytest.mark.parametrize(("states", "expected"), [
    ([], RefundStatus.NONE),
    ([PENDING], RefundStatus.PENDING),
    ([PENDING, FAILED, SUCCEEDED], RefundStatus.PENDING),
    ([SUCCEEDED, SUCCEEDED], RefundStatus.SUCCEEDED),
    ([FAILED], RefundStatus.FAILED),
    ([FAILED, SUCCEEDED], RefundStatus.PARTIALLY_FAILED),
])
def test_refund_status_of_a_credit_note(states: list[RefundState],
                                        expected: RefundStatus) -> None:
    assert refund_status(states) is expected


@pytest.mark.parametrize(("current", "outcome", "expected"), [
    (PENDING, SUCCEEDED, Transition.APPLY),
    (PENDING, FAILED, Transition.APPLY),
    (SUCCEEDED, SUCCEEDED, Transition.DUPLICATE),
    (FAILED, FAILED, Transition.DUPLICATE),
    (SUCCEEDED, FAILED, Transition.CONFLICT),
    (FAILED, SUCCEEDED, Transition.CONFLICT),
])
def test_first_outcome_is_final(current: RefundState, outcome: RefundState,
                                expected: Transition) -> None:
    assert transition(current, outcome) is expected


def test_a_final_refund_refuses_another_outcome() -> None:
    refund = Refund("rf_1", "cn_a", 1, "pay_1", 100, state=SUCCEEDED)

    with pytest.raises(ValueError, match="cannot become"):
        refund.settled(FAILED)


def test_a_linked_refund_is_always_succeeded() -> None:
    with pytest.raises(ValueError, match="linked"):
        Refund("re_1", "cn_a", 1, "pay_1", 100, linked=True, state=PENDING)


def test_a_failed_refund_and_only_a_failed_one_is_settled_again_with_its_reason() -> None:
    pending = Refund("rf_1", "cn_a", 1, "pay_1", 100)

    failed = pending.settled(FAILED, failure_reason="card_expired")
    succeeded = pending.settled(SUCCEEDED, failure_reason="ignored")

    assert (failed.resettled_to, failed.failure_reason) == (
        FailureSettlement.CUSTOMER_BALANCE, "card_expired")
    assert (failed.to_customer_balance, failed.open_payable) == (100, 0)
    assert (succeeded.resettled_to, succeeded.failure_reason, succeeded.open_payable) == (
        None, None, 0)
    kept = pending.settled(FAILED, resettled_to=FailureSettlement.NONE)
    assert (kept.to_customer_balance, kept.open_payable, pending.open_payable) == (0, 100, 100)
    with pytest.raises(ValueError, match="settled again"):
        Refund("rf_2", "cn_a", 1, "pay_1", 100, state=FAILED)
    with pytest.raises(ValueError, match="settled again"):
        Refund("rf_3", "cn_a", 1, "pay_1", 100, resettled_to=FailureSettlement.NONE)
    with pytest.raises(ValueError, match="failure reason"):
        Refund("rf_4", "cn_a", 1, "pay_1", 100, failure_reason="why")


# Properties

cash_lists = st.lists(
    st.tuples(st.integers(0, 50_000), st.integers(0, 50_000)), min_size=0, max_size=8,
).map(lambda pairs: [PaymentCash(sequence=position, payment_id=f"pay_{position}",
                                 applied=max(a, b), refunded=min(a, b))
                     for position, (a, b) in enumerate(pairs)])


@given(payments=cash_lists, data=st.data())
def test_allocation_never_exceeds_a_payment_and_adds_up_exactly_newest_first(
        payments: list[PaymentCash], data: st.DataObject) -> None:
    amount = data.draw(st.integers(0, refundable(payments)))

    parts = allocate_newest_first(amount, payments)

    assert sum(part for _, part in parts) == amount
    assert all(0 < part <= payment.refundable for payment, part in parts)
    touched = [payment.sequence for payment, _ in parts]
    assert touched == sorted(touched, reverse=True)
    # newest first: every payment newer than the oldest touched one that has cash gave all of it
    if parts:
        oldest = touched[-1]
        for payment in payments:
            if payment.sequence > oldest and payment.refundable > 0:
                assert (payment, payment.refundable) in parts


@given(payments=cash_lists, extra=st.integers(1, 10_000))
def test_allocation_beyond_the_cash_left_is_rejected(payments: list[PaymentCash],
                                                     extra: int) -> None:
    with pytest.raises(errors.ExceedsRefundableAmount):
        allocate_newest_first(refundable(payments) + extra, payments)


@given(payments=cash_lists, data=st.data())
def test_planned_refunds_add_up_and_stay_within_each_payment(
        payments: list[PaymentCash], data: st.DataObject) -> None:
    linked_amounts = data.draw(st.lists(st.integers(1, 20_000), max_size=4))
    linked = [LinkedRefund(f"re_{index}", amount) for index, amount in enumerate(linked_amounts)]
    extra = data.draw(st.integers(0, 50_000))

    try:
        refunds = plan_refunds("cn_x", sum(linked_amounts) + extra, payments, linked)
    except errors.ExceedsRefundableAmount:
        return  # refused whole: nothing planned

    assert sum(r.amount for r in refunds) == sum(linked_amounts) + extra
    assert [r.refund_id for r in refunds if r.linked] == [r.refund_id for r in linked]
    by_sequence = {payment.sequence: payment for payment in payments}
    for payment in payments:
        taken = sum(r.amount for r in refunds if r.payment_sequence == payment.sequence)
        assert taken <= payment.refundable
    new = [r for r in refunds if not r.linked]
    assert len({r.payment_sequence for r in new}) == len(new)  # one new refund per payment
    assert all(by_sequence[r.payment_sequence].payment_id == r.payment_id for r in refunds)


payment_lists = st.lists(st.integers(1, 30_000), min_size=1, max_size=5).map(
    lambda amounts: [Payment(sequence=position, payment_id=None if position == 0
                             else f"pay_{position}", amount=amount, applied=amount)
                     for position, amount in enumerate(amounts)])


@settings(max_examples=200)
@given(payments=payment_lists, steps=st.lists(
    st.tuples(st.sampled_from(["credit", "link", "succeed", "fail"]),
              st.integers(0, 40_000), st.integers(0, 1_000)), max_size=25))
def test_any_sequence_of_credits_and_outcomes_keeps_the_refund_invariants(
        payments: list[Payment], steps: list[tuple[str, int, int]]) -> None:
    refunds: list[Refund] = []
    refund_amounts: dict[str, int] = {}
    for number, (kind, amount, pick) in enumerate(steps):
        note = f"cn_{number}"
        cash = cash_of(payments, refunds)
        if kind in ("credit", "link"):
            linked = [LinkedRefund(f"re_{number}", amount)] if kind == "link" and amount else []
            try:
                planned = plan_refunds(note, amount, cash, linked)
            except errors.ExceedsRefundableAmount:
                assert amount > refundable(cash) or linked
                continue
            refunds += planned
            refund_amounts[note] = amount
        else:
            pending = [r for r in refunds if r.state is PENDING]
            if pending:
                chosen = pending[pick % len(pending)]
                refunds = settle(refunds, chosen.refund_id,
                                 SUCCEEDED if kind == "succeed" else FAILED)

        # per payment: pending and succeeded refunds never exceed its applied amount
        for payment in cash_of(payments, refunds):
            assert 0 <= payment.refunded <= payment.applied
        # a refund id appears once
        assert len({r.refund_id for r in refunds}) == len(refunds)
        # per credit note: its refunds sum to its refund amount, whatever their states
        for credited, total in refund_amounts.items():
            assert sum(r.amount for r in refunds if r.credit_note_id == credited) == total
