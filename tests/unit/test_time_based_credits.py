"""Time-based credits, cumulative policy caps and the settlements a trigger may ask for.

Time-based credits (downgrades, cancellations) credit what is left of a line
for time not credited before (docs/rules.md, examples 13 and 14 are in
test_worked_examples.py). A trigger policy's cap is on all its credit notes on
an invoice together (issue 15 finding 4). Each trigger topic may be limited
to some settlements.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain import errors
from service.domain.commands import (
    IssueCreditNote,
    OnExcess,
    ServicePeriod,
    Settlement,
    Trigger,
)
from service.domain.credit_note import CreditNote, CreditNoteStatus
from service.domain.invoice import Invoice
from service.domain.issuing import issue_credit_note
from service.entrypoints import translators, wire
from service.settings import Settings

from .builders import by_quantity, invoice, issue, line, paid_invoice, void

OCTOBER = ServicePeriod(datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
TOPIC = {"subscription.downgraded": "downgrades", "subscription.canceled": "cancellations",
         "sla.breached": "sla-breaches", "return.received": "returns"}
_ids = iter(range(1, 10**9))


def trigger_command(type_: str, data: dict[str, Any], configured: Settings | None = None,
                    ) -> IssueCreditNote:
    """The command the service builds from this upstream event (real translators, settings)."""
    event = wire.CloudEvent.model_validate({
        "specversion": "1.0", "id": f"ev-{next(_ids)}", "source": "/upstream", "type": type_,
        "data": data})
    table = translators.routes(configured) if configured else default_routes()
    command = translators.translate(event, TOPIC[type_], table)
    assert isinstance(command, IssueCreditNote)
    return command


@functools.cache
def default_routes() -> dict[str, translators.Route]:
    return translators.routes(Settings(_env_file=None))  # type: ignore[call-arg]


def at(day: int, hour: int = 0) -> str:
    return datetime(2026, 10, day, hour, tzinfo=UTC).isoformat()


def downgrade(inv: Invoice, when: str, line_id: str = "L1") -> CreditNote:
    return issue_credit_note(inv, trigger_command("subscription.downgraded", {
        "invoice_id": inv.id, "invoice_line_id": line_id, "effective_at": when}))


def cancel(inv: Invoice, when: str, line_id: str = "L1") -> CreditNote:
    return issue_credit_note(inv, trigger_command("subscription.canceled", {
        "invoice_id": inv.id, "invoice_line_id": line_id, "canceled_at": when}))


def plan(unit_amount: int = 1_000, quantity: int = 10, tax_rate_bps: int = 0,
         **kwargs: Any) -> Invoice:
    return invoice(lines=[line("L1", quantity=quantity, unit_amount=unit_amount,
                               tax_rate_bps=tax_rate_bps, period=OCTOBER)], **kwargs)


# --- time-based credits ----------------------------------------------------------------------


def test_a_cancellation_before_an_earlier_downgrade_credits_only_the_time_between() -> None:
    inv = plan()
    cancelled = cancel(inv, at(21))  # 11 of 31 days: 3548.4 -> 3548
    assert cancelled.total == 3_548
    downgraded = downgrade(inv, at(11))  # [11, 21) of the 20 uncovered days, on 6452 left
    assert downgraded.total == 3_226
    assert inv.line("L1").covered_from == datetime(2026, 10, 11, tzinfo=UTC)
    # [11, end) is covered; [1, 11) is 10 of the 10 uncovered days: all that is left
    rest = cancel(inv, at(1))
    assert rest.total == inv.line("L1").net - 3_548 - 3_226
    assert inv.line("L1").remaining_gross == 0


def test_a_second_cancellation_at_the_same_time_has_nothing_left() -> None:
    inv = plan()
    cancel(inv, at(16))
    before = copy.deepcopy(inv)
    with pytest.raises(errors.NothingLeftToCredit):
        cancel(inv, at(16))
    with pytest.raises(errors.NothingLeftToCredit):
        downgrade(inv, at(20))
    assert inv == before


def test_tax_is_credited_in_proportion_and_exhausting_the_line_takes_all_tax_left() -> None:
    inv = plan(unit_amount=310, tax_rate_bps=2_000)  # 3100 net, 620 tax
    first = downgrade(inv, at(16))
    assert (first.subtotal, first.tax) == (1_600, 320)
    second = cancel(inv, at(1))
    assert (second.subtotal, second.tax) == (1_500, 300)
    assert inv.line("L1").remaining_gross == 0


def test_a_return_after_a_cancellation_credits_its_units_share_of_what_is_left() -> None:
    # the cancellation credited [16 Oct, end) of every unit: the returned units' share of
    # what is left is their [1 Oct, 16 Oct), not their whole month a second time
    inv = plan()
    cancel(inv, at(16))  # 5161, 4839 left on 10 units
    note = issue(inv, lines=[by_quantity("L1", 6)], on_excess=OnExcess.CAP)
    assert note.total == 2_903  # 4839 * 6 / 10 = 2903.4
    rest = issue(inv, lines=[by_quantity("L1", 4)], on_excess=OnExcess.CAP)
    assert rest.total == 4_839 - 2_903  # the last units sweep exactly what is left
    assert inv.line("L1").remaining_gross == 0


def returned(inv: Invoice, quantity: int) -> CreditNote:
    return issue_credit_note(inv, trigger_command("return.received", {
        "invoice_id": inv.id, "return_id": f"ret-{next(_ids)}",
        "lines": [{"invoice_line_id": "L1", "quantity": quantity}]}))


def credited(step: tuple[str, int], inv: Invoice) -> int:
    """Apply a return (units) or a cancellation (second of the period); what it credited."""
    kind, value = step
    try:
        if kind == "return":
            return returned(inv, value).total
        return cancel(inv, (START + timedelta(seconds=value)).isoformat()).total
    except errors.NothingLeftToCredit:
        return 0


def test_example_13_in_the_other_order_credits_the_same() -> None:
    # docs/rules.md example 13: return 5 units, then cancel at 16 Oct: 50.00 + 25.81
    inv = plan()
    assert returned(inv, 5).total + cancel(inv, at(16)).total == 7_581
    inv = plan()  # the two topics are not ordered: cancellation first, 51.61 + 24.20
    assert cancel(inv, at(16)).total == 5_161
    assert returned(inv, 5).total == 2_420  # 4839 * 5 / 10 = 2419.5
    assert inv.line("L1").credited_net == 7_581


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data(), quantity=st.integers(1, 30), unit=st.integers(1, 10**6),
       rate=st.integers(0, 3_000), length_s=st.integers(1, 62 * 86_400))
def test_returns_and_time_credits_on_a_line_credit_the_same_in_any_order(
        data: st.DataObject, quantity: int, unit: int, rate: int, length_s: int) -> None:
    """Returns and cancellations arrive on unordered topics: the order must not matter."""
    units = data.draw(st.lists(st.integers(1, quantity), max_size=4).filter(
        lambda qs: sum(qs) <= quantity), label="returns")
    times = data.draw(st.lists(st.integers(0, length_s), max_size=3), label="cancellations")
    steps = [("return", q) for q in units] + [("cancel", t) for t in times]
    other = data.draw(st.permutations(steps), label="other order")
    period = ServicePeriod(START, START + timedelta(seconds=length_s))
    totals = []
    for order in (steps, other):
        inv = invoice(lines=[line("L1", quantity=quantity, unit_amount=unit, tax_rate_bps=rate,
                                  period=period)])
        totals.append(sum(credited(step, inv) for step in order))
        assert inv.line("L1").remaining_net >= 0 and inv.line("L1").remaining_tax >= 0
    assert abs(totals[0] - totals[1]) <= len(steps)  # one minor unit of rounding per credit


def test_voiding_the_only_time_based_credit_uncovers_its_time() -> None:
    inv = plan()
    note = downgrade(inv, at(16))
    void(inv, note)
    assert inv.line("L1").covered_from is None
    assert inv.line("L1").time_credits == ()
    again = cancel(inv, at(16))
    assert again.total == note.total == 5_161


def test_voiding_the_earliest_time_credit_restores_the_coverage_of_the_ones_left() -> None:
    inv = plan()
    downgraded = downgrade(inv, at(16))  # 5161, covers [16, end)
    cancelled = cancel(inv, at(11))  # 1613, covers [11, end)
    void(inv, cancelled)
    assert inv.line("L1").covered_from == datetime(2026, 10, 16, tzinfo=UTC)
    with pytest.raises(errors.NothingLeftToCredit):
        cancel(inv, at(21))
    assert cancel(inv, at(11)).total == 1_613
    assert downgraded.status is CreditNoteStatus.ISSUED


def test_voiding_a_later_time_credit_keeps_the_earlier_coverage() -> None:
    # Decision (docs): coverage is [earliest non-void time credit, end); voiding the
    # downgrade gives its money back to the invoice, but [11, end) stays covered.
    inv = plan()
    downgraded = downgrade(inv, at(16))
    cancel(inv, at(11))
    void(inv, downgraded)
    assert inv.line("L1").covered_from == datetime(2026, 10, 11, tzinfo=UTC)
    with pytest.raises(errors.NothingLeftToCredit):
        cancel(inv, at(20))


def test_two_time_credits_at_the_same_instant_void_one_occurrence_each() -> None:
    inv = plan(quantity=1, unit_amount=3_100)
    first = downgrade(inv, at(16))  # covers [16, end)
    # a capped second credit at the same instant has nothing uncovered: refused
    with pytest.raises(errors.NothingLeftToCredit):
        cancel(inv, at(16))
    void(inv, first)
    second = cancel(inv, at(16))
    assert second.total == first.total == 1_600
    assert inv.line("L1").time_credits == (datetime(2026, 10, 16, tzinfo=UTC),)


def test_a_time_credit_scaled_down_by_its_policy_still_covers_its_time() -> None:
    inv = plan()
    capped = issue_credit_note(inv, trigger_command(
        "subscription.canceled",
        {"invoice_id": inv.id, "invoice_line_id": "L1", "canceled_at": at(1)},
        Settings(policy_cancellation_max_credit_bps=1_000)))
    assert capped.total == 1_000
    assert inv.line("L1").covered_from == datetime(2026, 10, 1, tzinfo=UTC)
    with pytest.raises(errors.NothingLeftToCredit):
        downgrade(inv, at(2))


# --- policy caps are cumulative per invoice and trigger type ------------------------------


def sla(inv: Invoice, configured: Settings | None = None, **data: Any) -> CreditNote:
    return issue_credit_note(inv, trigger_command("sla.breached", {
        "invoice_id": inv.id, "sla_id": "sla-1", **data}, configured))


@pytest.mark.parametrize("total", [Decimal(5_000), 5_000.0, "5000", True])
def test_a_credited_figure_that_is_not_an_int_of_minor_units_is_refused_where_it_is_loaded(
        total: object) -> None:
    # PostgreSQL's sum(bigint) is numeric: a Decimal must never reach the caps' arithmetic
    inv = plan()
    with pytest.raises(TypeError, match="not an int"):
        inv.load_credited_by_trigger("sla.breached", total)
    assert inv.credited_by_trigger == {}
    inv.load_credited_by_trigger("sla.breached", 5_000)
    assert inv.credited_by_trigger == {"sla.breached": 5_000}


def test_two_sla_breaches_of_100_percent_credit_50_percent_in_total_under_a_50_percent_cap() -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
    configured = Settings(policy_sla_max_credit_bps=5_000)

    first = sla(inv, configured, credit_bps=10_000, settlement="refund")
    assert first.total == 5_000
    before = copy.deepcopy(inv)
    with pytest.raises(errors.NothingLeftToCredit) as refused:
        sla(inv, configured, credit_bps=10_000, settlement="refund")
    assert "policy" in refused.value.message
    assert inv == before
    assert inv.refunded == 5_000  # not 100% of the cash


def test_the_policy_cap_takes_what_earlier_credits_of_the_same_type_left() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    configured = Settings(policy_sla_max_credit_bps=5_000)
    assert sla(inv, configured, credit_amount=3_000).total == 3_000
    assert sla(inv, configured, credit_amount=3_000).total == 2_000
    # another trigger type has its own cap
    returned = issue_credit_note(inv, trigger_command("return.received", {
        "invoice_id": inv.id, "return_id": "r-1",
        "lines": [{"invoice_line_id": "L1", "quantity": 1}]}))
    assert returned.total == 5_000
    assert inv.credited_by_trigger == {"sla.breached": 5_000, "return.received": 5_000}


def test_a_voided_credit_gives_its_share_of_the_policy_back() -> None:
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    configured = Settings(policy_sla_max_credit_bps=5_000)
    first = sla(inv, configured, credit_amount=5_000)
    void(inv, first)
    assert inv.credited_by_trigger == {}
    assert sla(inv, configured, credit_amount=5_000).total == 5_000


@settings(max_examples=60, deadline=None, database=None)
@given(cap=st.integers(0, 10_000), total=st.integers(1, 10**7),
       asks=st.lists(st.integers(1, 10_000), min_size=1, max_size=6))
def test_sla_credits_never_add_up_to_more_than_the_policy_allows(
        cap: int, total: int, asks: list[int]) -> None:
    inv = invoice(lines=[line("L1", unit_amount=total)])
    configured = Settings(policy_sla_max_credit_bps=cap)
    for bps in asks:
        with contextlib.suppress(errors.NothingLeftToCredit):
            sla(inv, configured, credit_bps=bps)
    allowed = (total * cap * 2 + 10_000) // 20_000  # half away from zero, exactly
    assert inv.credited_by_trigger.get("sla.breached", 0) <= allowed
    assert inv.credited_total == inv.credited_by_trigger.get("sla.breached", 0)


# --- which settlements a trigger topic may ask for ------------------------------------------


def test_a_settlement_the_topic_does_not_allow_is_rejected_and_changes_nothing() -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
    configured = Settings(allowed_settlements_sla_breaches=["customer_balance"])
    before = copy.deepcopy(inv)

    with pytest.raises(errors.SettlementNotAllowed) as refused:
        sla(inv, configured, credit_bps=1_000, settlement="refund")

    assert refused.value.code == "settlement_not_allowed"
    assert inv == before
    assert sla(inv, configured, credit_bps=1_000, settlement="customer_balance").credit_amount == 1_000
    assert sla(inv, configured, credit_bps=1_000).credit_amount == 1_000


def test_a_trigger_asking_no_settlement_gets_the_default_or_else_the_first_allowed() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=4, unit_amount=2_500)])
    configured = Settings(allowed_settlements_returns=["out_of_band", "customer_balance"])
    note = issue_credit_note(inv, trigger_command("return.received", {
        "invoice_id": inv.id, "return_id": "r-1",
        "lines": [{"invoice_line_id": "L1", "quantity": 1}]}, configured))
    assert (note.refund_amount, note.out_of_band_amount) == (0, 2_500)


def test_by_default_every_topic_allows_all_three_settlements() -> None:
    for settlement in ("refund", "customer_balance", "out_of_band"):
        inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
        assert sla(inv, credit_bps=1_000, settlement=settlement).total == 1_000


def test_an_empty_or_unknown_settlement_list_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="allowed_settlements_returns"):
        Settings(allowed_settlements_returns=[])
    with pytest.raises(ValueError, match="allowed_settlements_returns"):
        Settings(allowed_settlements_returns=["cash"])  # type: ignore[list-item]


def test_explicit_commands_are_not_limited_by_trigger_settings() -> None:
    inv = paid_invoice(lines=[line("L1", unit_amount=10_000)])
    note = issue(inv, amount=1_000, settlement=Settlement.REFUND)
    assert note.refund_amount == 1_000


# --- properties -------------------------------------------------------------------------------

START = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def time_steps(draw: st.DrawFn, length_s: int, quantity: int) -> list[tuple[str, int]]:
    """Returns (units), downgrades and cancellations (second of the period), and voids."""
    step = st.one_of(
        st.tuples(st.just("return"), st.integers(1, quantity)),
        st.tuples(st.sampled_from(["downgrade", "cancel"]), st.integers(0, length_s)),
        st.tuples(st.just("void"), st.integers(0, 20)),
    )
    return draw(st.lists(step, max_size=8))


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data(), quantity=st.integers(1, 20), unit=st.integers(1, 10**6),
       rate=st.integers(0, 3_000), length_s=st.integers(1, 62 * 86_400))
def test_time_based_credits_never_exceed_what_is_left_nor_cover_covered_time(
        data: st.DataObject, quantity: int, unit: int, rate: int, length_s: int) -> None:
    period = ServicePeriod(START, START + timedelta(seconds=length_s))
    inv = invoice(lines=[line("L1", quantity=quantity, unit_amount=unit, tax_rate_bps=rate,
                              period=period)])
    inv_line = inv.line("L1")
    notes: list[CreditNote] = []
    for kind, value in data.draw(time_steps(length_s, quantity), label="steps"):
        left_net, left_tax = inv_line.remaining_net, inv_line.remaining_tax
        covered_from = inv_line.covered_from or period.end
        before = copy.deepcopy(inv)
        refusal: type[Exception] | None = None
        try:
            if kind == "return":
                notes.append(issue(inv, lines=[by_quantity("L1", value)], on_excess=OnExcess.CAP))
            elif kind == "void":
                live = [n for n in notes if n.status is CreditNoteStatus.ISSUED]
                if not live:
                    continue
                target = live[value % len(live)]
                notes[notes.index(target)] = void(inv, target)
            else:
                when = (START + timedelta(seconds=value)).isoformat()
                note = (downgrade if kind == "downgrade" else cancel)(inv, when)
                notes.append(note)
                (credited,) = note.lines
                # never more than what is left of the line, net and tax
                assert 0 < credited.net <= left_net and credited.tax <= left_tax
                # a later credit never covers covered time: it starts before the coverage
                assert credited.covers_from is not None
                assert credited.covers_from < covered_from
                assert inv_line.covered_from == credited.covers_from
        except (errors.Rejection, errors.InvalidMessage) as refused:
            refusal = type(refused)
            assert inv == before
        if kind in ("downgrade", "cancel") and START + timedelta(seconds=value) >= covered_from:
            assert refusal is errors.NothingLeftToCredit  # covered time is never credited again
        live = [n for n in notes if n.status is CreditNoteStatus.ISSUED]
        assert 0 <= inv_line.credited_net <= inv_line.net
        assert 0 <= inv_line.credited_tax <= inv_line.tax
        assert inv_line.credited_net == sum(line.net for n in live for line in n.lines)
        assert sorted(inv_line.time_credits) == sorted(
            line.covers_from for n in live for line in n.lines if line.covers_from is not None)
        assert inv.credited_total <= inv.total


def test_the_same_trigger_type_name_is_what_a_policy_counts() -> None:
    # a trigger's type is its CloudEvent type: what the policy string and the sums key on
    inv = invoice(lines=[line("L1", unit_amount=10_000)])
    note = sla(inv, credit_amount=100)
    assert note.trigger == Trigger("/upstream", note.trigger.id, "sla.breached")
    assert note.policy == "sla.breached:max_credit_bps=5000"


# --- times on input: RFC 3339 strings with their offset, nothing guessed ------------------


@settings(max_examples=60, deadline=None, database=None)
@given(value=st.one_of(
    st.integers(-10**13, 10**13), st.floats(allow_nan=False, allow_infinity=False),
    st.integers(0, 10**13).map(str), st.booleans(), st.none(),
    st.sampled_from(["2026-10-16", "2026-10-16T00:00:00", "2026-10-16T00:00Z",
                     "16 Oct 2026 00:00:00 +0000", "2026-10-16T00:00:00+0000", "now", ""])))
def test_a_time_that_is_not_an_rfc_3339_string_with_its_offset_is_an_invalid_message(
        value: object) -> None:
    # a number was read as epoch seconds, or milliseconds when large, with UTC assumed
    with pytest.raises(errors.InvalidMessage, match="canceled_at"):
        cancel(plan(), value)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, database=None)
@given(minutes=st.integers(-(23 * 60 + 59), 23 * 60 + 59))
def test_any_rfc_3339_offset_is_read_as_its_instant(minutes: int) -> None:
    offset = timedelta(minutes=minutes)
    instant = datetime(2026, 10, 16, tzinfo=UTC)
    sign, size = ("+" if minutes >= 0 else "-"), abs(minutes)
    text = (instant + offset).replace(tzinfo=None).isoformat() + f"{sign}{size // 60:02d}:{size % 60:02d}"
    inv = plan()
    note = cancel(inv, text)
    assert note.total == 5_161
    assert inv.line("L1").covered_from == instant
