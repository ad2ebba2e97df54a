"""Upstream triggers: translated (pure) into credit-note commands, applied by the same domain code."""

from __future__ import annotations

import contextlib
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors
from service.domain.commands import IssueCreditNote, ServicePeriod, Trigger
from service.domain.credit_note import CreditNote
from service.domain.events import RefundRequested
from service.domain.invoice import Invoice
from service.domain.issuing import issue_credit_note
from service.entrypoints import translators, wire
from service.settings import Settings

from .builders import amount_off, events_of, invoice, line, percent_off

OCTOBER = ServicePeriod(datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))


def translate(topic: str, type_: str, data: dict[str, Any], source: str = "/upstream",
              configured: Settings | None = None) -> IssueCreditNote:
    event = wire.CloudEvent.model_validate(
        {"specversion": "1.0", "id": f"ev-{type_}-{id(data)}", "source": source, "type": type_,
         "data": data})
    command = translators.translate(event, topic, translators.routes(configured or Settings()))
    assert isinstance(command, IssueCreditNote)
    return command


def returned(inv: Invoice, *lines: tuple[str, int], **extra: Any) -> CreditNote:
    return issue_credit_note(inv, translate("returns", "return.received", {
        "invoice_id": inv.id, "return_id": "ret-1",
        "lines": [{"invoice_line_id": line_id, "quantity": q} for line_id, q in lines], **extra}))


def test_example_6_returning_one_of_ten_lines_with_half_off_credits_5_00() -> None:
    inv = invoice(lines=[line(f"L{n}", unit_amount=1_000) for n in range(10)],
                  discounts=[percent_off(5_000)])
    note = returned(inv, ("L3", 1))
    assert note.total == 500
    assert note.reason == "order_change"
    assert note.metadata == {"return_id": "ret-1"}


def test_example_7_returning_one_of_ten_lines_with_10_00_off_credits_9_00() -> None:
    inv = invoice(lines=[line(f"L{n}", unit_amount=1_000) for n in range(10)],
                  discounts=[amount_off(1_000)])
    assert returned(inv, ("L0", 1)).total == 900


def test_a_return_on_a_paid_invoice_refunds_the_cash_by_default() -> None:
    inv = invoice(lines=[line("L1", quantity=4, unit_amount=2_500)], status="paid",
                  amount_paid=10_000)
    note = returned(inv, ("L1", 1))
    assert (note.total, note.refund_amount, note.credit_amount) == (2_500, 2_500, 0)
    [refund] = events_of(inv, RefundRequested)
    assert refund.amount == 2_500


def test_returning_more_than_is_left_is_capped_and_then_nothing_is_left() -> None:
    inv = invoice(lines=[line("L1", quantity=3, unit_amount=1_000)])
    assert returned(inv, ("L1", 2)).total == 2_000
    assert returned(inv, ("L1", 5)).total == 1_000
    before = copy.deepcopy(inv)
    with pytest.raises(errors.NothingLeftToCredit):
        returned(inv, ("L1", 1))
    assert inv == before


def test_the_same_line_named_twice_in_a_return_is_one_return_of_both() -> None:
    inv = invoice(lines=[line("L1", quantity=5, unit_amount=1_000)])
    note = returned(inv, ("L1", 1), ("L1", 2))
    assert (note.total, note.lines[0].quantity) == (3_000, 3)


def test_example_10_sla_breach_of_10_percent_on_a_paid_5000_invoice_credits_500_to_balance() -> None:
    inv = invoice(lines=[line("L1", unit_amount=500_000)], status="paid", amount_paid=500_000)
    note = issue_credit_note(inv, translate("sla-breaches", "sla.breached", {
        "invoice_id": inv.id, "sla_id": "sla-9", "credit_bps": 1_000}))
    assert (note.total, note.credit_amount, note.refund_amount) == (50_000, 50_000, 0)
    assert note.reason == "service_credit"
    assert note.policy == "sla.breached:max_credit_bps=5000"


def test_example_5_credit_with_refund_settlement_refunds_cash_only_and_balances_the_rest() -> None:
    inv = invoice(lines=[line("L1", unit_amount=20_000)], customer_balance_applied=15_000,
                  amount_paid=5_000, status="paid")
    note = issue_credit_note(inv, translate("sla-breaches", "sla.breached", {
        "invoice_id": inv.id, "sla_id": "sla-1", "credit_amount": 8_000, "settlement": "refund"}))
    assert (note.refund_amount, note.credit_amount) == (5_000, 3_000)


def test_sla_credit_above_the_policy_cap_is_capped_at_the_policy() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    strict = Settings(policy_sla_max_credit_bps=2_000)
    note = issue_credit_note(inv, translate("sla-breaches", "sla.breached", {
        "invoice_id": inv.id, "sla_id": "sla-1", "credit_bps": 9_000}, configured=strict))
    assert note.total == 2_000
    assert note.policy == "sla.breached:max_credit_bps=2000"


def test_sla_credit_in_another_currency_is_rejected() -> None:
    inv = invoice()
    with pytest.raises(errors.CurrencyMismatch):
        issue_credit_note(inv, translate("sla-breaches", "sla.breached", {
            "invoice_id": inv.id, "sla_id": "s", "credit_amount": 100, "currency": "eur"}))


