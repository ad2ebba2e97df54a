"""The worked examples of docs/rules.md (1-18), each to the minor unit, through the aggregate.

Rejections are exceptions in the domain (the handler turns them into
``credit_note.rejected``), so a refused example asserts the exception class,
its ``code`` and that the invoice did not change.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from service.domain import errors, money
from service.domain.commands import (
    IssueCreditNote,
    OnExcess,
    ServicePeriod,
    Settlement,
    SettlementSplit,
    UnusedTime,
)
from service.domain.credit_note import CreditNote, CreditNoteStatus, CreditNoteType
from service.domain.events import (
    BalanceReason,
    CreditNoteIssued,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CustomerBalanceCredited,
    InvoicePaid,
    RefundRequested,
)
from service.domain.invoice import Invoice, InvoiceStatus
from service.domain.issuing import issue_credit_note
from service.domain.refunds import FailureSettlement, RefundState, RefundStatus

from .builders import (
    amount_off,
    by_amount,
    by_quantity,
    event_kinds,
    events_of,
    invoice,
    issue,
    journal_rows,
    line,
    paid_invoice,
    pay,
    percent_off,
    settle,
    trigger,
    void,
)


def test_example_1_overcharge_credit_lowers_amount_due_from_1000_to_800() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=100_000)])
    assert inv.amount_remaining == 100_000

    note = issue(inv, lines=[by_amount("L1", 20_000)], reason="order_change")

    assert (note.subtotal, note.tax, note.total) == (20_000, 0, 20_000)
    assert note.pre_payment_amount == 20_000
    assert note.post_payment_amount == 0
    assert note.type is CreditNoteType.PRE_PAYMENT
    assert (note.refund_amount, note.credit_amount, note.out_of_band_amount) == (0, 0, 0)
    assert inv.amount_remaining == 80_000
    assert inv.status is InvoiceStatus.OPEN
    assert event_kinds(inv) == ["CreditNoteIssued"]
    (issued,) = events_of(inv, CreditNoteIssued)
    assert issued.invoice.amount_remaining == 80_000
    assert issued.invoice.status == "open"


def test_example_2_credit_of_20_on_100_due_leaves_80_due() -> None:
    # 83.33 at 20% tax: 16.67 tax, 100.00 due.
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=8_333, tax_rate_bps=2_000)])
    assert inv.amount_remaining == 10_000

    note = issue(inv, amount=2_000)

    # 20.00 gross splits 16.666.. / 3.333..: the leftover unit goes to the net.
    assert (note.subtotal, note.tax, note.total) == (1_667, 333, 2_000)
    assert note.pre_payment_amount == 2_000
    assert note.type is CreditNoteType.PRE_PAYMENT
    assert inv.amount_remaining == 8_000
    assert inv.status is InvoiceStatus.OPEN
    assert event_kinds(inv) == ["CreditNoteIssued"]


def test_example_3_credit_of_all_that_remains_makes_invoice_paid_and_publishes_paid() -> None:
    inv = invoice(
        lines=[
            line("L1", quantity=2, unit_amount=3_000),
            line("L2", quantity=1, unit_amount=4_000),
        ],
        amount_paid=4_000,
    )
    assert inv.amount_remaining == 6_000

    note = issue(inv, amount=inv.amount_remaining)

    assert note.total == 6_000
    assert note.pre_payment_amount == 6_000
    assert note.type is CreditNoteType.PRE_PAYMENT
    assert inv.amount_remaining == 0
    assert inv.status is InvoiceStatus.PAID
    assert inv.amount_paid == 4_000  # no payment is recorded
    assert event_kinds(inv) == ["CreditNoteIssued", "InvoicePaid"]
    (issued,) = events_of(inv, CreditNoteIssued)
    assert issued.invoice.status == "paid"
    (paid,) = events_of(inv, InvoicePaid)
    assert paid.invoice_id == inv.id
    assert paid.credit_note_id == note.id
    assert paid.trigger == note.trigger


def test_example_4_explicit_split_requests_one_refund_of_200() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])

    note = issue(inv, amount=500, settlement=SettlementSplit(200, 100, 200))

    assert note.total == 500
    assert note.pre_payment_amount == 0
    assert note.type is CreditNoteType.POST_PAYMENT
    assert note.refund_amount == 200
    assert note.credit_amount == 100
    assert note.out_of_band_amount == 200
    assert inv.refunded == 200
    assert inv.status is InvoiceStatus.PAID
    assert inv.amount_remaining == 0
    assert event_kinds(inv) == ["CreditNoteIssued", "RefundRequested", "CustomerBalanceCredited"]
    (refund,) = events_of(inv, RefundRequested)
    assert refund.amount == 200
    assert refund.currency == "usd"
    assert [refund.id] == [r.refund_id for r in note.refunds]
    assert refund.credit_note_id == note.id
    assert refund.customer_id == inv.customer_id
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.reason, credited.credit_note_id) == (
        100, BalanceReason.CREDIT_NOTE, note.id)


def test_example_5_customer_balance_is_not_cash_so_only_the_50_charged_is_refunded() -> None:
    inv = invoice(
        lines=[line("L1", quantity=1, unit_amount=20_000)],
        status="paid",
        customer_balance_applied=15_000,
        amount_paid=5_000,
    )
    assert inv.amount_remaining == 0

    note = issue(inv, amount=8_000, settlement=Settlement.REFUND)

    assert note.total == 8_000
    assert note.type is CreditNoteType.POST_PAYMENT
    assert note.refund_amount == 5_000
    assert note.credit_amount == 3_000
    assert note.out_of_band_amount == 0
    assert inv.refunded == 5_000
    assert inv.refundable == 0
    (refund,) = events_of(inv, RefundRequested)
    assert refund.amount == 5_000


def test_example_6_returning_one_of_ten_lines_at_50_percent_off_credits_5() -> None:
    inv = invoice(
        lines=[line(f"L{i}", quantity=1, unit_amount=1_000) for i in range(1, 11)],
        discounts=[percent_off(5_000)],
    )
    assert inv.total == 5_000

    note = issue(inv, lines=[by_quantity("L3", 1)], reason="product_unsatisfactory")

    assert (note.subtotal, note.tax, note.total) == (500, 0, 500)
    assert note.lines[0].invoice_line_id == "L3"
    assert note.lines[0].quantity == 1
    assert inv.amount_remaining == 4_500


def test_example_7_returning_one_of_ten_lines_with_10_off_credits_9() -> None:
    inv = invoice(
        lines=[line(f"L{i}", quantity=1, unit_amount=1_000) for i in range(1, 11)],
        discounts=[amount_off(1_000)],
    )
    assert inv.total == 9_000

    note = issue(inv, lines=[by_quantity("L3", 1)], reason="product_unsatisfactory")

    assert (note.subtotal, note.tax, note.total) == (900, 0, 900)
    assert inv.amount_remaining == 8_100


def test_example_8_the_credit_note_that_crosses_the_total_is_rejected_and_changes_nothing() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    first = issue(inv, amount=6_000)
    before = copy.deepcopy(inv)
    events_before = list(inv.events)

    with pytest.raises(errors.ExceedsCreditableAmount) as refused:
        issue(inv, amount=5_000)

    assert refused.value.code == "exceeds_creditable_amount"
    assert inv == before
    assert inv.events == events_before
    assert inv.amount_remaining == 4_000
    assert inv.credit_note_count == 1
    # What is left can still be credited, and takes the next number.
    last = issue(inv, amount=4_000)
    assert first.total + last.total == inv.total
    assert last.number == "ACME-0042-CN-02"


def test_example_9_void_on_an_open_invoice_restores_the_amount_due() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    note = issue(inv, amount=2_500)
    assert inv.amount_remaining == 7_500

    voided = void(inv, note)

    assert voided.status is CreditNoteStatus.VOID
    assert voided.number == note.number == "ACME-0042-CN-01"
    assert inv.amount_remaining == 10_000
    assert inv.status is InvoiceStatus.OPEN
    assert event_kinds(inv) == ["CreditNoteIssued", "CreditNoteVoided"]


def test_example_9_void_on_a_paid_invoice_is_rejected() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    note = issue(inv, amount=2_500)
    before = copy.deepcopy(inv)

    with pytest.raises(errors.NotVoidable) as refused:
        void(inv, note)

    assert refused.value.code == "not_voidable"
    assert inv == before
    assert note.status is CreditNoteStatus.ISSUED


def test_example_10_sla_breach_of_10_percent_on_5000_paid_invoice_credits_500_to_balance() -> None:
    # 4,166.67 at 20% tax: 833.33 tax, 5,000.00 total.
    inv = paid_invoice(lines=[line("L1", quantity=1, unit_amount=416_667, tax_rate_bps=2_000)])
    assert inv.total == 500_000

    note = issue(
        inv,
        amount=money.basis_points(inv.total, 1_000),
        settlement=Settlement.CUSTOMER_BALANCE,
        on_excess=OnExcess.CAP,
        reason="service_credit",
        policy="sla_breach",
    )

    assert (note.subtotal, note.tax, note.total) == (41_667, 8_333, 50_000)
    assert note.type is CreditNoteType.POST_PAYMENT
    assert note.credit_amount == 50_000
    assert note.refund_amount == 0
    assert note.out_of_band_amount == 0
    assert note.policy == "sla_breach"
    assert inv.status is InvoiceStatus.PAID
    assert inv.refunded == 0
    assert event_kinds(inv) == ["CreditNoteIssued", "CustomerBalanceCredited"]
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.reason) == (50_000, BalanceReason.CREDIT_NOTE)


def test_example_11_cancellation_half_way_through_october_credits_19_20() -> None:
    october = ServicePeriod(start=datetime(2024, 10, 1, tzinfo=UTC), end=datetime(2024, 11, 1, tzinfo=UTC))
    inv = paid_invoice(
        lines=[line("plan", quantity=1, unit_amount=3_100, tax_rate_bps=2_000, period=october)]
    )
    assert inv.total == 3_720
    cancelled_at = datetime(2024, 10, 16, tzinfo=UTC)
    unused = int((october.end - cancelled_at).total_seconds())
    whole = int((october.end - october.start).total_seconds())
    unused_net = money.proportion(inv.line("plan").net, unused, whole)
    assert unused_net == 1_600  # 16 of 31 days

    note = issue(
        inv,
        lines=[by_amount("plan", unused_net)],
        settlement=Settlement.REFUND,
        on_excess=OnExcess.CAP,
        reason="subscription_cancellation",
    )

    assert (note.subtotal, note.tax, note.total) == (1_600, 320, 1_920)
    assert note.refund_amount == 1_920
    assert note.credit_amount == 0
    (refund,) = events_of(inv, RefundRequested)
    assert refund.amount == 1_920


def test_example_12_three_single_unit_credits_add_up_to_the_line_exactly() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=3_333, tax_rate_bps=2_000)])
    assert (inv.line("L1").net, inv.line("L1").tax) == (9_999, 2_000)

    notes = [issue(inv, lines=[by_quantity("L1", 1)]) for _ in range(3)]

    assert [(note.subtotal, note.tax) for note in notes] == [
        (3_333, 667),
        (3_333, 667),
        (3_333, 666),
    ]
    assert sum(note.total for note in notes) == 11_999 == inv.total
    assert inv.line("L1").credited_net == 9_999
    assert inv.line("L1").credited_tax == 2_000
    assert inv.line("L1").remaining_gross == 0
    assert inv.amount_remaining == 0
    assert inv.status is InvoiceStatus.PAID
    assert [note.number for note in notes] == [
        "ACME-0042-CN-01",
        "ACME-0042-CN-02",
        "ACME-0042-CN-03",
    ]


# --- time-based credits over what is left and over uncovered time (examples 13, 14) ---------

OCTOBER = ServicePeriod(start=datetime(2026, 10, 1, tzinfo=UTC), end=datetime(2026, 11, 1, tzinfo=UTC))


def _unused_time(inv: Invoice, line_id: str, day: int, kind: str) -> CreditNote:
    """A downgrade or cancellation at ``day`` October 00:00, as the translators build it."""
    return issue_credit_note(inv, IssueCreditNote(
        trigger=trigger(kind), invoice_id=inv.id, reason="subscription_cancellation",
        lines=(UnusedTime(line_id, datetime(2026, 10, day, tzinfo=UTC)),),
        on_excess=OnExcess.CAP, max_credit_bps=10_000, policy=f"{kind}:max_credit_bps=10000"))


def test_example_13_cancellation_after_half_was_returned_credits_half_of_what_is_left() -> None:
    inv = invoice(lines=[line("L1", quantity=10, unit_amount=1_000, period=OCTOBER)])
    returned = issue(inv, lines=[by_quantity("L1", 5)], on_excess=OnExcess.CAP)
    assert returned.total == 5_000

    cancelled = _unused_time(inv, "L1", 16, "subscription.canceled")

    assert (cancelled.subtotal, cancelled.tax, cancelled.total) == (2_581, 0, 2_581)  # 5000*16/31
    assert inv.line("L1").credited_net == 7_581
    assert inv.line("L1").covered_from == datetime(2026, 10, 16, tzinfo=UTC)


def test_example_14_downgrade_then_a_later_cancellation_has_nothing_left_an_earlier_one_5_days() -> None:
    inv = invoice(lines=[line("L1", quantity=10, unit_amount=1_000, period=OCTOBER)])
    downgraded = _unused_time(inv, "L1", 16, "subscription.downgraded")
    assert downgraded.total == 5_161  # 10000*16/31

    before = copy.deepcopy(inv)
    with pytest.raises(errors.NothingLeftToCredit) as refused:
        _unused_time(inv, "L1", 21, "subscription.canceled")
    assert refused.value.code == "nothing_left_to_credit"
    assert inv == before

    cancelled = _unused_time(inv, "L1", 11, "subscription.canceled")
    assert cancelled.total == 1_613  # 4839 * 5/15
    assert inv.line("L1").credited_net == 5_161 + 1_613
    assert inv.line("L1").covered_from == datetime(2026, 10, 11, tzinfo=UTC)


# --- the money loop: payments, refunds against them, outcomes, linked refunds (15-18) -------


def test_example_15_a_credit_of_70_refunds_40_on_pay_2_then_30_on_pay_1_pending() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    pay(inv, 6_000, "pay_1")
    pay(inv, 4_000, "pay_2")
    assert inv.status is InvoiceStatus.PAID

    note = issue(inv, amount=7_000, settlement=Settlement.REFUND)

    assert (note.total, note.refund_amount, note.credit_amount) == (7_000, 7_000, 0)
    assert [(r.payment_id, r.amount) for r in events_of(inv, RefundRequested)] == [
        ("pay_2", 4_000), ("pay_1", 3_000)]
    assert [r.id for r in events_of(inv, RefundRequested)] == [r.refund_id for r in note.refunds]
    assert note.refund_status is RefundStatus.PENDING
    (issued,) = events_of(inv, CreditNoteIssued)
    assert issued.credit_note.refund_status is RefundStatus.PENDING
    assert inv.refundable == 3_000
    assert event_kinds(inv) == ["CreditNoteIssued", "RefundRequested", "RefundRequested"]


def test_example_16_pay_2_fails_to_the_balance_pay_1_succeeds_then_30_more_go_to_pay_2() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    pay(inv, 6_000, "pay_1")
    pay(inv, 4_000, "pay_2")
    note = issue(inv, amount=7_000, settlement=Settlement.REFUND)
    on_pay_2, on_pay_1 = note.refunds
    inv.pop_events()

    settle(inv, on_pay_2.refund_id, RefundState.FAILED, failure_reason="card_expired")

    assert event_kinds(inv) == ["CreditNoteRefundFailed", "CustomerBalanceCredited"]
    failed, credited = inv.pop_events()
    assert isinstance(failed, CreditNoteRefundFailed)
    assert (failed.refund_id, failed.payment_id, failed.amount, failed.resettled_to) == (
        on_pay_2.refund_id, "pay_2", 4_000, FailureSettlement.CUSTOMER_BALANCE)
    assert failed.failure_reason == "card_expired"
    assert failed.refund_status is RefundStatus.PENDING  # pay_1's is still pending
    assert journal_rows(failed.journal) == [("refunds_payable", 4_000, 0),
                                            ("customer_credit_balance", 0, 4_000)]
    assert isinstance(credited, CustomerBalanceCredited)
    assert (credited.amount, credited.reason, credited.refund_id, credited.credit_note_id) == (
        4_000, BalanceReason.REFUND_FAILED, on_pay_2.refund_id, note.id)

    settle(inv, on_pay_1.refund_id, RefundState.SUCCEEDED)

    (succeeded,) = inv.pop_events()
    assert isinstance(succeeded, CreditNoteRefundSucceeded)
    assert succeeded.refund_status is RefundStatus.PARTIALLY_FAILED
    assert journal_rows(succeeded.journal) == [("refunds_payable", 3_000, 0), ("cash", 0, 3_000)]
    assert (inv.refunded, inv.refunds_failed, inv.refundable) == (7_000, 4_000, 7_000)

    later = issue(inv, amount=3_000, settlement=Settlement.REFUND)

    assert [(r.payment_id, r.amount) for r in events_of(inv, RefundRequested)] == [("pay_2", 3_000)]
    assert later.refund_amount == 3_000
    assert later.refunds[0].refund_id != on_pay_2.refund_id


def test_example_17_a_linked_refund_is_succeeded_and_not_requested_and_links_once() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=1, unit_amount=5_000)])

    note = issue(inv, amount=2_000, linked=[("re_1", 2_000)])

    assert events_of(inv, RefundRequested) == []
    assert (note.refund_amount, note.credit_amount) == (2_000, 0)
    assert note.refund_status is RefundStatus.SUCCEEDED
    assert [(r.refund_id, r.amount, r.linked) for r in note.refunds] == [("re_1", 2_000, True)]
    assert inv.refundable == 3_000
    before = copy.deepcopy(inv)

    with pytest.raises(errors.RefundAlreadyLinked) as refused:
        issue(inv, amount=1_000, linked=[("re_1", 1_000)])

    assert refused.value.code == "refund_already_linked"
    assert inv == before
    other = paid_invoice(lines=[line("L1", quantity=1, unit_amount=5_000)])
    with pytest.raises(errors.RefundAlreadyLinked):  # linked on another invoice (the lock says)
        issue(other, amount=1_000, linked=[("re_1", 1_000)], taken=["re_1"])


def test_example_18_a_payment_after_a_credit_pays_70_and_sends_30_to_the_balance() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    issue(inv, amount=3_000)
    assert inv.amount_remaining == 7_000
    inv.pop_events()

    pay(inv, 10_000, "pay_1")

    assert (inv.amount_paid, inv.status) == (7_000, InvoiceStatus.PAID)
    (credited,) = inv.pop_events()
    assert isinstance(credited, CustomerBalanceCredited)
    assert (credited.amount, credited.reason, credited.payment_id) == (
        3_000, BalanceReason.OVERPAYMENT, "pay_1")
