"""Pure translation: a CloudEvent read from a topic becomes a domain command.

One function per message type, registered per topic in :data:`TRANSLATORS`.
Parsing is strict (see :mod:`wire`); anything that does not fit raises
``InvalidMessage`` or ``UnsupportedType`` with a reason that names the field,
never its value.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from service.domain import errors
from service.domain.commands import (
    Command,
    CustomLine,
    Discount,
    DraftLine,
    FinalizeInvoice,
    InvoiceLineByAmount,
    InvoiceLineByQuantity,
    IssueCreditNote,
    LineRequest,
    MarkInvoiceUncollectible,
    RecordPayment,
    ServicePeriod,
    Settlement,
    SettlementSplit,
    Trigger,
    VoidCreditNote,
    VoidInvoice,
)
from service.entrypoints import wire
from service.settings import Topics

Model = TypeVar("Model", bound=BaseModel)
Translator = Callable[[wire.CloudEvent, Trigger], Command]
Header = tuple[str, bytes]


def decode_envelope(value: bytes | None, headers: Sequence[Header]) -> wire.CloudEvent:
    """A CloudEvent from a Kafka record, in structured or binary content mode."""
    if value is None:
        raise errors.InvalidMessage("the record has no value")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidMessage("the record value is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise errors.InvalidMessage("the record value is not JSON") from None
    attributes = {name[3:]: raw.decode("utf-8", "replace") for name, raw in headers
                  if name.startswith("ce_")}
    if attributes:  # binary mode: attributes in ce_* headers, the value is the data
        return parse(wire.CloudEvent, {**attributes, "data": body}, "CloudEvent")
    if not isinstance(body, dict):
        raise errors.InvalidMessage("the record value is not a CloudEvent object")
    return parse(wire.CloudEvent, body, "CloudEvent")


def parse(model: type[Model], data: Any, what: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise errors.InvalidMessage(f"invalid {what}: {describe(error)}") from None


def describe(error: ValidationError) -> str:
    """Field paths and what is wrong with them, without the offending values."""
    problems = []
    for item in error.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(part) for part in item["loc"]) or "message"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")


def finalized(event: wire.CloudEvent, trigger: Trigger) -> Command:
    invoice = parse(wire.InvoiceFinalized, event.data, "invoice.finalized data").invoice
    return FinalizeInvoice(
        trigger=trigger, invoice_id=invoice.id, number=invoice.number,
        customer_id=invoice.customer_id, currency=invoice.currency, status=invoice.status,
        lines=tuple(
            DraftLine(id=line.id, description=line.description, quantity=line.quantity,
                      unit_amount=line.unit_amount, tax_rate_bps=line.tax_rate_bps,
                      period=ServicePeriod(line.period.start, line.period.end)
                      if line.period else None)
            for line in invoice.lines
        ),
        discounts=tuple(Discount(d.percent_off_bps, d.amount_off) for d in invoice.discounts),
        customer_balance_applied=invoice.customer_balance_applied,
        amount_paid=invoice.amount_paid, stated_total=invoice.total,
    )


def payment_succeeded(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.InvoicePaymentSucceeded, event.data, "invoice.payment_succeeded data")
    return RecordPayment(trigger, data.invoice_id, data.amount, data.currency)


def voided(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.InvoiceReference, event.data, "invoice.voided data")
    return VoidInvoice(trigger, data.invoice_id)


def marked_uncollectible(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.InvoiceReference, event.data, "invoice.marked_uncollectible data")
    return MarkInvoiceUncollectible(trigger, data.invoice_id)


def issue(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.CreditNoteIssue, event.data, "credit_note.issue data")
    parts = (data.refund_amount, data.credit_amount, data.out_of_band_amount)
    settlement: Settlement | SettlementSplit = Settlement.CUSTOMER_BALANCE
    if any(part is not None for part in parts):
        settlement = SettlementSplit(*(part or 0 for part in parts))
    return IssueCreditNote(
        trigger=trigger, invoice_id=data.invoice_id, reason=data.reason,
        lines=tuple(_line(line) for line in data.lines or ()), amount=data.amount,
        settlement=settlement, currency=data.currency, memo=data.memo,
        metadata=dict(data.metadata),
    )


def void(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.CreditNoteVoid, event.data, "credit_note.void data")
    return VoidCreditNote(trigger, data.credit_note_id)


def _line(line: wire.InvoiceLineItem | wire.CustomLineItem) -> LineRequest:
    if isinstance(line, wire.CustomLineItem):
        return CustomLine(line.description, line.quantity, line.unit_amount, line.tax_rate_bps)
    if line.quantity is not None:
        return InvoiceLineByQuantity(line.invoice_line_id, line.quantity)
    assert line.amount is not None  # the model requires one of the two
    return InvoiceLineByAmount(line.invoice_line_id, line.amount)


def translators(topics: Topics) -> dict[str, dict[str, Translator]]:
    """Which message types each input topic carries, and how each becomes a command."""
    return {
        topics.invoices: {
            "invoice.finalized": finalized,
            "invoice.payment_succeeded": payment_succeeded,
            "invoice.voided": voided,
            "invoice.marked_uncollectible": marked_uncollectible,
        },
        topics.credit_note_commands: {
            "credit_note.issue": issue,
            "credit_note.void": void,
        },
    }


def translate(event: wire.CloudEvent, topic: str,
              table: Mapping[str, Mapping[str, Translator]]) -> Command:
    translator = table.get(topic, {}).get(event.type)
    if translator is None:
        raise errors.UnsupportedType(f"type {event.type!r} is not read from topic {topic!r}")
    return translator(event, Trigger(event.source, event.id, event.type))
