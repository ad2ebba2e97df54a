"""Pricing a credit note: every rule of docs/rules.md that decides how much, and where it goes.

:func:`price_credit_note` is pure: it checks everything against the invoice
as it stands and returns a :class:`~service.domain.invoice.PricedCredit`, or
raises a :class:`~service.domain.errors.Rejection`. The invoice then applies
it to itself (``Invoice.issue``) and records the events; a void is the
invoice's alone (``Invoice.void_credit_note``). Both run under the invoice's
lock.

Where each rule lives:

- caps (invoice total, each line's net and tax, refundable cash): ``_price_*``,
  ``_cap_to_invoice`` and ``_settle``; a trigger policy's cap, cumulative per
  invoice and trigger type: ``_cap_to_policy``;
- time-based credits over what is left and over uncovered time:
  ``_price_unused_time`` (coverage kept on the invoice line, restored by a void);
- which settlements a trigger may ask for: ``_check_settlement``;
- discount and tax shares, rounding, the final sweep: ``_price_quantity``,
  ``_price_amount``, ``_spread`` (all via :mod:`service.domain.money`);
- the pre/post-payment split and settlement: ``price_credit_note`` and ``_settle``;
- the refunds over the invoice's payments (newest first, linked ones whole on
  one payment, stable ids): :func:`refunds.plan_refunds`; a linked id taken
  already: ``_check_linked``;
- the accounting date (``effective_at``): ``_effective_at``;
- numbering and journal: :mod:`credit_note`; open-to-paid, the credited figures
  and the events: ``Invoice.issue``;
- void rules: ``Invoice.void_credit_note``; payments, refund outcomes and edits:
  ``Invoice.receive_payment``, ``Invoice.settle_refund``, ``Invoice.update_credit_note``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from service.domain import errors, money, refunds
from service.domain.commands import (
    CustomLine,
    InvoiceLineByAmount,
    InvoiceLineByQuantity,
    IssueCreditNote,
    OnExcess,
    Settlement,
    SettlementSplit,
    UnusedTime,
    VoidCreditNote,
)
from service.domain.credit_note import (
    CreditNote,
    CreditNoteLine,
    Reason,
    credit_note_number,
    derived_id,
    refund_order,
)
from service.domain.invoice import (
    CreditMethod,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LineTake,
    PricedCredit,
)


@dataclass(frozen=True)
class _Credit:
    """One priced line of a credit note, and what it takes from its invoice line."""

    line: CreditNoteLine
    invoice_line: InvoiceLine | None = None
    quantity: int = 0
    method: CreditMethod | None = None


#: How far ahead of the service's clock an ``effective_at`` may be (docs/rules.md, Editing and dates).
EFFECTIVE_AT_TOLERANCE = timedelta(minutes=5)


def issue_credit_note(invoice: Invoice, command: IssueCreditNote, *,
                      now: datetime | None = None,
                      taken_refund_ids: Collection[str] = frozenset()) -> CreditNote:
    """Price a credit note on ``invoice`` and apply it (or raise a Rejection, changing nothing)."""
    return invoice.issue(price_credit_note(invoice, command, now=now,
                                           taken_refund_ids=taken_refund_ids))


def void_credit_note(invoice: Invoice, note: CreditNote, command: VoidCreditNote, *,
                     now: datetime | None = None) -> CreditNote:
    """Void ``note`` on its invoice (the rules are the aggregate's: ``Invoice.void_credit_note``)."""
    return invoice.void_credit_note(note, command.trigger, now=now)


def price_credit_note(invoice: Invoice, command: IssueCreditNote, *,
                      now: datetime | None = None,
                      taken_refund_ids: Collection[str] = frozenset()) -> PricedCredit:
    """Price a credit note on ``invoice`` as it stands, or raise a Rejection; changes nothing.

    ``now`` is the service's clock (default: read here); ``taken_refund_ids``
    are the ids of ``command.linked_refunds`` that any refund already has
    (the unit of work's lock reports them): linking one is rejected
    ``refund_already_linked``.
    """
    if invoice.status is InvoiceStatus.VOID:
        raise errors.InvoiceVoid("credit notes cannot be issued on a void invoice")
    if command.currency is not None and command.currency != invoice.currency:
        raise errors.CurrencyMismatch(
            f"the command is in {command.currency} but the invoice is in {invoice.currency}"
        )
    try:
        reason = Reason(command.reason)
    except ValueError:
        raise errors.InvalidMessage(f"unknown credit note reason {command.reason!r}") from None
    _check_request(command)
    _check_settlement(command)
    effective_at = _effective_at(command, now or datetime.now(UTC))
    _check_linked(invoice, command, taken_refund_ids)

    credits = _price(invoice, command)
    total = sum(credit.line.total for credit in credits)
    if command.max_credit_bps is not None:
        credits = _cap_to_policy(invoice, command, credits, total)
        total = sum(credit.line.total for credit in credits)
    if total > invoice.creditable:
        credits = _cap_to_invoice(invoice, command, credits, total)
        total = sum(credit.line.total for credit in credits)
    if total <= 0:
        raise errors.NothingLeftToCredit("nothing is left to credit on this invoice")

    pre_payment = min(total, invoice.amount_remaining)
    refund, balance, out_of_band = _settle(invoice, command, total - pre_payment)
    note_id = derived_id("cn", command.trigger)
    planned = refunds.plan_refunds(note_id, refund, invoice.cash, command.linked_refunds,
                                   effective_at=effective_at)
    sequence = invoice.credit_note_count + 1
    note = CreditNote(
        id=note_id,
        number=credit_note_number(invoice.number, sequence),
        sequence=sequence,
        invoice_id=invoice.id,
        customer_id=invoice.customer_id,
        currency=invoice.currency,
        reason=reason,
        lines=tuple(credit.line for credit in credits),
        pre_payment_amount=pre_payment,
        refund_amount=refund,
        credit_amount=balance,
        out_of_band_amount=out_of_band,
        trigger=command.trigger,
        policy=command.policy,
        memo=command.memo,
        metadata=dict(command.metadata),
        effective_at=effective_at,
        refunds=tuple(sorted(planned, key=refund_order)),
    )
    return PricedCredit(note, tuple(LineTake(credit.quantity, credit.method)
                                    for credit in credits))


def _effective_at(command: IssueCreditNote, now: datetime) -> datetime:
    """The accounting date: explicit, else the upstream event's time, else ``now``.

    More than 5 minutes ahead of ``now`` is rejected ``invalid_effective_at``
    (an upstream event's own time too: a clock that far ahead is for a person
    to look at); there is no lower bound (backdating is allowed).
    """
    effective_at = command.effective_at or command.trigger.time or now
    if effective_at.tzinfo is None:
        raise errors.InvalidMessage("effective_at needs a time zone offset")
    if effective_at > now + EFFECTIVE_AT_TOLERANCE:
        raise errors.InvalidEffectiveAt(
            "effective_at is more than 5 minutes ahead of the service's clock")
    return effective_at


def _check_linked(invoice: Invoice, command: IssueCreditNote,
                  taken_refund_ids: Collection[str]) -> None:
    """A refund id is linked once, ever: not one any refund already has (here or elsewhere)."""
    mine = {refund.refund_id for refund in invoice.refunds}
    taken = [refund.refund_id for refund in command.linked_refunds
             if refund.refund_id in mine or refund.refund_id in taken_refund_ids]
    if taken:
        raise errors.RefundAlreadyLinked(
            f"{len(taken)} of the linked refund ids belong to a refund already")


def _check_request(command: IssueCreditNote) -> None:
    """Shapes the wire models already refuse; checked here too, as money is at stake."""
    amounts = [command.amount, command.amount_bps]
    if sum(value is not None for value in amounts) + bool(command.lines) != 1:
        raise errors.InvalidMessage("a credit note needs exactly one of amount and lines")
    positive = [value for value in amounts if value is not None]
    not_negative = [] if command.max_credit_bps is None else [command.max_credit_bps]
    for line in command.lines:
        if isinstance(line, InvoiceLineByQuantity):
            positive.append(line.quantity)
        elif isinstance(line, InvoiceLineByAmount):
            positive.append(line.amount)
        elif isinstance(line, CustomLine):
            positive += [line.quantity, line.unit_amount]
            not_negative.append(line.tax_rate_bps)
    if isinstance(command.settlement, SettlementSplit):
        split = command.settlement
        not_negative += [split.refund_amount or 0, split.credit_amount,
                         split.out_of_band_amount]
    if any(value <= 0 for value in positive) or any(value < 0 for value in not_negative):
        raise errors.InvalidMessage("amounts and quantities must be positive")


def _check_settlement(command: IssueCreditNote) -> None:
    """A trigger may ask only for the settlements its topic allows (settings)."""
    allowed = command.allowed_settlements
    if allowed is not None and isinstance(command.settlement, Settlement) and (
            command.settlement not in allowed):
        names = ", ".join(sorted(allowed))
        raise errors.SettlementNotAllowed(
            f"settlement {command.settlement.value} is not allowed for {command.trigger.type} "
            f"(allowed: {names or 'none'})")


def _price(invoice: Invoice, command: IssueCreditNote) -> list[_Credit]:
    if command.amount_bps is not None:
        return _price_line_less(invoice, money.basis_points(invoice.total, command.amount_bps),
                                command.on_excess)
    if command.amount is not None:
        return _price_line_less(invoice, command.amount, command.on_excess)
    ids = [line.invoice_line_id for line in command.lines if not isinstance(line, CustomLine)]
    if len(ids) != len(set(ids)):
        raise errors.InvalidMessage("an invoice line may appear only once in a credit note")
    credits: list[_Credit] = []
    for request in command.lines:
        if isinstance(request, InvoiceLineByQuantity):
            credit = _price_quantity(invoice.line(request.invoice_line_id), request.quantity,
                                     command.on_excess)
        elif isinstance(request, InvoiceLineByAmount):
            credit = _price_amount(invoice.line(request.invoice_line_id), request.amount,
                                   command.on_excess)
        elif isinstance(request, UnusedTime):
            credit = _price_unused_time(invoice.line(request.invoice_line_id), request.at,
                                        command.on_excess)
        else:
            credit = _price_custom(request)
        if credit is not None:
            credits.append(credit)
    return credits


def _price_quantity(line: InvoiceLine, quantity: int, on_excess: OnExcess) -> _Credit | None:
    """A quantity of a line, carrying its discount share and its tax in proportion.

    On a line no time-based credit covers, ``quantity`` of the line's net (on the
    cumulative quantity). Once time is covered, ``quantity`` of the units left
    share of what is left: ``remaining net * quantity / units left``.
    """
    if line.credit_method is CreditMethod.AMOUNT:
        raise errors.CreditMethodConflict(
            f"line {line.id} was credited by amount and can only be credited by amount"
        )
    left = line.quantity - line.credited_quantity
    if quantity > left:
        _refuse_excess(on_excess, f"line {line.id} has {left} left to credit")
        quantity = left
    if quantity == 0 or line.remaining_gross == 0:
        return None  # nothing left on this line
    if quantity == left:  # the final sweep: exactly what is left, net and tax
        net, tax = line.remaining_net, line.remaining_tax
    elif line.time_credits:
        # time credits took every unit's covered time: the units left share what is left,
        # so a return and a cancellation credit the same in either order
        net = money.proportion(line.remaining_net, quantity, left)
        tax = _tax_share(line, net)
    else:
        # priced on the cumulative quantity, so rounding never drifts over many returns
        done = line.credited_quantity
        net = (money.proportion(line.net, done + quantity, line.quantity)
               - money.proportion(line.net, done, line.quantity))
        if net > line.remaining_net:
            _refuse_excess(on_excess, f"line {line.id} has {line.remaining_net} left to credit")
            net = line.remaining_net
        tax = _tax_share(line, net)
    return _Credit(
        CreditNoteLine(description=line.description, net=net, tax=tax,
                       tax_rate_bps=line.tax_rate_bps, invoice_line_id=line.id,
                       quantity=quantity, unit_amount=line.unit_amount),
        invoice_line=line, quantity=quantity, method=CreditMethod.QUANTITY,
    )


def _price_amount(line: InvoiceLine, amount: int, on_excess: OnExcess) -> _Credit | None:
    """A net amount of a line; its tax is added in proportion."""
    if line.credit_method is CreditMethod.QUANTITY:
        raise errors.CreditMethodConflict(
            f"line {line.id} was credited by quantity and can only be credited by quantity"
        )
    return _net_of_line(line, amount, on_excess, CreditMethod.AMOUNT)


def _price_unused_time(line: InvoiceLine, at: datetime, on_excess: OnExcess) -> _Credit | None:
    """What is left of a line, for the time from ``at`` not covered before; tax in proportion.

    Earlier time-based credits cover ``[covered_from, end)``; this one covers
    ``[at, end)``, so it credits the uncovered ``[at, covered_from)`` out of the
    ``covered_from - start`` seconds not covered yet (by the second), of the
    net still left: ``round(remaining net * uncovered / (period - covered))``.
    """
    if line.period is None:
        raise errors.NoServicePeriod(f"line {line.id} has no service period to prorate")
    start, end = line.period.start, line.period.end
    if not start <= at <= end:
        raise errors.OutsideServicePeriod(
            f"the time given is outside the service period of line {line.id}")
    covered_from = line.covered_from or end
    second = timedelta(seconds=1)
    uncovered = (covered_from - at) // second
    if uncovered <= 0:
        return None  # all of [at, end) was credited before
    net = money.proportion(line.remaining_net, uncovered, (covered_from - start) // second)
    credit = _net_of_line(line, net, on_excess, method=None)  # time fixes no credit method
    if credit is None:
        return None
    return replace(credit, line=replace(credit.line, covers_from=at))


def _net_of_line(line: InvoiceLine, net: int, on_excess: OnExcess,
                 method: CreditMethod | None) -> _Credit | None:
    """A net amount of a line, capped at what is left on it; its tax added in proportion."""
    if net > line.remaining_net:
        _refuse_excess(on_excess, f"line {line.id} has {line.remaining_net} net left to credit")
        net = line.remaining_net
    if net == 0:
        return None
    return _Credit(
        CreditNoteLine(description=line.description, net=net, tax=_tax_share(line, net),
                       tax_rate_bps=line.tax_rate_bps, invoice_line_id=line.id),
        invoice_line=line, method=method,
    )


def _tax_share(line: InvoiceLine, net: int) -> int:
    """Credited tax = line tax * credited net / line net; exhausting the net takes all tax left."""
    if net == line.remaining_net:
        return line.remaining_tax
    return min(money.proportion(line.tax, net, line.net), line.remaining_tax)


def _price_custom(request: CustomLine) -> _Credit:
    net = request.quantity * request.unit_amount
    return _Credit(CreditNoteLine(
        description=request.description, net=net,
        tax=money.basis_points(net, request.tax_rate_bps), tax_rate_bps=request.tax_rate_bps,
        quantity=request.quantity, unit_amount=request.unit_amount,
    ))


def _price_line_less(invoice: Invoice, gross: int, on_excess: OnExcess) -> list[_Credit]:
    """A gross amount (tax included) spread over the lines by what is left on each."""
    left = min(invoice.creditable, sum(line.remaining_gross for line in invoice.lines))
    if left == 0:
        _refuse_excess(on_excess, "the invoice has nothing left to credit")
        raise errors.NothingLeftToCredit("nothing is left to credit on this invoice")
    if gross > left:
        _refuse_excess(on_excess, f"the invoice has {left} left to credit")
        gross = left
    return _spread(invoice.lines, gross)


def _spread(lines: list[InvoiceLine], gross: int) -> list[_Credit]:
    """Largest-remainder shares of ``gross``, each split into net and tax by what is left."""
    shares = money.allocate(gross, [line.remaining_gross for line in lines])
    credits = []
    for line, share in zip(lines, shares, strict=True):
        if share == 0:
            continue
        net, tax = money.allocate(share, [line.remaining_net, line.remaining_tax])
        credits.append(_Credit(
            CreditNoteLine(description=line.description, net=net, tax=tax,
                           tax_rate_bps=line.tax_rate_bps, invoice_line_id=line.id),
            invoice_line=line,
        ))
    return credits


def _cap_to_invoice(invoice: Invoice, command: IssueCreditNote, credits: list[_Credit],
                    total: int) -> list[_Credit]:
    """Scale a trigger's credits down to what the invoice has left (custom lines can use it up).

    Each credit keeps at most what it asked for; a scaled credit no longer
    stands for whole units, so it records no quantity and no credit method.
    """
    _refuse_excess(command.on_excess,
                   f"the credit of {total} exceeds the {invoice.creditable} left to credit")
    return _scale(credits, invoice.creditable)


def _cap_to_policy(invoice: Invoice, command: IssueCreditNote, credits: list[_Credit],
                   total: int) -> list[_Credit]:
    """Scale a trigger's credits down to what its policy still allows on this invoice.

    The cap (``max_credit_bps`` of the invoice total) is on all the non-void
    credit notes of the trigger's type on the invoice together, not per event.
    """
    assert command.max_credit_bps is not None
    kind = command.trigger.type
    cap = money.basis_points(invoice.total, command.max_credit_bps)
    allowed = max(cap - invoice.credited_by_trigger.get(kind, 0), 0)
    if total <= allowed:
        return credits
    _refuse_excess(command.on_excess, f"the policy allows {allowed} more")
    if allowed == 0:
        raise errors.NothingLeftToCredit(
            f"the {kind} policy allows no more credit on this invoice (cap {cap})")
    return _scale(credits, allowed)


def _scale(credits: list[_Credit], total: int) -> list[_Credit]:
    """Credits scaled down to ``total``, by largest remainder, net and tax alike."""
    shares = money.allocate(total, [credit.line.total for credit in credits])
    scaled = []
    for credit, share in zip(credits, shares, strict=True):
        if share == credit.line.total:
            scaled.append(credit)
            continue
        if share == 0:
            continue
        net, tax = money.allocate(share, [credit.line.net, credit.line.tax])
        # a scaled time-based credit still covers its time (covers_from is kept)
        line = replace(credit.line, net=net, tax=tax, quantity=None, unit_amount=None)
        scaled.append(_Credit(line, invoice_line=credit.invoice_line))
    return scaled


def _refuse_excess(on_excess: OnExcess, message: str) -> None:
    if on_excess is OnExcess.REJECT:
        raise errors.ExceedsCreditableAmount(f"the request asks for more than is left: {message}")


def _settle(invoice: Invoice, command: IssueCreditNote, post_payment: int
            ) -> tuple[int, int, int]:
    """Split the post-payment part into (refund, customer balance, out of band).

    Linked refunds are part of the refund: an explicit ``refund_amount`` must
    hold them (``settlement_mismatch``, an explicit 0 included); without one,
    the refund is their sum and the rest of the post-payment part goes where
    the settlement says (out of band, else the customer balance). Where each
    refund goes: :func:`refunds.plan_refunds`.
    """
    settlement = command.settlement
    linked = sum(refund.amount for refund in command.linked_refunds)
    if linked and isinstance(settlement, SettlementSplit) and settlement.refund_amount is None:
        settlement = replace(settlement, refund_amount=linked)
    if linked and not isinstance(settlement, SettlementSplit):
        if post_payment < linked:
            raise errors.SettlementMismatch(
                f"the linked refunds add up to {linked}, more than the post-payment amount "
                f"{post_payment}")
        rest = post_payment - linked
        if settlement is Settlement.OUT_OF_BAND:
            return linked, 0, rest
        return linked, rest, 0
    if isinstance(settlement, SettlementSplit):
        refund = settlement.refund_amount or 0
        parts = (refund, settlement.credit_amount, settlement.out_of_band_amount)
        if sum(parts) != post_payment:
            raise errors.SettlementMismatch(
                f"refund, credit and out-of-band amounts must add up to the post-payment "
                f"amount {post_payment}"
            )
        if refund > invoice.refundable:
            raise errors.ExceedsRefundableAmount(
                f"at most {invoice.refundable} of collected cash can be refunded"
            )
        return parts
    if settlement is Settlement.REFUND:
        refund = min(post_payment, invoice.refundable)
        return refund, post_payment - refund, 0
    if settlement is Settlement.OUT_OF_BAND:
        return 0, 0, post_payment
    return 0, post_payment, 0
