"""Domain events as CloudEvents 1.0 (structured JSON) on the contract's topics.

The event ``id`` is derived from the upstream trigger and the event type (for
``refund.requested``, one per refund of a credit note: the type and the refund
id), so the same effect always carries the same id, even if it is written again
after a crash or a redelivery. Everything is keyed by its invoice, but
``customer_balance.credited``: by its customer (order per customer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from service.domain.commands import Trigger
from service.domain.credit_note import CreditNote, JournalLine, derived_id
from service.domain.events import (
    CreditNoteIssued,
    CreditNoteRefundSucceeded,
    CreditNoteRejected,
    CreditNoteUpdated,
    CreditNoteVoided,
    CustomerBalanceCredited,
    Event,
    InvoicePaid,
    InvoiceState,
    RefundRequested,
)
from service.domain.refunds import Refund
from service.settings import Topics

SOURCE = "/credit-notes"
CONTENT_TYPE = "application/cloudevents+json"


@dataclass(frozen=True)
class OutgoingEvent:
    id: str
    topic: str
    key: str | None
    type: str
    cloudevent: dict[str, Any]

    def to_json(self) -> str:
        """The record value: UTF-8 as it is (no ``\\uXXXX`` for non-ASCII) and compact.

        ASCII escaping made a 4-byte character 12 bytes and a 300-character
        description 1,800; the wire limits (``service/entrypoints/wire.py``) are
        sized on this encoding so every event fits a broker's default 1 MB.
        Written by orjson: the same text as ``json.dumps(cloudevent, ensure_ascii=False,
        separators=(",", ":"))`` (``tests/unit/test_fast_codec.py``), a few times faster.
        What orjson refuses (an integer outside 64 bits, a lone surrogate, a key that is
        not a string) and what ``json`` refuses but orjson would write (a datetime, a
        dataclass) goes to ``json``, which writes or refuses it as it always did.
        """
        try:
            return orjson.dumps(self.cloudevent, option=_PASSTHROUGH).decode()
        except TypeError:  # orjson.JSONEncodeError
            return json.dumps(self.cloudevent, ensure_ascii=False, separators=(",", ":"))


_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def encode(event: Event, topics: Topics,
           now: datetime | None = None) -> OutgoingEvent:
    topic, type_, key, data = _describe(event, topics)
    event_id = derived_id("evt", event.trigger, purpose(event, type_))
    if isinstance(event, CustomerBalanceCredited):
        data = {"id": event_id, **data}
    cloudevent = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": type_,
        "time": (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }
    if key is not None:
        cloudevent["subject"] = key
    return OutgoingEvent(event_id, topic, key, type_, cloudevent)


def purpose(event: Event, type_: str) -> str:
    """What tells the event apart from the trigger's other effects (its id is derived from it).

    A trigger has at most one event of each type, but a credit note requests
    one refund per payment: each ``refund.requested`` is named by its refund id.
    """
    if isinstance(event, RefundRequested):
        return f"{type_}:{event.id}"
    return type_


def _describe(event: Event,
              topics: Topics) -> tuple[str, str, str | None, dict[str, Any]]:
    if isinstance(event, CreditNoteIssued):
        return (topics.credit_note_events, "credit_note.issued", event.invoice_id,
                credit_note_data(event.credit_note, event.invoice))
    if isinstance(event, CreditNoteVoided):
        note = event.credit_note
        return (topics.credit_note_events, "credit_note.voided", note.invoice_id, {
            "id": note.id, "number": note.number, "invoice_id": note.invoice_id,
            "total": note.total, "status": note.status.value,
            "journal": journal_data(note.void_journal),
            "trigger": _trigger(event.trigger), "invoice": _invoice(event.invoice),
        })
    if isinstance(event, CreditNoteRejected):
        return (topics.credit_note_events, "credit_note.rejected", event.invoice_id, {
            "trigger": _trigger(event.trigger), "invoice_id": event.invoice_id,
            "reason": event.reason, "message": event.message,
        })
    if isinstance(event, InvoicePaid):
        return (topics.invoice_events, "invoice.paid", event.invoice_id, {
            "invoice_id": event.invoice_id, "paid_by": "credit_note",
            "credit_note_id": event.credit_note_id, "amount_remaining": 0,
        })
    if isinstance(event, RefundRequested):
        return (topics.refund_requests, "refund.requested", event.invoice_id,
                refund_data(event))
    if isinstance(event, CustomerBalanceCredited):
        return (topics.customer_balance_events, "customer_balance.credited", event.customer_id,
                balance_data(event))
    if isinstance(event, CreditNoteUpdated):
        note = event.credit_note
        return (topics.credit_note_events, "credit_note.updated", note.invoice_id, {
            "id": note.id, "number": note.number, "invoice_id": note.invoice_id,
            "memo": note.memo, "metadata": note.metadata, "trigger": _trigger(event.trigger),
        })
    data = {
        "credit_note_id": event.credit_note_id, "invoice_id": event.invoice_id,
        "refund_id": event.refund_id, "payment_id": event.payment_id, "amount": event.amount,
        "refund_status": event.refund_status.value, "journal": journal_data(event.journal),
        "effective_at": _time(event.effective_at),
    }
    if isinstance(event, CreditNoteRefundSucceeded):
        return (topics.credit_note_events, "credit_note.refund_succeeded", event.invoice_id,
                data)
    return (topics.credit_note_events, "credit_note.refund_failed", event.invoice_id, {
        **data, "failure_reason": event.failure_reason,
        "resettled_to": event.resettled_to.value})


def credit_note_data(note: CreditNote, invoice: InvoiceState | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": note.id, "number": note.number, "invoice_id": note.invoice_id,
        "customer_id": note.customer_id, "currency": note.currency, "status": note.status.value,
        "type": note.type.value, "reason": note.reason.value,
        "subtotal": note.subtotal, "tax": note.tax, "total": note.total,
        "pre_payment_amount": note.pre_payment_amount,
        "post_payment_amount": note.post_payment_amount,
        "refund_amount": note.refund_amount, "credit_amount": note.credit_amount,
        "out_of_band_amount": note.out_of_band_amount,
        "lines": [
            {"invoice_line_id": line.invoice_line_id, "description": line.description,
             "quantity": line.quantity, "unit_amount": line.unit_amount,
             "tax_rate_bps": line.tax_rate_bps, "amount": line.net, "tax": line.tax,
             "total": line.total}
            for line in note.lines
        ],
        "journal": journal_data(note.journal),
        "trigger": _trigger(note.trigger),
        "policy": note.policy, "memo": note.memo, "metadata": note.metadata,
        "effective_at": _time(note.effective_at) if note.effective_at else None,
        "refund_status": note.refund_status.value,
        "refunds": [_refund(refund) for refund in note.refunds],
    }
    if invoice is not None:
        data["invoice"] = _invoice(invoice)
    return data


def refund_data(event: RefundRequested) -> dict[str, Any]:
    return {"id": event.id, "invoice_id": event.invoice_id, "customer_id": event.customer_id,
            "credit_note_id": event.credit_note_id, "payment_id": event.payment_id,
            "amount": event.amount, "currency": event.currency}


def balance_data(event: CustomerBalanceCredited) -> dict[str, Any]:
    """Without ``id`` (the CloudEvent's, added by :func:`encode`); ids that do not apply left out."""
    data: dict[str, Any] = {
        "customer_id": event.customer_id, "currency": event.currency, "amount": event.amount,
        "reason": event.reason.value, "invoice_id": event.invoice_id}
    for name, value in (("credit_note_id", event.credit_note_id),
                        ("refund_id", event.refund_id), ("payment_id", event.payment_id)):
        if value is not None:
            data[name] = value
    return data


def _refund(refund: Refund) -> dict[str, Any]:
    return {"refund_id": refund.refund_id, "payment_id": refund.payment_id,
            "amount": refund.amount, "status": refund.state.value, "linked": refund.linked}


def journal_data(journal: tuple[JournalLine, ...]) -> list[dict[str, Any]]:
    return [{"account": line.account.value, "debit": line.debit, "credit": line.credit}
            for line in journal]


def _trigger(trigger: Trigger) -> dict[str, str]:
    return {"source": trigger.source, "id": trigger.id, "type": trigger.type}


def _time(time: datetime) -> str:
    """RFC 3339 in UTC, ``Z`` (as the envelope's ``time``)."""
    return time.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _invoice(state: InvoiceState) -> dict[str, Any]:
    return {"amount_remaining": state.amount_remaining, "status": state.status}