def test_example_11_cancellation_on_16_october_credits_16_of_31_days_19_20() -> None:
    inv = invoice(lines=[line("L1", unit_amount=3_100, tax_rate_bps=2_000, period=OCTOBER)],
                  status="paid", amount_paid=3_720)
    note = issue_credit_note(inv, translate("cancellations", "subscription.canceled", {
        "invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": "2026-10-16T00:00:00Z"}))
    assert (note.subtotal, note.tax, note.total) == (1_600, 320, 1_920)
    assert note.refund_amount == 1_920
    assert note.reason == "subscription_cancellation"


def test_a_downgrade_credits_unused_time_to_the_customer_balance_by_default() -> None:
    inv = invoice(lines=[line("L1", unit_amount=3_100, period=OCTOBER)], status="paid",
                  amount_paid=3_100)
    note = issue_credit_note(inv, translate("downgrades", "subscription.downgraded", {
        "invoice_id": inv.id, "invoice_line_id": "L1", "effective_at": "2026-10-21T12:00:00Z"}))
    assert note.total == 1_050  # 10.5 of 31 days
    assert (note.credit_amount, note.refund_amount) == (1_050, 0)
    assert note.reason == "subscription_change"


@pytest.mark.parametrize(("at", "error"), [
    ("2026-09-30T23:59:59Z", errors.OutsideServicePeriod),
    ("2026-11-01T00:00:01Z", errors.OutsideServicePeriod),
])
def test_a_time_outside_the_service_period_is_rejected(at: str, error: type[Exception]) -> None:
    inv = invoice(lines=[line("L1", unit_amount=3_100, period=OCTOBER)])
    with pytest.raises(error):
        issue_credit_note(inv, translate("downgrades", "subscription.downgraded", {
            "invoice_id": inv.id, "invoice_line_id": "L1", "effective_at": at}))


def test_a_line_without_a_service_period_cannot_be_prorated() -> None:
    inv = invoice()
    with pytest.raises(errors.NoServicePeriod):
        issue_credit_note(inv, translate("cancellations", "subscription.canceled", {
            "invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": "2026-10-16T00:00:00Z"}))


def test_cancelling_at_the_period_start_credits_the_whole_line_and_at_its_end_nothing() -> None:
    inv = invoice(lines=[line("L1", unit_amount=3_100, tax_rate_bps=2_000, period=OCTOBER)])
    before = copy.deepcopy(inv)
    with pytest.raises(errors.NothingLeftToCredit):
        issue_credit_note(inv, translate("cancellations", "subscription.canceled", {
            "invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": "2026-11-01T00:00:00Z"}))
    assert inv == before
    note = issue_credit_note(inv, translate("cancellations", "subscription.canceled", {
        "invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": "2026-10-01T00:00:00Z"}))
    assert note.total == inv.total == 3_720


def test_an_event_from_a_source_not_on_the_allow_list_is_unauthorized() -> None:
    configured = Settings(allowed_sources_returns=["/warehouse/returns"])
    with pytest.raises(errors.UnauthorizedSource):
        translate("returns", "return.received", {
            "invoice_id": "in_1", "return_id": "r",
            "lines": [{"invoice_line_id": "L1", "quantity": 1}]},
            source="/somewhere/else", configured=configured)
    assert translate("returns", "return.received", {
        "invoice_id": "in_1", "return_id": "r", "lines": [{"invoice_line_id": "L1", "quantity": 1}]},
        source="/warehouse/returns", configured=configured).invoice_id == "in_1"


def test_a_trigger_type_on_the_wrong_topic_is_unsupported() -> None:
    with pytest.raises(errors.UnsupportedType):
        translate("returns", "sla.breached", {"invoice_id": "in_1", "sla_id": "s",
                                              "credit_bps": 100})


@settings(max_examples=300, deadline=None)
@given(net=st.integers(1, 10**9), rate=st.integers(0, 3_000),
       length_s=st.integers(1, 400 * 86_400), data=st.data())
def test_proration_is_never_negative_never_more_than_left_and_exact_at_the_edges(
        net: int, rate: int, length_s: int, data: st.DataObject) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    period = ServicePeriod(start, start + timedelta(seconds=length_s))
    inv = invoice(lines=[line("L1", unit_amount=net, tax_rate_bps=rate, period=period)])
    at = start + timedelta(seconds=data.draw(st.integers(0, length_s)))
    left = inv.lines[0].remaining_gross
    command = translate("cancellations", "subscription.canceled", {
        "invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": at.isoformat()})
    try:
        note = issue_credit_note(inv, command)
    except errors.NothingLeftToCredit:
        assert net * (period.end - at).total_seconds() / length_s < 0.5 or at == period.end
        return
    assert 0 < note.total <= left
    assert inv.lines[0].remaining_net >= 0
    assert inv.lines[0].remaining_tax >= 0
    if at == start:
        assert note.total == left
    # and a second cancellation can never credit more than is left
    again = Trigger("/upstream", "again", "subscription.canceled")
    with contextlib.suppress(errors.NothingLeftToCredit):
        issue_credit_note(inv, IssueCreditNote(**{**command.__dict__, "trigger": again}))
    assert inv.credited_total <= inv.total
    assert inv.lines[0].remaining_net >= 0
    assert inv.lines[0].remaining_tax >= 0
