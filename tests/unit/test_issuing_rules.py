"""The issuing, voiding, pricing, payment, refund, editing and dating rules of docs/rules.md,
one behaviour per test."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.domain import errors
from service.domain.commands import LineRequest, OnExcess, Settlement, SettlementSplit, Trigger
from service.domain.credit_note import CreditNote, CreditNoteStatus, CreditNoteType, refund_journal
from service.domain.events import (
    BalanceReason,
    CreditNoteIssued,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CreditNoteUpdated,
    CreditNoteVoided,
    CustomerBalanceCredited,
    InvoicePaid,
    RefundRequested,
)
from service.domain.invoice import Invoice, InvoiceStatus
from service.domain.issuing import issue_credit_note
from service.domain.payments import Receipt
from service.domain.refunds import FailureSettlement, RefundState, RefundStatus, Transition

from .builders import (
    NOW,
    amount_off,
    by_amount,
    by_quantity,
    command,
    custom,
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

# --- pricing: discounts, tax, the final sweep -------------------------------------------


def test_quantity_credit_carries_the_lines_share_of_an_uneven_discount() -> None:
    # 10.00 off three lines of 10.00: 3.34 / 3.33 / 3.33 (the tie goes to the first line).
    inv = invoice(
        lines=[line(f"L{i}", quantity=1, unit_amount=1_000) for i in (1, 2, 3)],
        discounts=[amount_off(1_000)],
    )
    assert [inv.line(f"L{i}").net for i in (1, 2, 3)] == [666, 667, 667]

    first = issue(inv, lines=[by_quantity("L1", 1)])
    second = issue(inv, lines=[by_quantity("L2", 1)])

    assert first.total == 666
    assert second.total == 667


def test_partial_quantity_credit_takes_its_share_of_the_discounted_net() -> None:
    # 4 x 25.00 with 25% off: net 75.00; one unit is 18.75.
    inv = invoice(lines=[line("L1", quantity=4, unit_amount=2_500)], discounts=[percent_off(2_500)])

    note = issue(inv, lines=[by_quantity("L1", 1)])

    assert note.subtotal == 1_875


def test_line_amount_is_net_and_its_tax_is_added_in_proportion() -> None:
    # 100.00 at 8.25%: tax 8.25. Crediting 33.33 net adds 825 * 3333 / 10000 = 2.7497 -> 2.75.
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000, tax_rate_bps=825)])

    note = issue(inv, lines=[by_amount("L1", 3_333)])

    assert (note.subtotal, note.tax, note.total) == (3_333, 275, 3_608)
    assert note.lines[0].tax_rate_bps == 825


def test_tax_is_in_proportion_to_the_discounted_net_not_the_list_price() -> None:
    # 200.00 with 50% off at 10% tax: net 100.00, tax 10.00; crediting the line's one unit
    # of two credits 50.00 + 5.00.
    inv = invoice(
        lines=[line("L1", quantity=2, unit_amount=10_000, tax_rate_bps=1_000)],
        discounts=[percent_off(5_000)],
    )

    note = issue(inv, lines=[by_quantity("L1", 1)])

    assert (note.subtotal, note.tax) == (5_000, 500)


def test_final_amount_credit_takes_exactly_the_tax_that_is_left() -> None:
    # 10.00 at 7%: tax 0.70. 3.33 + 3.33 each carry 0.23; the last 3.34 carries the 0.24 left.
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=1_000, tax_rate_bps=700)])

    notes = [issue(inv, lines=[by_amount("L1", net)]) for net in (333, 333, 334)]

    assert [note.tax for note in notes] == [23, 23, 24]
    assert sum(note.total for note in notes) == inv.total == 1_070
    assert inv.line("L1").remaining_gross == 0


def test_final_quantity_credit_sweeps_what_is_left_after_rounding() -> None:
    # 7 x 14.29 = 100.03 at 5%: 5.00 tax. Five units take their rounded share, the last two
    # take exactly what is left.
    inv = invoice(lines=[line("L1", quantity=7, unit_amount=1_429, tax_rate_bps=500)])
    assert (inv.line("L1").net, inv.line("L1").tax) == (10_003, 500)

    five = issue(inv, lines=[by_quantity("L1", 5)])
    rest = issue(inv, lines=[by_quantity("L1", 2)])

    assert (five.subtotal, five.tax) == (7_145, 357)
    assert (rest.subtotal, rest.tax) == (2_858, 143)
    assert five.total + rest.total == inv.total


def test_returning_every_unit_one_at_a_time_credits_the_whole_line() -> None:
    # 30 x 0.27 with 50% off: 4.05, or 13.5 cents a unit. Rounding each return on its own
    # (14 cents) runs the line dry before its last units come back.
    inv = invoice(lines=[line("L1", quantity=30, unit_amount=27)], discounts=[percent_off(5_000)])
    assert inv.line("L1").net == 405

    notes = [issue(inv, lines=[by_quantity("L1", 1)]) for _ in range(30)]

    assert sum(note.total for note in notes) == 405
    assert all(abs(note.total * 30 - 405) < 30 for note in notes)  # each within 1 of 13.5


def test_line_credited_by_quantity_cannot_then_be_credited_by_amount() -> None:
    inv = invoice(lines=[line("L1", quantity=4, unit_amount=1_000)])
    issue(inv, lines=[by_quantity("L1", 1)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.CreditMethodConflict) as refused:
        issue(inv, lines=[by_amount("L1", 500)])

    assert refused.value.code == "credit_method_conflict"
    assert inv == before


def test_line_credited_by_amount_cannot_then_be_credited_by_quantity() -> None:
    inv = invoice(lines=[line("L1", quantity=4, unit_amount=1_000)])
    issue(inv, lines=[by_amount("L1", 500)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.CreditMethodConflict) as refused:
        issue(inv, lines=[by_quantity("L1", 1)])

    assert refused.value.code == "credit_method_conflict"
    assert inv == before


def test_each_line_keeps_its_own_credit_method() -> None:
    inv = invoice(lines=[line("L1", quantity=2, unit_amount=1_000), line("L2", unit_amount=1_000)])
    issue(inv, lines=[by_quantity("L1", 1)])

    note = issue(inv, lines=[by_amount("L2", 400), by_quantity("L1", 1)])

    assert note.total == 1_400


def test_line_less_gross_amount_is_spread_by_what_is_left_and_split_into_net_and_tax() -> None:
    # L1 60.00 untaxed, L2 40.00 + 10% tax: 104.00 in all. 10.40 gross: 6.00 on L1, 4.40 on L2
    # of which 4.00 net and 0.40 tax.
    inv = invoice(
        lines=[
            line("L1", quantity=1, unit_amount=6_000),
            line("L2", quantity=1, unit_amount=4_000, tax_rate_bps=1_000),
        ]
    )

    note = issue(inv, amount=1_040)

    by_line = {credit.invoice_line_id: (credit.net, credit.tax) for credit in note.lines}
    assert by_line == {"L1": (600, 0), "L2": (400, 40)}
    assert (note.subtotal, note.tax, note.total) == (1_000, 40, 1_040)


def test_line_less_amount_skips_lines_already_credited_in_full() -> None:
    inv = invoice(
        lines=[
            line("L1", quantity=1, unit_amount=6_000),
            line("L2", quantity=1, unit_amount=4_000, tax_rate_bps=1_000),
        ]
    )
    issue(inv, lines=[by_amount("L1", 6_000)])

    note = issue(inv, amount=1_100)

    assert [(credit.invoice_line_id, credit.net, credit.tax) for credit in note.lines] == [("L2", 1_000, 100)]


def test_custom_line_credits_its_own_amount_and_tax_without_touching_invoice_lines() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])

    note = issue(inv, lines=[custom("Goodwill", quantity=2, unit_amount=1_250, tax_rate_bps=2_000)])

    assert (note.subtotal, note.tax, note.total) == (2_500, 500, 3_000)
    assert note.lines[0].invoice_line_id is None
    assert note.lines[0].description == "Goodwill"
    assert inv.line("L1").credited_net == 0
    assert inv.amount_remaining == 7_000
    assert inv.creditable == 7_000


def test_custom_line_above_what_is_left_on_the_invoice_is_rejected() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsCreditableAmount):
        issue(inv, lines=[custom("Goodwill", quantity=1, unit_amount=10_001)])

    assert inv == before


# --- caps ---------------------------------------------------------------------------------


def test_explicit_request_for_more_than_a_line_has_left_is_rejected_whole() -> None:
    inv = invoice(lines=[line("L1", unit_amount=5_000), line("L2", unit_amount=5_000)])
    issue(inv, lines=[by_amount("L2", 3_000)])
    before = copy.deepcopy(inv)
    events_before = list(inv.events)

    with pytest.raises(errors.ExceedsCreditableAmount) as refused:
        issue(inv, lines=[by_amount("L1", 1_000), by_amount("L2", 2_001)])

    assert refused.value.code == "exceeds_creditable_amount"
    assert inv == before
    assert inv.events == events_before
    assert inv.line("L1").credited_net == 0


def test_explicit_request_for_more_units_than_are_left_is_rejected() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=1_000)])
    issue(inv, lines=[by_quantity("L1", 2)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsCreditableAmount):
        issue(inv, lines=[by_quantity("L1", 2)])

    assert inv == before


def test_explicit_line_less_amount_above_what_is_left_is_rejected() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsCreditableAmount):
        issue(inv, amount=10_001)

    assert inv == before


def test_trigger_asking_for_more_than_is_left_is_capped_at_what_is_left() -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000, tax_rate_bps=1_000)])
    issue(inv, amount=7_000)

    capped = issue(inv, amount=50_000, on_excess=OnExcess.CAP)

    assert capped.total == 4_000
    assert inv.credited_total == inv.total == 11_000
    assert inv.line("L1").remaining_gross == 0


def test_trigger_returning_more_units_than_are_left_credits_the_units_left() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=1_000)])
    issue(inv, lines=[by_quantity("L1", 2)])

    capped = issue(inv, lines=[by_quantity("L1", 5)], on_excess=OnExcess.CAP)

    assert capped.total == 1_000
    assert capped.lines[0].quantity == 1


def test_trigger_crediting_a_line_amount_above_what_is_left_is_capped() -> None:
    inv = invoice(lines=[line("L1", unit_amount=3_100, tax_rate_bps=2_000)])
    issue(inv, lines=[by_amount("L1", 2_000)])

    capped = issue(inv, lines=[by_amount("L1", 1_600)], on_excess=OnExcess.CAP)

    assert (capped.subtotal, capped.tax) == (1_100, 220)
    assert inv.line("L1").remaining_gross == 0


def test_trigger_capped_at_the_invoice_total_never_credits_a_line_more_than_it_asked() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    issue(inv, lines=[custom("Goodwill", quantity=1, unit_amount=7_000)])
    assert inv.creditable == 3_000

    note = issue(
        inv,
        lines=[custom("Goodwill", quantity=1, unit_amount=5_000), by_amount("L1", 100)],
        on_excess=OnExcess.CAP,
    )

    assert note.total <= 3_000
    assert sum(credited.net for credited in note.lines if credited.invoice_line_id == "L1") <= 100
    assert inv.line("L1").credited_net <= 100


@pytest.mark.parametrize(("on_excess", "reason"), [
    (OnExcess.REJECT, errors.ExceedsCreditableAmount),  # an explicit command asked too much
    (OnExcess.CAP, errors.NothingLeftToCredit),  # a trigger is capped; nothing left is its reason
])
def test_a_credit_on_a_fully_credited_invoice_is_rejected_with_its_reason(
        on_excess: OnExcess, reason: type[errors.Rejection]) -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
    issue(inv, amount=10_000)
    before = copy.deepcopy(inv)

    with pytest.raises(reason):
        issue(inv, amount=500, on_excess=on_excess)

    assert inv == before


def test_trigger_returning_units_of_a_fully_credited_line_has_nothing_left() -> None:
    inv = invoice(lines=[line("L1", quantity=2, unit_amount=1_000)])
    issue(inv, lines=[by_quantity("L1", 2)])

    with pytest.raises(errors.NothingLeftToCredit):
        issue(inv, lines=[by_quantity("L1", 1)], on_excess=OnExcess.CAP)


@pytest.mark.parametrize("request_", [{"lines": [by_amount("L1", 0)]}, {"amount": 0}],
                         ids=["line-amount", "line-less"])
def test_zero_amount_credit_is_refused_as_invalid_and_changes_nothing(
        request_: dict[str, Any]) -> None:
    inv = invoice()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.InvalidMessage):
        issue(inv, **request_)
    assert inv == before


# --- refusals before anything changes -----------------------------------------------------


def test_credit_note_on_a_void_invoice_is_rejected() -> None:
    inv = invoice()
    inv.void()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.InvoiceVoid) as refused:
        issue(inv, amount=100)

    assert refused.value.code == "invoice_void"
    assert inv == before
    assert inv.events == []


def test_credit_note_in_another_currency_is_rejected() -> None:
    inv = invoice(currency="usd")
    before = copy.deepcopy(inv)

    with pytest.raises(errors.CurrencyMismatch) as refused:
        issue(inv, amount=100, currency="eur")

    assert refused.value.code == "currency_mismatch"
    assert inv == before


def test_credit_note_in_the_invoice_currency_is_accepted() -> None:
    inv = invoice(currency="jpy")

    note = issue(inv, amount=100, currency="jpy")

    assert note.currency == "jpy"


def test_settlement_split_that_does_not_add_up_to_the_post_payment_part_is_rejected() -> None:
    inv = paid_invoice()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.SettlementMismatch) as refused:
        issue(inv, amount=500, settlement=SettlementSplit(refund_amount=200, credit_amount=200))

    assert refused.value.code == "settlement_mismatch"
    assert inv == before


def test_settlement_split_on_a_wholly_pre_payment_credit_must_be_all_zero() -> None:
    inv = invoice()

    with pytest.raises(errors.SettlementMismatch):
        issue(inv, amount=500, settlement=SettlementSplit(refund_amount=500))


def test_refund_above_the_cash_collected_is_rejected() -> None:
    inv = invoice(
        lines=[line("L1", unit_amount=20_000)],
        status="paid",
        customer_balance_applied=15_000,
        amount_paid=5_000,
    )
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsRefundableAmount) as refused:
        issue(inv, amount=8_000, settlement=SettlementSplit(refund_amount=6_000, credit_amount=2_000))

    assert refused.value.code == "exceeds_refundable_amount"
    assert inv == before


def test_refund_settlement_only_refunds_cash_not_already_refunded() -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
    first = issue(inv, amount=7_000, settlement=Settlement.REFUND)

    second = issue(inv, amount=3_000, settlement=Settlement.REFUND)

    assert (first.refund_amount, first.credit_amount) == (7_000, 0)
    assert (second.refund_amount, second.credit_amount) == (3_000, 0)
    assert inv.refunded == 10_000
    assert [event.amount for event in events_of(inv, RefundRequested)] == [7_000, 3_000]


def test_refund_settlement_on_an_invoice_paid_by_balance_sends_everything_to_balance() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)], status="paid", customer_balance_applied=10_000)

    note = issue(inv, amount=4_000, settlement=Settlement.REFUND)

    assert (note.refund_amount, note.credit_amount) == (0, 4_000)
    assert note.refund_id is None
    assert events_of(inv, RefundRequested) == []


def test_out_of_band_settlement_records_the_whole_post_payment_part_outside() -> None:
    inv = paid_invoice()

    note = issue(inv, amount=2_500, settlement=Settlement.OUT_OF_BAND)

    assert (note.refund_amount, note.credit_amount, note.out_of_band_amount) == (0, 0, 2_500)
    assert inv.refunded == 0


def test_unknown_invoice_line_is_rejected() -> None:
    inv = invoice()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.UnknownInvoiceLine) as refused:
        issue(inv, lines=[by_quantity("L9", 1)])

    assert refused.value.code == "unknown_invoice_line"
    assert inv == before


def test_the_same_invoice_line_twice_in_one_credit_note_is_invalid() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=1_000)])

    with pytest.raises(errors.InvalidMessage):
        issue(inv, lines=[by_quantity("L1", 1), by_quantity("L1", 1)])


def test_unknown_reason_is_invalid() -> None:
    inv = invoice()

    with pytest.raises(errors.InvalidMessage):
        issue(inv, amount=100, reason="because")


@pytest.mark.parametrize(
    "request_lines",
    [
        pytest.param([by_amount("L1", -500), by_amount("L2", 600)], id="by-amount"),
        pytest.param([by_quantity("L1", -1), by_quantity("L2", 2)], id="by-quantity"),
        pytest.param([custom("Adjustment", 1, -500), by_amount("L2", 600)], id="custom"),
    ],
)
def test_negative_line_in_a_credit_note_is_refused_and_changes_nothing(
    request_lines: list[LineRequest],
) -> None:
    # A negative line would debit the invoice inside a credit note and reopen room on its
    # line: after -5.00 on L1, a later note could credit 15.00 on the 10.00 line.
    inv = invoice(lines=[line("L1", quantity=2, unit_amount=500), line("L2", quantity=2, unit_amount=500)])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.CreditNoteError):
        issue(inv, lines=request_lines)

    assert inv == before


def test_negative_line_less_amount_is_refused_as_a_credit_note_error() -> None:
    inv = invoice()

    with pytest.raises(errors.CreditNoteError):
        issue(inv, amount=-500)


def test_settlement_split_with_a_negative_part_is_refused() -> None:
    # Otherwise a "refund" of -1.00 is requested from the payment provider.
    inv = paid_invoice()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.CreditNoteError):
        issue(inv, amount=500, settlement=SettlementSplit(refund_amount=-100, credit_amount=600))

    assert inv == before
    assert events_of(inv, RefundRequested) == []


# --- pre/post-payment split and invoice state --------------------------------------------


def test_credit_above_what_is_owed_is_mixed_and_refunds_the_rest() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)], amount_paid=6_000)

    note = issue(inv, amount=5_000, settlement=Settlement.REFUND)

    assert note.pre_payment_amount == 4_000
    assert note.post_payment_amount == 1_000
    assert note.type is CreditNoteType.MIXED
    assert note.refund_amount == 1_000
    assert inv.status is InvoiceStatus.PAID
    assert inv.amount_remaining == 0
    assert event_kinds(inv) == ["CreditNoteIssued", "InvoicePaid", "RefundRequested"]


def test_credit_on_an_uncollectible_invoice_reduces_what_is_owed() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    inv.mark_uncollectible()

    note = issue(inv, amount=10_000)

    assert note.type is CreditNoteType.PRE_PAYMENT
    assert inv.amount_remaining == 0
    assert inv.status is InvoiceStatus.UNCOLLECTIBLE
    assert event_kinds(inv) == ["CreditNoteIssued"]


def test_credit_note_never_changes_the_invoice_lines_or_totals() -> None:
    inv = invoice(
        lines=[line("L1", quantity=2, unit_amount=1_000, tax_rate_bps=1_000)],
        discounts=[percent_off(1_000)],
    )
    totals = (inv.subtotal, inv.discount, inv.tax, inv.total, inv.amount_due)
    priced = [(li.quantity, li.unit_amount, li.discount, li.tax) for li in inv.lines]

    issue(inv, lines=[by_quantity("L1", 1)])

    assert (inv.subtotal, inv.discount, inv.tax, inv.total, inv.amount_due) == totals
    assert [(li.quantity, li.unit_amount, li.discount, li.tax) for li in inv.lines] == priced


# --- numbering ----------------------------------------------------------------------------


def test_credit_notes_are_numbered_per_invoice_without_gaps() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])

    first = issue(inv, amount=1_000)
    with pytest.raises(errors.ExceedsCreditableAmount):
        issue(inv, amount=50_000)
    second = issue(inv, amount=1_000)
    void(inv, second)
    third = issue(inv, amount=1_000)

    assert [first.number, second.number, third.number] == [
        "ACME-0042-CN-01",
        "ACME-0042-CN-02",
        "ACME-0042-CN-03",
    ]
    assert [first.sequence, second.sequence, third.sequence] == [1, 2, 3]


def test_credit_note_numbers_use_at_least_two_digits() -> None:
    inv = invoice(lines=[line("L1", unit_amount=100_000)], number="INV-7")

    numbers = [issue(inv, amount=100).number for _ in range(10)]

    assert numbers[0] == "INV-7-CN-01"
    assert numbers[8] == "INV-7-CN-09"
    assert numbers[9] == "INV-7-CN-10"


def test_the_same_trigger_always_derives_the_same_credit_note_id() -> None:
    request = command(amount=100)
    first = issue_credit_note(invoice(), request)
    again = issue_credit_note(invoice(), request)

    assert first.id == again.id
    assert first.id != issue(invoice(), amount=100).id


# --- voiding ------------------------------------------------------------------------------


def test_void_restores_the_amount_remaining_and_the_line_remainders() -> None:
    inv = invoice(
        lines=[
            line("L1", quantity=3, unit_amount=1_000, tax_rate_bps=2_000),
            line("L2", quantity=1, unit_amount=5_000),
        ]
    )
    note = issue(inv, lines=[by_quantity("L1", 2), by_amount("L2", 1_000)])
    assert inv.amount_remaining == 8_600 - 3_400

    voided = void(inv, note)

    assert voided.status is CreditNoteStatus.VOID
    assert voided.number == "ACME-0042-CN-01"
    assert voided.total == note.total == 3_400
    assert inv.amount_remaining == 8_600
    assert inv.credited_total == 0
    for invoice_line in inv.lines:
        assert invoice_line.credited_net == 0
        assert invoice_line.credited_tax == 0
        assert invoice_line.credited_quantity == 0
    (event,) = events_of(inv, CreditNoteVoided)
    assert event.credit_note.status is CreditNoteStatus.VOID
    assert event.invoice.amount_remaining == 8_600


def test_after_a_void_the_line_is_free_to_be_credited_in_full_by_either_method() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=1_000)])
    void(inv, issue(inv, lines=[by_quantity("L1", 2)]))

    again = issue(inv, lines=[by_amount("L1", 3_000)])

    assert again.total == 3_000
    assert inv.status is InvoiceStatus.PAID


def test_void_keeps_the_units_other_live_notes_credited_on_the_line() -> None:
    # 5 x 0.01 with 60% off: L1 is worth 0.02, so one unit rounds to nothing and two to 0.01.
    inv = invoice(
        lines=[line("L1", quantity=5, unit_amount=1), line("L2", quantity=1, unit_amount=1_000)],
        discounts=[percent_off(6_000)],
    )
    assert inv.line("L1").net == 2
    issue(inv, lines=[by_quantity("L1", 1), by_amount("L2", 100)])  # stays live: 1 unit of L1
    void(inv, issue(inv, lines=[by_quantity("L1", 2)]))

    # L1 was credited by quantity by a live note, so it keeps to quantity ...
    with pytest.raises(errors.CreditMethodConflict):
        issue(inv, lines=[by_amount("L1", 2)])
    # ... and only 4 of its 5 units are left.
    with pytest.raises(errors.ExceedsCreditableAmount):
        issue(inv, lines=[by_quantity("L1", 5)])


def test_a_void_credit_note_cannot_be_voided_again() -> None:
    inv = invoice()
    voided = void(inv, issue(inv, amount=1_000))
    before = copy.deepcopy(inv)

    with pytest.raises(errors.AlreadyVoid) as refused:
        void(inv, voided)

    assert refused.value.code == "already_void"
    assert inv == before


def test_credit_note_that_paid_its_invoice_cannot_be_voided() -> None:
    inv = invoice()
    note = issue(inv, amount=inv.amount_remaining)
    assert inv.status is InvoiceStatus.PAID

    with pytest.raises(errors.NotVoidable):
        void(inv, note)


def test_post_payment_credit_note_cannot_be_voided_even_on_an_open_invoice() -> None:
    # An open invoice with nothing left to pay is recorded as paid at finalization, so
    # this state is built by hand: the void check still guards it.
    inv = invoice(lines=[line("L1", unit_amount=10_000)], status="paid", amount_paid=10_000)
    note = issue(inv, amount=1_000)
    inv.status = InvoiceStatus.OPEN
    assert note.type is CreditNoteType.POST_PAYMENT
    before = copy.deepcopy(inv)

    with pytest.raises(errors.NotVoidable) as refused:
        void(inv, note)

    assert refused.value.code == "not_voidable"
    assert inv == before


def test_credit_note_on_an_uncollectible_invoice_cannot_be_voided() -> None:
    inv = invoice()
    note = issue(inv, amount=1_000)
    inv.mark_uncollectible()

    with pytest.raises(errors.NotVoidable):
        void(inv, note)


# --- accounting ---------------------------------------------------------------------------


def test_mixed_credit_note_posts_a_balanced_journal() -> None:
    # 90.00 + 10% tax = 99.00, 50.00 paid, 49.00 owed; credit 60.00 gross with refund.
    inv = invoice(lines=[line("L1", unit_amount=9_000, tax_rate_bps=1_000)], amount_paid=5_000)

    note = issue(inv, amount=6_000, settlement=Settlement.REFUND)

    assert journal_rows(note.journal) == [
        ("contra_revenue", 5_455, 0),
        ("sales_tax_payable", 545, 0),
        ("accounts_receivable", 0, 4_900),
        ("refunds_payable", 0, 1_100),
    ]
    assert sum(e.debit for e in note.journal) == sum(e.credit for e in note.journal) == 6_000


def test_journal_credits_customer_balance_and_out_of_band_parts() -> None:
    inv = paid_invoice()

    note = issue(inv, amount=500, settlement=SettlementSplit(200, 100, 200))

    assert journal_rows(note.journal) == [
        ("contra_revenue", 500, 0),
        ("refunds_payable", 0, 200),
        ("customer_credit_balance", 0, 100),
        ("out_of_band_settlement", 0, 200),
    ]


def test_void_posts_the_exact_reverse_of_the_issue_journal() -> None:
    inv = invoice(lines=[line("L1", unit_amount=9_000, tax_rate_bps=1_000)])
    note = issue(inv, amount=6_000)

    voided = void(inv, note)

    assert journal_rows(voided.void_journal) == [
        ("contra_revenue", 0, 5_455),
        ("sales_tax_payable", 0, 545),
        ("accounts_receivable", 6_000, 0),
    ]
    for issued, reversed_ in zip(note.journal, voided.void_journal, strict=True):
        assert reversed_.account == issued.account
        assert (reversed_.debit, reversed_.credit) == (issued.credit, issued.debit)


# --- finalizing invoices ------------------------------------------------------------------


def test_invoice_is_priced_as_subtotal_minus_discount_plus_tax() -> None:
    inv = invoice(
        lines=[
            line("L1", quantity=2, unit_amount=3_000, tax_rate_bps=2_000),
            line("L2", quantity=1, unit_amount=4_000),
        ],
        discounts=[percent_off(1_000)],
        customer_balance_applied=1_000,
        amount_paid=2_000,
    )

    assert (inv.subtotal, inv.discount) == (10_000, 1_000)
    assert [(li.discount, li.net, li.tax) for li in inv.lines] == [
        (600, 5_400, 1_080),
        (400, 3_600, 0),
    ]
    assert inv.tax == 1_080
    assert inv.total == 10_080
    assert inv.amount_due == 9_080
    assert inv.amount_remaining == 7_080


def test_invoice_whose_stated_total_differs_is_refused() -> None:
    with pytest.raises(errors.InvoiceTotalMismatch) as refused:
        invoice(lines=[line("L1", unit_amount=10_000, tax_rate_bps=1_000)], stated_total=10_000)

    assert refused.value.code == "invoice_total_mismatch"


def test_invoice_whose_stated_total_matches_is_accepted() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000, tax_rate_bps=1_000)], stated_total=11_000)

    assert inv.total == 11_000


def test_amount_off_discount_is_capped_at_the_subtotal() -> None:
    inv = invoice(
        lines=[line("L1", unit_amount=6_000, tax_rate_bps=1_000), line("L2", unit_amount=4_000)],
        discounts=[amount_off(50_000)],
    )

    assert inv.discount == 10_000
    assert inv.total == 0
    assert [li.net for li in inv.lines] == [0, 0]
    with pytest.raises(errors.NothingLeftToCredit):
        issue(inv, amount=100, on_excess=OnExcess.CAP)


def test_several_discounts_add_up_before_the_cap() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)], discounts=[percent_off(1_000), amount_off(500)])

    assert inv.discount == 1_500
    assert inv.total == 8_500


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"lines": []}, "invalid_message"),
        ({"lines": [line("L1"), line("L1")]}, "invalid_message"),
        ({"customer_balance_applied": 10_001}, "invalid_message"),
        ({"amount_paid": 10_001}, "invoice_inconsistent"),
    ],
)
def test_malformed_invoices_are_refused(kwargs: dict[str, object], code: str) -> None:
    with pytest.raises(errors.Undeliverable) as refused:
        invoice(**kwargs)  # type: ignore[arg-type]

    assert refused.value.code == code


# --- payments and invoice transitions -----------------------------------------------------


def test_payment_of_the_amount_remaining_makes_the_invoice_paid() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    issue(inv, amount=2_000)

    pay(inv, 3_000, "pay_1")
    assert inv.status is InvoiceStatus.OPEN
    pay(inv, 5_000, "pay_2")

    assert inv.amount_paid == 8_000
    assert inv.amount_remaining == 0
    assert inv.status is InvoiceStatus.PAID
    assert [(p.sequence, p.payment_id, p.amount, p.applied) for p in inv.payments] == [
        (1, "pay_1", 3_000, 3_000), (2, "pay_2", 5_000, 5_000)]
    assert events_of(inv, InvoicePaid) == []  # the payment's sender knows it was paid
    assert events_of(inv, CustomerBalanceCredited) == []


def test_payment_above_the_amount_remaining_applies_what_is_owed_and_credits_the_rest() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    issue(inv, amount=2_000)

    receipt = pay(inv, 8_500, "pay_1")

    assert receipt is Receipt.NEW
    assert (inv.amount_paid, inv.amount_remaining, inv.status) == (8_000, 0, InvoiceStatus.PAID)
    assert [(p.amount, p.applied) for p in inv.payments] == [(8_500, 8_000)]
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.reason, credited.payment_id) == (
        500, BalanceReason.OVERPAYMENT, "pay_1")
    assert (credited.customer_id, credited.invoice_id, credited.currency) == (
        inv.customer_id, inv.id, "usd")
    assert credited.credit_note_id is None and credited.refund_id is None
    assert inv.refundable == 8_000  # the overpayment is not this invoice's cash


def test_payment_on_a_paid_invoice_is_recorded_as_an_overpayment_not_refused() -> None:
    inv = paid_invoice()

    pay(inv, 2_500, "pay_late")

    assert inv.status is InvoiceStatus.PAID
    assert inv.amount_paid == 10_000
    assert inv.payments[-1].applied == 0
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.reason) == (2_500, BalanceReason.OVERPAYMENT)


def test_payment_on_a_void_invoice_goes_wholly_to_the_customer_balance() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    inv.void()

    pay(inv, 4_000)

    assert (inv.status, inv.amount_paid, inv.amount_remaining) == (InvoiceStatus.VOID, 0, 10_000)
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.payment_id) == (4_000, None)


def test_payment_settling_an_uncollectible_invoice_makes_it_paid() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    inv.mark_uncollectible()

    pay(inv, 4_000)
    assert inv.status is InvoiceStatus.UNCOLLECTIBLE
    pay(inv, 6_000)

    assert (inv.status, inv.amount_paid) == (InvoiceStatus.PAID, 10_000)


def test_the_same_payment_id_and_amount_again_is_a_duplicate_without_effect() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    pay(inv, 3_000, "pay_1")
    before = copy.deepcopy(inv)

    receipt = pay(inv, 3_000, "pay_1")

    assert receipt is Receipt.DUPLICATE
    assert inv == before
    assert inv.events == before.events


def test_the_same_payment_id_with_another_amount_is_a_conflict_and_changes_nothing() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    pay(inv, 3_000, "pay_1")
    before = copy.deepcopy(inv)

    with pytest.raises(errors.PaymentConflict) as refused:
        pay(inv, 3_001, "pay_1")

    assert refused.value.code == "payment_conflict"
    assert not refused.value.retryable
    assert inv == before


def test_payments_without_an_id_are_each_a_new_payment() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])

    pay(inv, 1_000)
    pay(inv, 1_000)

    assert [(p.sequence, p.payment_id) for p in inv.payments] == [(1, None), (2, None)]
    assert inv.amount_paid == 2_000


def test_the_amount_paid_at_finalization_is_the_oldest_payment_with_no_id() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)], amount_paid=4_000)

    pay(inv, 1_000, "pay_1")

    assert [(p.sequence, p.payment_id, p.applied, p.trigger is None) for p in inv.payments] == [
        (0, None, 4_000, True), (1, "pay_1", 1_000, False)]


def test_payment_in_another_currency_is_dead_lettered_currency_mismatch() -> None:
    inv = invoice()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.PaymentCurrencyMismatch) as refused:
        pay(inv, 100, "pay_1", currency="eur")

    assert isinstance(refused.value, errors.Undeliverable)
    assert refused.value.code == "currency_mismatch"
    assert inv == before


@pytest.mark.parametrize("amount", [0, -300])
def test_a_payment_that_is_not_positive_is_invalid_and_changes_nothing(amount: int) -> None:
    # Otherwise amount_paid goes down and the amount remaining goes up.
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    pay(inv, 3_000, "pay_1")
    before = copy.deepcopy(inv)

    for payment_id in (None, "pay_1"):  # invalid, not a conflict with pay_1
        with pytest.raises(errors.InvalidMessage):
            pay(inv, amount, payment_id)

    assert inv == before


def test_paid_invoice_cannot_be_voided_or_marked_uncollectible() -> None:
    inv = paid_invoice()

    with pytest.raises(errors.InvalidInvoiceTransition):
        inv.void()
    with pytest.raises(errors.InvalidInvoiceTransition):
        inv.mark_uncollectible()
    assert inv.status is InvoiceStatus.PAID


def test_uncollectible_invoice_can_still_be_voided_and_repeat_transitions_are_no_ops() -> None:
    inv = invoice()
    inv.mark_uncollectible()
    inv.mark_uncollectible()
    inv.void()
    inv.void()

    assert inv.status is InvoiceStatus.VOID


# --- refunds against payments ---------------------------------------------------------------


def _paid_by(*payments: tuple[str | None, int], total: int = 10_000) -> Invoice:
    inv = invoice(lines=[line("L1", unit_amount=total)])
    for payment_id, amount in payments:
        pay(inv, amount, payment_id)
    return inv


def test_a_refund_goes_to_the_newest_payment_first_one_request_per_payment() -> None:
    inv = _paid_by(("pay_1", 5_000), ("pay_2", 3_000), ("pay_3", 2_000))

    note = issue(inv, amount=6_000, settlement=Settlement.REFUND)

    requested = events_of(inv, RefundRequested)
    assert [(r.payment_id, r.amount) for r in requested] == [
        ("pay_3", 2_000), ("pay_2", 3_000), ("pay_1", 1_000)]
    assert [r.id for r in requested] == [r.refund_id for r in note.refunds]
    assert len({r.id for r in requested}) == 3
    assert all(r.credit_note_id == note.id and r.trigger == note.trigger for r in requested)
    assert note.refund_id is None  # the ids live in its refunds


def test_the_same_credit_note_priced_again_has_the_same_refund_ids() -> None:
    inv = _paid_by(("pay_1", 5_000), ("pay_2", 5_000))
    request = command(amount=7_000, settlement=Settlement.REFUND)
    first, again = copy.deepcopy(inv), copy.deepcopy(inv)

    one = issue_credit_note(first, request, now=NOW)
    two = issue_credit_note(again, request, now=NOW)

    assert [r.refund_id for r in one.refunds] == [r.refund_id for r in two.refunds]


def test_the_finalization_payment_is_refunded_last_with_no_payment_id() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)], amount_paid=6_000)
    pay(inv, 4_000, "pay_1")

    issue(inv, amount=5_000, settlement=Settlement.REFUND)

    assert [(r.payment_id, r.amount) for r in events_of(inv, RefundRequested)] == [
        ("pay_1", 4_000), (None, 1_000)]


def test_an_explicit_refund_above_the_cash_left_is_rejected_even_after_outcomes() -> None:
    # 200.00 invoice, 100.00 of balance applied, 100.00 paid: 60.00 refunded, 40.00 left.
    inv = invoice(lines=[line("L1", unit_amount=20_000)], status="paid",
                  customer_balance_applied=10_000, amount_paid=10_000)
    note = issue(inv, amount=6_000, settlement=Settlement.REFUND)
    settle(inv, note.refunds[0].refund_id, RefundState.SUCCEEDED)
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsRefundableAmount):
        issue(inv, amount=5_000, settlement=SettlementSplit(refund_amount=4_001, credit_amount=999))

    assert inv == before
    assert issue(inv, amount=5_000, settlement=Settlement.REFUND).refund_amount == 4_000


# --- linked refunds ---------------------------------------------------------------------------


def test_linked_refunds_take_cash_first_and_the_rest_of_refund_amount_is_requested() -> None:
    inv = _paid_by(("pay_1", 6_000), ("pay_2", 4_000))

    note = issue(inv, amount=7_000, settlement=SettlementSplit(refund_amount=7_000),
                 linked=[("re_9", 3_500)])

    # a linked refund goes whole onto the newest payment that holds it; new ones fill in after
    assert [(r.payment_id, r.amount, r.linked, r.state) for r in note.refunds] == [
        ("pay_2", 3_500, True, RefundState.SUCCEEDED),
        ("pay_2", 500, False, RefundState.PENDING),
        ("pay_1", 3_000, False, RefundState.PENDING)]
    assert note.refunds[0].refund_id == "re_9"
    assert [(r.payment_id, r.amount) for r in events_of(inv, RefundRequested)] == [
        ("pay_2", 500), ("pay_1", 3_000)]
    assert note.refund_status is RefundStatus.PENDING
    assert inv.refundable == 3_000


def test_linked_refunds_without_a_refund_amount_make_it_and_the_rest_goes_to_the_balance() -> None:
    inv = _paid_by(("pay_1", 10_000))

    note = issue(inv, amount=5_000, linked=[("re_1", 1_500), ("re_2", 500)])

    assert (note.refund_amount, note.credit_amount, note.out_of_band_amount) == (2_000, 3_000, 0)
    assert note.refund_status is RefundStatus.SUCCEEDED
    assert events_of(inv, RefundRequested) == []
    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert credited.amount == 3_000


def test_an_explicit_refund_amount_below_the_linked_refunds_is_a_settlement_mismatch() -> None:
    inv = _paid_by(("pay_1", 10_000))
    before = copy.deepcopy(inv)

    with pytest.raises(errors.SettlementMismatch):
        issue(inv, amount=5_000, settlement=SettlementSplit(refund_amount=1_000, credit_amount=4_000),
              linked=[("re_1", 2_000)])

    assert inv == before


def test_linked_refunds_above_the_post_payment_part_are_a_settlement_mismatch() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    pay(inv, 2_000, "pay_1")
    before = copy.deepcopy(inv)

    with pytest.raises(errors.SettlementMismatch):  # 9,000 credited: 8,000 pre-payment, 1,000 post
        issue(inv, amount=9_000, linked=[("re_1", 2_000)])

    assert inv == before


def test_a_linked_refund_no_single_payment_holds_exceeds_the_refundable_amount() -> None:
    inv = _paid_by(("pay_1", 5_000), ("pay_2", 5_000))
    before = copy.deepcopy(inv)

    with pytest.raises(errors.ExceedsRefundableAmount):  # a refund goes back to one payment
        issue(inv, amount=6_000, linked=[("re_1", 6_000)])

    assert inv == before


def test_a_refund_id_of_this_invoice_or_one_the_lock_reports_cannot_be_linked() -> None:
    inv = _paid_by(("pay_1", 10_000))
    requested = issue(inv, amount=1_000, settlement=Settlement.REFUND).refunds[0].refund_id
    before = copy.deepcopy(inv)

    for taken_id, taken in ((requested, ()), ("re_elsewhere", ("re_elsewhere",))):
        with pytest.raises(errors.RefundAlreadyLinked):
            issue(inv, amount=1_000, linked=[(taken_id, 1_000)], taken=taken)

    assert inv == before


def test_the_same_refund_id_twice_in_one_credit_note_is_invalid() -> None:
    inv = _paid_by(("pay_1", 10_000))

    with pytest.raises(errors.InvalidMessage):
        issue(inv, amount=2_000, linked=[("re_1", 1_000), ("re_1", 1_000)])


def test_a_linked_refund_posts_its_succeeded_lines_at_issue() -> None:
    inv = _paid_by(("pay_1", 10_000))

    note = issue(inv, amount=2_000, linked=[("re_1", 2_000)])

    (linked,) = note.refunds
    assert journal_rows(refund_journal(linked)) == [("refunds_payable", 2_000, 0), ("cash", 0, 2_000)]
    assert linked.settled_at == note.effective_at
    assert linked.open_payable == 0


# --- refund outcomes --------------------------------------------------------------------------


def _pending_refund(settlement_amount: int = 4_000) -> tuple[Invoice, str]:
    inv = _paid_by(("pay_1", 10_000))
    note = issue(inv, amount=settlement_amount, settlement=Settlement.REFUND)
    inv.pop_events()
    return inv, note.refunds[0].refund_id


def test_a_succeeded_refund_posts_refunds_payable_to_cash_dated_its_event() -> None:
    inv, refund_id = _pending_refund()
    at = datetime(2026, 11, 29, 9, 30, tzinfo=UTC)

    step = inv.settle_refund(refund_id, RefundState.SUCCEEDED,
                             Trigger("psp", "evt_ok", "refund.succeeded", time=at), now=NOW)

    assert step is Transition.APPLY
    (event,) = inv.pop_events()
    assert isinstance(event, CreditNoteRefundSucceeded)
    assert (event.effective_at, event.refund_status) == (at, RefundStatus.SUCCEEDED)
    assert journal_rows(event.journal) == [("refunds_payable", 4_000, 0), ("cash", 0, 4_000)]
    (refund,) = inv.refunds
    assert (refund.state, refund.settled_at, refund.settled_by) == (
        RefundState.SUCCEEDED, at, event.trigger)
    assert inv.refundable == 6_000


def test_a_failed_refund_gives_the_cash_back_and_goes_to_the_balance_by_default() -> None:
    inv, refund_id = _pending_refund()

    settle(inv, refund_id, RefundState.FAILED)

    assert event_kinds(inv) == ["CreditNoteRefundFailed", "CustomerBalanceCredited"]
    assert (inv.refundable, inv.refunds_failed, inv.refunded) == (10_000, 4_000, 4_000)
    (refund,) = inv.refunds
    assert (refund.resettled_to, refund.to_customer_balance, refund.open_payable) == (
        FailureSettlement.CUSTOMER_BALANCE, 4_000, 0)
    (failed,) = events_of(inv, CreditNoteRefundFailed)
    assert failed.effective_at == NOW  # no event time: when it was processed
    assert failed.refund_status is RefundStatus.FAILED


def test_a_failed_refund_settled_as_none_stays_in_refunds_payable_without_a_balance_event() -> None:
    inv, refund_id = _pending_refund()

    settle(inv, refund_id, RefundState.FAILED, settlement=FailureSettlement.NONE)

    (failed,) = inv.pop_events()
    assert isinstance(failed, CreditNoteRefundFailed)
    assert (failed.resettled_to, failed.journal) == (FailureSettlement.NONE, ())
    assert inv.refunds[0].open_payable == 4_000
    assert inv.refundable == 10_000  # the money never left


def test_the_same_outcome_again_has_no_effect() -> None:
    inv, refund_id = _pending_refund()
    settle(inv, refund_id, RefundState.FAILED)
    inv.pop_events()
    before = copy.deepcopy(inv)

    step = settle(inv, refund_id, RefundState.FAILED, settlement=FailureSettlement.NONE)

    assert step is Transition.DUPLICATE
    assert inv == before
    assert inv.events == []


@pytest.mark.parametrize(("first", "then"), [(RefundState.SUCCEEDED, RefundState.FAILED),
                                             (RefundState.FAILED, RefundState.SUCCEEDED)])
def test_the_opposite_outcome_after_a_final_one_is_a_conflict_and_changes_nothing(
        first: RefundState, then: RefundState) -> None:
    inv, refund_id = _pending_refund()
    settle(inv, refund_id, first)
    inv.pop_events()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.RefundStateConflict) as refused:
        settle(inv, refund_id, then)

    assert (refused.value.code, refused.value.retryable) == ("refund_state_conflict", False)
    assert inv == before
    assert inv.events == []


def test_a_failure_for_a_linked_refund_is_a_conflict() -> None:
    inv = _paid_by(("pay_1", 10_000))
    issue(inv, amount=2_000, linked=[("re_1", 2_000)])

    with pytest.raises(errors.RefundStateConflict):
        settle(inv, "re_1", RefundState.FAILED)
    assert settle(inv, "re_1", RefundState.SUCCEEDED) is Transition.DUPLICATE


def test_an_outcome_for_a_refund_the_invoice_does_not_have_waits() -> None:
    inv, _ = _pending_refund()
    before = copy.deepcopy(inv)

    with pytest.raises(errors.RefundNotFound) as refused:
        settle(inv, "rf_unknown", RefundState.SUCCEEDED)

    assert (refused.value.code, refused.value.retryable) == ("refund_not_found", True)
    assert inv == before


def test_refund_status_of_a_credit_note_over_its_refunds() -> None:
    inv = _paid_by(("pay_1", 3_000), ("pay_2", 3_000), ("pay_3", 4_000))
    note = issue(inv, amount=10_000, settlement=Settlement.REFUND)
    first, second, third = (r.refund_id for r in note.refunds)
    statuses = []

    for refund_id, outcome in ((first, RefundState.SUCCEEDED), (second, RefundState.SUCCEEDED),
                               (third, RefundState.FAILED)):
        inv.pop_events()
        settle(inv, refund_id, outcome)
        (outcome_event,) = [event for event in inv.events if isinstance(
            event, CreditNoteRefundSucceeded | CreditNoteRefundFailed)]
        statuses.append(outcome_event.refund_status)

    assert statuses == [RefundStatus.PENDING, RefundStatus.PENDING, RefundStatus.PARTIALLY_FAILED]
    assert issue(paid_invoice(), amount=1, settlement=Settlement.OUT_OF_BAND
                 ).refund_status is RefundStatus.NONE


# --- customer balance --------------------------------------------------------------------------


def test_the_credit_amount_of_a_credit_note_is_published_once_to_the_customer_balance() -> None:
    inv = paid_invoice()

    note = issue(inv, amount=2_500, settlement=SettlementSplit(refund_amount=500, credit_amount=2_000))

    (credited,) = events_of(inv, CustomerBalanceCredited)
    assert (credited.amount, credited.reason, credited.credit_note_id, credited.customer_id) == (
        2_000, BalanceReason.CREDIT_NOTE, note.id, inv.customer_id)
    assert credited.effective_at == note.effective_at
    assert credited.trigger == note.trigger


def test_a_pre_payment_credit_sends_nothing_to_the_balance() -> None:
    inv = invoice()

    issue(inv, amount=2_000)

    assert events_of(inv, CustomerBalanceCredited) == []


# --- effective_at -----------------------------------------------------------------------------


def _dated(inv: Invoice, effective_at: datetime | None = None,
           event_time: datetime | None = None) -> CreditNote:
    request = replace(command(amount=1_000, effective_at=effective_at),
                      trigger=Trigger("tests", f"evt-{effective_at}-{event_time}",
                                      "credit_note.issue", time=event_time))
    return issue_credit_note(inv, request, now=NOW)


def test_effective_at_defaults_to_the_event_time_else_when_it_is_processed() -> None:
    event_time = NOW - timedelta(hours=3)

    assert _dated(invoice(), event_time=event_time).effective_at == event_time
    assert _dated(invoice()).effective_at == NOW
    explicit = datetime(2026, 1, 31, tzinfo=UTC)  # backdating is allowed
    assert _dated(invoice(), explicit, event_time).effective_at == explicit


def test_effective_at_more_than_5_minutes_ahead_is_rejected() -> None:
    inv = invoice()
    before = copy.deepcopy(inv)

    assert _dated(copy.deepcopy(inv), NOW + timedelta(minutes=5)).effective_at == NOW + timedelta(
        minutes=5)
    for ahead in (NOW + timedelta(minutes=5, seconds=1), None):
        with pytest.raises(errors.InvalidEffectiveAt) as refused:
            _dated(inv, ahead, event_time=NOW + timedelta(hours=1))
        assert refused.value.code == "invalid_effective_at"
    assert inv == before


def test_effective_at_is_on_the_issued_event_the_journal_date_and_the_void() -> None:
    inv = invoice()
    explicit = NOW - timedelta(days=2)
    note = _dated(inv, explicit)
    voided_at = NOW - timedelta(hours=1)

    inv.void_credit_note(note, Trigger("tests", "v", "credit_note.void", time=voided_at), now=NOW)

    (issued,) = events_of(inv, CreditNoteIssued)
    assert issued.credit_note.effective_at == explicit
    (voided,) = events_of(inv, CreditNoteVoided)
    assert voided.effective_at == voided_at


# --- credit_note.update -----------------------------------------------------------------------


def test_update_sets_the_memo_and_merges_metadata_a_null_removing_a_key() -> None:
    inv = invoice()
    note = issue_credit_note(inv, replace(command(amount=1_000), memo="old",
                                          metadata={"a": "1", "b": "2"}), now=NOW)
    inv.pop_events()

    updated = inv.update_credit_note(note, trigger("credit_note.update"), memo="new",
                                     memo_set=True, metadata_patch={"b": None, "c": "3"})

    assert (updated.memo, updated.metadata) == ("new", {"a": "1", "c": "3"})
    assert (updated.total, updated.number, updated.lines) == (note.total, note.number, note.lines)
    (event,) = inv.pop_events()
    assert isinstance(event, CreditNoteUpdated)
    assert event.credit_note == updated


def test_update_without_memo_keeps_it_and_a_null_memo_clears_it() -> None:
    inv = invoice()
    note = issue_credit_note(inv, replace(command(amount=1_000), memo="keep"), now=NOW)

    kept = inv.update_credit_note(note, trigger("credit_note.update"), metadata_patch={"k": "v"})
    cleared = inv.update_credit_note(kept, trigger("credit_note.update"), memo=None,
                                     memo_set=True)

    assert (kept.memo, cleared.memo, cleared.metadata) == ("keep", None, {"k": "v"})


def test_a_void_credit_note_can_be_updated() -> None:
    inv = invoice()
    note = void(inv, issue(inv, amount=1_000))

    updated = inv.update_credit_note(note, trigger("credit_note.update"), memo="why", memo_set=True)

    assert (updated.status, updated.memo) == (CreditNoteStatus.VOID, "why")


def test_an_update_whose_merged_metadata_breaks_the_limits_is_invalid() -> None:
    inv = invoice()
    note = issue_credit_note(inv, replace(command(amount=1_000),
                                          metadata={f"k{i}": "v" for i in range(50)}), now=NOW)
    inv.pop_events()

    for patch in ({"one_more": "v"}, {"k1": "x" * 501}, {"k" * 41: "v"}):
        with pytest.raises(errors.InvalidMessage):
            inv.update_credit_note(note, trigger("credit_note.update"), metadata_patch=patch)
    assert inv.events == []
    replaced = inv.update_credit_note(note, trigger("credit_note.update"),
                                      metadata_patch={"k0": None, "new": "v"})
    assert len(replaced.metadata) == 50
