"""Properties: spreads add up, and no sequence of credits, payments, refund outcomes and
voids breaks a cap or an invariant of the money loop.

Random invoices (1-5 lines, any quantities, prices, tax rates and discounts, partly or
wholly paid) meet random sequences of credit requests (line-less gross amounts, quantity
and amount credits, custom lines, REJECT or CAP, every kind of settlement, linked
refunds), payments (with or without an id, repeated, above what is owed), refund outcomes
(either, repeated or opposite, settled to the balance or not) and voids. A request may be
refused, but a refused request changes nothing, and after every step each cap of
docs/rules.md and each invariant of the money loop still holds: per payment, pending and
succeeded refunds within its applied cash; a refund id once; per credit note, its refunds
add up to its refund amount; the open refunds_payable balance equals the pending refunds
plus the failed ones settled as none; every journal balances; every customer-balance event
matches an amount sent to the balance, once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from service.domain import errors, money
from service.domain.commands import (
    LineRequest,
    OnExcess,
    Settlement,
    SettlementSplit,
)
from service.domain.credit_note import (
    Account,
    CreditNote,
    CreditNoteStatus,
    JournalLine,
    refund_journal,
)
from service.domain.events import (
    BalanceReason,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CustomerBalanceCredited,
    RefundRequested,
)
from service.domain.invoice import Invoice
from service.domain.issuing import issue_credit_note
from service.domain.refunds import FailureSettlement, RefundState, cash_of

from .builders import (
    NOW,
    amount_off,
    by_amount,
    by_quantity,
    command,
    custom,
    events_of,
    invoice,
    line,
    pay,
    percent_off,
    settle,
    void,
)

SETTINGS = settings(max_examples=200, deadline=None, database=None)

# --- money --------------------------------------------------------------------------------


@SETTINGS
@given(
    numerator=st.integers(-(10**12), 10**12),
    denominator=st.integers(1, 10**6),
)
def test_round_half_away_matches_exact_arithmetic(numerator: int, denominator: int) -> None:
    exact = Fraction(numerator, denominator)
    expected = math.floor(abs(exact) + Fraction(1, 2)) * (1 if exact >= 0 else -1)

    assert money.round_half_away(numerator, denominator) == expected


@st.composite
def totals_and_weights(draw: st.DrawFn) -> tuple[int, list[int]]:
    weights = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=12))
    total = draw(st.integers(0, 10**9)) if sum(weights) else 0
    return total, weights


@SETTINGS
@given(totals_and_weights())
def test_allocate_sums_exactly_and_each_part_is_its_share_rounded_down_or_up(
    case: tuple[int, list[int]],
) -> None:
    total, weights = case
    whole = sum(weights)

    parts = money.allocate(total, weights)

    assert sum(parts) == total
    assert len(parts) == len(weights)
    if whole == 0:
        assert parts == [0] * len(weights)
        return
    for part, weight in zip(parts, weights, strict=True):
        floor = total * weight // whole
        ceiling = -(-total * weight // whole)
        assert floor <= part <= ceiling
        assert abs(part * whole - total * weight) < whole  # within one unit of the exact share


@SETTINGS
@given(totals_and_weights())
def test_allocate_gives_leftover_units_to_the_largest_remainders_first(
    case: tuple[int, list[int]],
) -> None:
    total, weights = case
    whole = sum(weights)
    parts = money.allocate(total, weights)
    if whole == 0:
        return
    remainders = [total * weight % whole for weight in weights]
    rounded_up = [index for index, weight in enumerate(weights) if parts[index] > total * weight // whole]
    rounded_down = [index for index in range(len(weights)) if index not in rounded_up]
    for up in rounded_up:
        for down in rounded_down:
            assert (remainders[up], -up) > (remainders[down], -down)


# --- invoices and credit sequences --------------------------------------------------------

TAX_RATES = st.one_of(st.sampled_from([0, 500, 825, 1_000, 2_000, 2_500]), st.integers(0, 3_000))


@st.composite
def invoices(draw: st.DrawFn) -> Invoice:
    specs = draw(
        st.lists(
            st.tuples(st.integers(1, 10), st.integers(0, 50_000), TAX_RATES),
            min_size=1,
            max_size=5,
        )
    )
    drafts = [
        line(f"L{index}", quantity=quantity, unit_amount=unit_amount, tax_rate_bps=rate)
        for index, (quantity, unit_amount, rate) in enumerate(specs, start=1)
    ]
    discounts = draw(
        st.one_of(
            st.just(()),
            st.integers(0, 10_000).map(lambda bps: (percent_off(bps),)),
            st.integers(0, 300_000).map(lambda amount: (amount_off(amount),)),
            st.tuples(st.integers(0, 5_000).map(percent_off), st.integers(0, 50_000).map(amount_off)),
        )
    )
    unpaid = invoice(lines=drafts, discounts=discounts)
    balance = draw(st.integers(0, unpaid.total))
    due = unpaid.total - balance
    paid = draw(st.one_of(st.just(due), st.just(0), st.integers(0, due), st.integers(0, due)))
    if paid + balance == unpaid.total:
        status = draw(st.sampled_from(["paid", "paid", "open"]))
    else:
        status = draw(st.sampled_from(["open", "open", "uncollectible"]))
    return invoice(
        lines=drafts,
        discounts=discounts,
        status=status,
        amount_paid=paid,
        customer_balance_applied=balance,
    )


@dataclass(frozen=True)
class Split:
    """An explicit split, drawn as percentages of the post-payment part (and a skew)."""

    refund_pct: int
    credit_pct: int
    skew: int  # 0: adds up; otherwise off by this much (a mismatched split)


@dataclass(frozen=True)
class Credit:
    amount: int | None
    lines: tuple[tuple[int, str, int], ...]  # (line index, "quantity" | "amount" | "custom", n)
    on_excess: OnExcess
    settlement: Settlement | Split
    #: (refund id from a small pool, so some are taken already; amount)
    linked: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Pay:
    pct: int  # of the amount remaining; above 100: an overpayment
    payment_id: str | None = None  # from a small pool: the same id again is a duplicate or conflict
    extra: int = 0  # added to the amount (0 on a paid invoice still pays: all overpayment)


@dataclass(frozen=True)
class Outcome:
    which: int  # of the invoice's refunds (linked ones too)
    outcome: RefundState
    settlement: FailureSettlement


@dataclass(frozen=True)
class Void:
    which: int


SETTLEMENTS = st.one_of(
    st.sampled_from(list(Settlement)),
    st.builds(
        Split,
        refund_pct=st.integers(0, 100),
        credit_pct=st.integers(0, 100),
        skew=st.sampled_from([0, 0, 0, 0, 0, 1, -1]),
    ),
)


Operation = Credit | Pay | Outcome | Void


def operations(inv: Invoice) -> st.SearchStrategy[Operation]:
    line_count = len(inv.lines)
    ceiling = max(inv.total, 1) * 3 // 2
    line_request = st.tuples(
        st.integers(0, line_count - 1),
        st.sampled_from(["quantity", "quantity", "amount", "amount", "custom"]),
        st.integers(0, max(ceiling, 12)),
    )
    credit = st.builds(
        Credit,
        amount=st.one_of(st.none(), st.integers(1, ceiling)),
        lines=st.lists(line_request, min_size=1, max_size=line_count, unique_by=lambda r: r[0]).map(tuple),
        on_excess=st.sampled_from(list(OnExcess)),
        settlement=SETTLEMENTS,
        linked=st.one_of(st.just(()), st.just(()), st.lists(
            st.tuples(st.sampled_from(["re_1", "re_2", "re_3"]), st.integers(1, ceiling)),
            max_size=2).map(tuple)),
    )
    return st.one_of(
        credit,
        credit,
        credit,
        st.builds(Pay, pct=st.integers(0, 150),
                  payment_id=st.one_of(st.none(), st.sampled_from(["pay_1", "pay_2", "pay_3"])),
                  extra=st.sampled_from([0, 0, 0, 1, 500])),
        st.builds(Outcome, which=st.integers(0, 7), outcome=st.sampled_from(
            [RefundState.SUCCEEDED, RefundState.FAILED]),
            settlement=st.sampled_from(list(FailureSettlement))),
        st.builds(Outcome, which=st.integers(0, 7), outcome=st.sampled_from(
            [RefundState.SUCCEEDED, RefundState.FAILED]),
            settlement=st.sampled_from(list(FailureSettlement))),
        st.builds(Void, which=st.integers(0, 7)),
    )


def _requests(inv: Invoice, credit: Credit) -> list[LineRequest]:
    requests: list[LineRequest] = []
    for index, kind, n in credit.lines:
        invoice_line = inv.lines[index]
        if kind == "quantity":
            requests.append(by_quantity(invoice_line.id, n % (invoice_line.quantity + 2)))
        elif kind == "amount":
            requests.append(by_amount(invoice_line.id, n))
        else:
            requests.append(custom("Goodwill", 1, n % 5_000, invoice_line.tax_rate_bps))
    return requests


def _settlement(inv: Invoice, credit: Credit, requests: list[LineRequest]) -> Settlement | SettlementSplit:
    if isinstance(credit.settlement, Settlement):
        return credit.settlement
    # Learn the post-payment part from a dry run, then split it as drawn.
    trial = copy.deepcopy(inv)
    try:
        note = issue_credit_note(
            trial, command(amount=credit.amount, lines=requests, on_excess=credit.on_excess),
            now=NOW)
    except (errors.Rejection, errors.InvalidMessage):
        return SettlementSplit()
    post = note.post_payment_amount
    refund = post * credit.settlement.refund_pct // 100
    balance = (post - refund) * credit.settlement.credit_pct // 100
    out_of_band = post - refund - balance + credit.settlement.skew
    return SettlementSplit(refund, balance, max(out_of_band, 0))


def _apply(inv: Invoice, notes: list[CreditNote], operation: Operation) -> None:
    if isinstance(operation, Pay):
        amount = inv.amount_remaining * operation.pct // 100 + operation.extra
        if amount <= 0:
            return
        with contextlib.suppress(errors.PaymentConflict):  # same id, another amount: no change
            pay(inv, amount, operation.payment_id)
        return
    if isinstance(operation, Outcome):
        if inv.refunds:
            refund = inv.refunds[operation.which % len(inv.refunds)]
            try:
                settle(inv, refund.refund_id, operation.outcome, operation.settlement)
            except errors.RefundStateConflict:  # the opposite of a final outcome: nothing changed
                assert refund.state not in (RefundState.PENDING, operation.outcome)
        return
    if isinstance(operation, Void):
        if notes:
            index = operation.which % len(notes)
            notes[index] = void(inv, notes[index])
        return
    requests = [] if operation.amount is not None else _requests(inv, operation)
    settlement = _settlement(inv, operation, requests)
    notes.append(
        issue_credit_note(
            inv,
            command(
                amount=operation.amount,
                lines=requests,
                settlement=settlement,
                on_excess=operation.on_excess,
                linked=operation.linked,
            ),
            now=NOW,
        )
    )


def _assert_caps_hold(inv: Invoice, notes: list[CreditNote]) -> None:
    live = [note for note in notes if note.status is CreditNoteStatus.ISSUED]
    credited = sum(note.total for note in live)

    assert credited <= inv.total
    assert inv.pre_payment_credited + inv.post_payment_credited == credited
    assert inv.pre_payment_credited == sum(note.pre_payment_amount for note in live)
    assert inv.amount_remaining >= 0
    assert 0 <= inv.refunds_failed <= inv.refunded
    assert inv.refunded - inv.refunds_failed <= inv.amount_paid
    assert inv.refunded == sum(note.refund_amount for note in live)
    for invoice_line in inv.lines:
        assert 0 <= invoice_line.credited_net <= invoice_line.net
        assert 0 <= invoice_line.credited_tax <= invoice_line.tax
        assert 0 <= invoice_line.credited_quantity <= invoice_line.quantity
        on_line = [
            credited_line
            for note in live
            for credited_line in note.lines
            if credited_line.invoice_line_id == invoice_line.id
        ]
        assert sum(credited_line.net for credited_line in on_line) == invoice_line.credited_net
        assert sum(credited_line.tax for credited_line in on_line) == invoice_line.credited_tax
    for note in notes:
        assert note.total > 0
        assert 0 <= note.pre_payment_amount <= note.total
        parts = (note.refund_amount, note.credit_amount, note.out_of_band_amount)
        assert all(part >= 0 for part in parts)
        assert sum(parts) == note.post_payment_amount
        assert sum(entry.debit for entry in note.journal) == sum(entry.credit for entry in note.journal)
        assert sum(entry.debit for entry in note.void_journal) == sum(
            entry.credit for entry in note.void_journal
        )
    assert [note.number for note in notes] == [
        f"{inv.number}-CN-{sequence:02d}" for sequence in range(1, len(notes) + 1)
    ]
    _assert_money_loop_holds(inv, notes)


def _balanced(journal: tuple[JournalLine, ...]) -> bool:
    return sum(entry.debit for entry in journal) == sum(entry.credit for entry in journal)


def _assert_money_loop_holds(inv: Invoice, notes: list[CreditNote]) -> None:
    # payments: amount_paid is their applied parts; the rest went to the balance
    assert inv.amount_paid == sum(payment.applied for payment in inv.payments)
    assert [payment.sequence for payment in inv.payments] == sorted(
        {payment.sequence for payment in inv.payments})
    ids = [payment.payment_id for payment in inv.payments if payment.payment_id is not None]
    assert len(ids) == len(set(ids))
    # per payment, pending and succeeded refunds within its applied cash (cash_of checks it too)
    for cash in cash_of(inv.payments, inv.refunds):
        assert 0 <= cash.refunded <= cash.applied
    # a refund id once; the counters
    assert len({refund.refund_id for refund in inv.refunds}) == len(inv.refunds)
    assert inv.refunded == sum(refund.amount for refund in inv.refunds)
    assert inv.refunds_failed == sum(refund.amount for refund in inv.refunds
                                     if refund.state is RefundState.FAILED)
    # per credit note, its refunds add up to its refund amount
    for note in notes:
        assert sum(refund.amount for refund in inv.refunds_of(note.id)) == note.refund_amount
        assert {r.refund_id for r in note.refunds} == {r.refund_id for r in inv.refunds_of(note.id)}
    # one refund.requested per new refund, none for a linked one
    requested = events_of(inv, RefundRequested)
    assert sorted((event.id, event.amount) for event in requested) == sorted(
        (refund.refund_id, refund.amount) for refund in inv.refunds if not refund.linked)
    # every journal balances; the open refunds_payable = pending + failed settled as none
    outcome_journals = [event.journal for event in inv.events if isinstance(
        event, CreditNoteRefundSucceeded | CreditNoteRefundFailed)]
    journals = [note.journal for note in notes] + [
        note.void_journal for note in notes if note.status is CreditNoteStatus.VOID] + [
        refund_journal(refund) for refund in inv.refunds] + outcome_journals
    assert all(_balanced(journal) for journal in journals)
    payable = [entry for journal in journals[:-len(outcome_journals) or None] for entry in journal
               if entry.account is Account.REFUNDS_PAYABLE]
    assert sum(entry.credit - entry.debit for entry in payable) == sum(
        refund.open_payable for refund in inv.refunds)
    assert sorted(map(repr, outcome_journals)) == sorted(
        repr(refund_journal(refund)) for refund in inv.refunds if refund.settled_by is not None)
    # every customer-balance event matches an amount sent to the balance, once
    sent = sorted([(BalanceReason.CREDIT_NOTE, note.id, note.credit_amount) for note in notes
                   if note.credit_amount] +
                  [(BalanceReason.REFUND_FAILED, refund.refund_id, refund.to_customer_balance)
                   for refund in inv.refunds if refund.to_customer_balance] +
                  [(BalanceReason.OVERPAYMENT, str(payment.sequence), payment.overpayment)
                   for payment in inv.payments if payment.overpayment])
    by_trigger = {payment.trigger: str(payment.sequence) for payment in inv.payments}
    published = sorted(
        (event.reason, {BalanceReason.CREDIT_NOTE: event.credit_note_id,
                        BalanceReason.REFUND_FAILED: event.refund_id,
                        BalanceReason.OVERPAYMENT: by_trigger.get(event.trigger)}[event.reason],
         event.amount)
        for event in events_of(inv, CustomerBalanceCredited))
    assert published == sent
    assert len({event.trigger for event in events_of(inv, CustomerBalanceCredited)}) == len(sent)


@SETTINGS
@given(data=st.data())
def test_no_sequence_of_credits_payments_outcomes_and_voids_breaks_a_cap_or_invariant(
        data: st.DataObject) -> None:
    inv = data.draw(invoices(), label="invoice")
    steps = data.draw(st.lists(operations(inv), max_size=8), label="steps")
    notes: list[CreditNote] = []

    for step in steps:
        before = copy.deepcopy(inv)
        try:
            _apply(inv, notes, step)
        except (errors.Rejection, errors.InvalidMessage):
            assert inv == before  # a refused request changes nothing
            assert inv.events == before.events
        _assert_caps_hold(inv, notes)
    event("refund outcomes: " + ("some" if any(r.settled_by for r in inv.refunds) else "none"))
    event("linked refunds: " + ("some" if any(r.linked for r in inv.refunds) else "none"))
    event("failed to the balance: " + (
        "some" if any(r.to_customer_balance for r in inv.refunds) else "none"))
    event("overpayments: " + ("some" if any(p.overpayment for p in inv.payments) else "none"))
    # the credit notes as they stand now: their refunds' states are the invoice's
    notes[:] = [dataclasses.replace(note, refunds=inv.refunds_of(note.id)) for note in notes]
    _assert_money_loop_holds(inv, notes)


@SETTINGS
@given(inv=invoices())
@example(inv=invoice(lines=[line("L1", quantity=10, unit_amount=13)], discounts=[percent_off(8_000)]))
def test_single_unit_credits_of_every_line_add_up_to_the_invoice_total(inv: Invoice) -> None:
    # Exact whenever every unit is worth at least one minor unit; a unit worth less than
    # half a minor unit credits nothing and is refused (docs/decisions.md).
    assume(all(invoice_line.net >= invoice_line.quantity for invoice_line in inv.lines))
    inv = copy.deepcopy(inv)
    notes = []
    for invoice_line in inv.lines:
        for _ in range(invoice_line.quantity):
            # A unit whose share rounded to nothing has nothing left to credit.
            with contextlib.suppress(errors.NothingLeftToCredit):
                notes.append(issue_credit_note(inv, command(lines=[by_quantity(invoice_line.id, 1)])))

    assert sum(note.total for note in notes) == inv.total
    assert all(invoice_line.remaining_gross == 0 for invoice_line in inv.lines)
    assert inv.amount_remaining == 0


@SETTINGS
@given(inv=invoices(), gross=st.integers(1, 10**7))
def test_a_capped_trigger_never_credits_more_than_is_left(inv: Invoice, gross: int) -> None:
    left = inv.creditable
    try:
        note = issue_credit_note(inv, command(amount=gross, on_excess=OnExcess.CAP))
    except errors.NothingLeftToCredit:
        assert left == 0
        return

    assert note.total == min(gross, left)
    assert sum(credited.net for credited in note.lines) == note.subtotal


@st.composite
def unpaid_invoices(draw: st.DrawFn) -> Invoice:
    """1-3 priced lines, some tax, maybe some balance applied, nothing paid yet."""
    specs = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(100, 50_000), TAX_RATES),
                          min_size=1, max_size=3))
    drafts = [line(f"L{index}", quantity=quantity, unit_amount=unit_amount, tax_rate_bps=rate)
              for index, (quantity, unit_amount, rate) in enumerate(specs, start=1)]
    unpaid = invoice(lines=drafts)
    balance = draw(st.one_of(st.just(0), st.integers(0, unpaid.total // 5)))
    return invoice(lines=drafts, customer_balance_applied=balance)


def money_loop_operations(inv: Invoice) -> st.SearchStrategy[Operation]:
    """Payments, line-less credits that mostly refund (some linking refunds) and many outcomes."""
    ceiling = max(inv.total, 1)
    outcome = st.builds(Outcome, which=st.integers(0, 15),
                        outcome=st.sampled_from([RefundState.SUCCEEDED, RefundState.FAILED]),
                        settlement=st.sampled_from(list(FailureSettlement)))
    credit = st.builds(
        Credit,
        amount=st.integers(1, max(ceiling // 2, 1)),
        lines=st.just(()),
        on_excess=st.sampled_from(list(OnExcess)),
        settlement=st.one_of(st.just(Settlement.REFUND), st.just(Settlement.REFUND),
                             st.builds(Split, refund_pct=st.integers(0, 100),
                                       credit_pct=st.integers(0, 100), skew=st.just(0)),
                             st.just(Settlement.CUSTOMER_BALANCE)),
        linked=st.one_of(st.just(()), st.lists(
            st.tuples(st.sampled_from(["re_1", "re_2", "re_3", "re_4"]),
                      st.integers(1, max(ceiling // 4, 1))), max_size=2).map(tuple)),
    )
    return st.one_of(
        credit, credit,
        st.builds(Pay, pct=st.integers(0, 150),
                  payment_id=st.one_of(st.none(), st.sampled_from(["pay_1", "pay_2", "pay_3"])),
                  extra=st.sampled_from([0, 1, 700])),
        outcome, outcome, outcome,
    )


@SETTINGS
@given(data=st.data())
def test_payments_refunding_credits_and_outcomes_keep_every_money_loop_invariant(
        data: st.DataObject) -> None:
    inv = data.draw(unpaid_invoices(), label="invoice")
    # paid by a few payments first, so there is cash to refund
    paying = data.draw(st.lists(st.sampled_from(["pay_a", "pay_b", "pay_c"]), min_size=1, max_size=3,
                                unique=True), label="paid by")
    for index, payment_id in enumerate(paying, 1):
        amount = inv.amount_remaining if index == len(paying) else inv.amount_remaining // 2
        if amount > 0:
            pay(inv, amount, payment_id)
    steps = data.draw(st.lists(money_loop_operations(inv), min_size=3, max_size=16), label="steps")
    notes: list[CreditNote] = []

    for step in steps:
        before = copy.deepcopy(inv)
        try:
            _apply(inv, notes, step)
        except (errors.Rejection, errors.InvalidMessage):
            assert inv == before  # a refused request changes nothing
            assert inv.events == before.events
        _assert_caps_hold(inv, notes)
    event("refund outcomes: " + ("some" if any(r.settled_by for r in inv.refunds) else "none"))
    event("linked refunds: " + ("some" if any(r.linked for r in inv.refunds) else "none"))
    event("failed, settled as none: " + ("some" if any(
        r.resettled_to is FailureSettlement.NONE for r in inv.refunds) else "none"))
    event("payments: " + str(min(len(inv.payments), 3)))
    notes[:] = [dataclasses.replace(note, refunds=inv.refunds_of(note.id)) for note in notes]
    _assert_money_loop_holds(inv, notes)
