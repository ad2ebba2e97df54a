"""Generate the JSON Schemas of every message type on the contract's topics (docs/contract.md).

Writes ``schemas/json/<type>.json``, one JSON Schema (draft 2020-12) per CloudEvent
``type``, each covering the whole structured-mode CloudEvent: the envelope and its
``data``.

- Inputs are generated from the pydantic models the service parses them with
  (:mod:`service.entrypoints.wire`). Rules that span fields (``exactly one of
  amount and lines``, a period's end after its start, ...) live in model
  validators and cannot be said in JSON Schema; the service still enforces them.
- Outputs are described by the models below, which say what
  :mod:`service.adapters.event_codec` emits: money as integers, every field
  docs/contract.md promises required, ``null`` allowed where the code can emit
  ``None``. Fields the code emits beyond docs/contract.md's promise are described
  but not required, and further fields are allowed: docs/contract.md promises
  "at least" these fields, so consumers must ignore what they do not know.

It also writes ``schemas/asyncapi.json``, the AsyncAPI 3.0 document FastStream
generates for the same models (``schemas/asyncapi.py``), ``schemas/console-openapi.json``,
the OpenAPI document of the console's HTTP API (built from its FastAPI app, as served
at ``/api/v1/openapi.json``), and the examples of the
output types, ``schemas/examples/<type>.json``,
by running the real code: the hand-written input examples in the same folder are
translated into domain commands, applied with the domain and encoded with
``event_codec.encode``. So the output examples are exactly what the service
publishes for those inputs.

Usage (from the repository root)::

    .venv/bin/python -m schemas.generate           # write the files
    .venv/bin/python -m schemas.generate --check   # exit 1 if a checked-in file is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from schemas import asyncapi
from service.adapters import event_codec
from service.domain import errors, issuing
from service.domain.commands import (
    Command,
    FinalizeInvoice,
    InvoiceLineByQuantity,
    IssueCreditNote,
    RecordPayment,
    RecordRefundOutcome,
    Trigger,
    UpdateCreditNote,
    VoidCreditNote,
    VoidInvoice,
)
from service.domain.credit_note import Account, CreditNoteType, Reason
from service.domain.events import (
    CreditNoteRefundSucceeded,
    CreditNoteRejected,
    CreditNoteVoided,
    Event,
)
from service.domain.invoice import Invoice, InvoiceStatus, finalize_invoice
from service.domain.refunds import RefundState
from service.entrypoints import translators, wire
from service.settings import Settings, Topics

HERE = Path(__file__).resolve().parent
SCHEMA_DIR = HERE / "json"
EXAMPLES_DIR = HERE / "examples"
ASYNCAPI = HERE / "asyncapi.json"
#: The console's HTTP API (``creditnotes console``; docs/api.md).
CONSOLE_OPENAPI = HERE / "console-openapi.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
TOPICS = Topics()

# --- inputs: the wire models, one envelope per type -----------------------------------------


class InvoiceFinalizedEvent(wire.CloudEvent):
    """An invoice was finalized upstream; the service keeps its priced lines (topic `invoices`)."""

    type: Literal["invoice.finalized"]
    data: wire.InvoiceFinalized


class InvoicePaymentSucceededEvent(wire.CloudEvent):
    """A payment was collected on an invoice (topic `invoices`)."""

    type: Literal["invoice.payment_succeeded"]
    data: wire.InvoicePaymentSucceeded


class InvoiceVoidedEvent(wire.CloudEvent):
    """An invoice was voided upstream (topic `invoices`)."""

    type: Literal["invoice.voided"]
    data: wire.InvoiceReference


class InvoiceMarkedUncollectibleEvent(wire.CloudEvent):
    """An invoice was marked uncollectible upstream (topic `invoices`)."""

    type: Literal["invoice.marked_uncollectible"]
    data: wire.InvoiceReference


class CreditNoteIssueCommand(wire.CloudEvent):
    """Issue a credit note: exactly one of `amount` (gross, line-less) and `lines`.

    `refund_amount`, `credit_amount` and `out_of_band_amount` split the
    post-payment part; without them it all goes to the customer balance.
    Topic `credit-note-commands`.
    """

    type: Literal["credit_note.issue"]
    data: wire.CreditNoteIssue


class CreditNoteVoidCommand(wire.CloudEvent):
    """Void a credit note (only a wholly pre-payment one of an open invoice).

    Topic `credit-note-commands`.
    """

    type: Literal["credit_note.void"]
    data: wire.CreditNoteVoid


class CreditNoteUpdateCommand(wire.CloudEvent):
    """Change a credit note's `memo` (null clears it) and/or `metadata` (merged key by key;
    a key set to null is removed), the only things that change after issue; void credit
    notes included. At least one of the two. Topic `credit-note-commands`.
    """

    type: Literal["credit_note.update"]
    data: wire.CreditNoteUpdate


class RefundSucceededEvent(wire.CloudEvent):
    """The payment system paid a refund out (topic `refund-results`). An outcome is final: the
    same again has no effect, the opposite is dead-lettered `refund_state_conflict`; a refund
    not known (yet) is waited for, then dead-lettered `refund_not_found`."""

    type: Literal["refund.succeeded"]
    data: wire.RefundOutcome


class RefundFailedEvent(wire.CloudEvent):
    """The payment system could not pay a refund out (topic `refund-results`): its payment's
    refundable cash is restored and the amount settled again as
    `CREDITNOTES_REFUND_FAILURE_SETTLEMENT` says. `failure_reason` is optional."""

    type: Literal["refund.failed"]
    data: wire.RefundOutcome


class ReturnReceivedEvent(wire.CloudEvent):
    """Goods were returned: the returned quantities of invoice lines are credited, capped at
    what is left (topic `returns`). Settlement defaults to `refund`."""

    type: Literal["return.received"]
    data: wire.ReturnReceived


class SlaBreachedEvent(wire.CloudEvent):
    """An SLA was breached: a service credit of exactly one of `credit_bps` (of the invoice
    total) and `credit_amount` (topic `sla-breaches`). Settlement defaults to
    `customer_balance`."""

    type: Literal["sla.breached"]
    data: wire.SlaBreached


class SubscriptionDowngradedEvent(wire.CloudEvent):
    """A subscription was downgraded: the unused time of the line's service period is credited
    (topic `downgrades`). Settlement defaults to `customer_balance`."""

    type: Literal["subscription.downgraded"]
    data: wire.SubscriptionDowngraded


class SubscriptionCanceledEvent(wire.CloudEvent):
    """A subscription was canceled: the unused part of the prepaid term is credited
    (topic `cancellations`). Settlement defaults to `refund`."""

    type: Literal["subscription.canceled"]
    data: wire.SubscriptionCanceled


# --- outputs: what event_codec emits --------------------------------------------------------

Amount = Annotated[int, Field(strict=True, ge=0)]
PositiveAmount = Annotated[int, Field(strict=True, gt=0)]
Id = Annotated[str, Field(min_length=1)]
Currency = Annotated[str, Field(pattern=r"^[a-z]{3}$")]


def _no_default(schema: dict[str, Any]) -> None:
    """An optional attribute that is left out when absent, never sent as `null`."""
    schema.pop("default", None)


def _not_promised(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    schema["description"] = (schema.get("description", "") + " Always emitted, but not part of "
                             "the contract's promise (docs/contract.md).").strip()


class OutputTrigger(BaseModel):
    """The upstream event or command that caused this event (its `source`, `id` and `type`)."""

    source: Id
    id: Id
    type: Id


class JournalLine(BaseModel):
    """One journal line, in minor units: one of `debit` and `credit` is zero."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"debit": {"const": 0}}},
        {"properties": {"credit": {"const": 0}}},
    ]})

    account: Account
    debit: Amount
    credit: Amount


class InvoiceAfter(BaseModel):
    """The invoice as it stands after this event."""

    amount_remaining: Amount
    status: InvoiceStatus


class CreditNoteLine(BaseModel):
    """A credited line: of an invoice line (`invoice_line_id`) or a custom line (`null`).

    `quantity` and `unit_amount` are `null` when the line was credited by
    amount (or scaled down to what the invoice had left).
    """

    invoice_line_id: Id | None
    description: str
    quantity: PositiveAmount | None
    unit_amount: Amount | None
    tax_rate_bps: Amount
    amount: Amount = Field(description="Net: after the line's discount share, before tax.")
    tax: Amount
    total: Amount


Journal = Annotated[list[JournalLine], Field(min_length=2)]
RefundStatusName = Literal["none", "pending", "succeeded", "failed", "partially_failed"]
Metadata = dict[str, str]


class CreditNoteRefund(BaseModel):
    """One refund of the credit note, on one payment: linked (made in the payment system
    before, `succeeded`) or requested (`refund.requested`, `pending` until its outcome)."""

    refund_id: Id
    payment_id: Id | None = Field(description="null: the payment recorded at finalization "
                                              "(or one without an id).")
    amount: PositiveAmount
    status: Literal["pending", "succeeded", "failed"]
    linked: bool


class CreditNoteIssuedData(BaseModel):
    """The whole credit note. `total = subtotal + tax = pre_payment_amount + post_payment_amount`
    and `post_payment_amount = refund_amount + credit_amount + out_of_band_amount`; its
    journal balances (debits equal credits)."""

    id: Id
    number: Id
    invoice_id: Id
    customer_id: Id
    currency: Currency
    type: CreditNoteType
    reason: Reason
    subtotal: Amount
    tax: Amount
    total: PositiveAmount
    pre_payment_amount: Amount
    post_payment_amount: Amount
    refund_amount: Amount
    credit_amount: Amount
    out_of_band_amount: Amount
    lines: Annotated[list[CreditNoteLine], Field(min_length=1)]
    journal: Journal
    trigger: OutputTrigger
    invoice: InvoiceAfter
    effective_at: datetime = Field(description="The accounting date of the credit note and its "
                                               "journal.")
    refund_status: RefundStatusName
    refunds: list[CreditNoteRefund] = Field(description="Linked refunds first, then the "
                                                        "requested ones, newest payment first.")
    memo: str | None
    metadata: Metadata
    status: Literal["issued"] = Field(default="issued", json_schema_extra=_not_promised)
    policy: str | None = Field(
        default=None, json_schema_extra=_not_promised,
        description="Which policy allowed an upstream trigger's credit; null for explicit commands.")


class CreditNoteVoidedData(BaseModel):
    """A credit note was voided (it keeps its number); `journal` is the exact reversal."""

    id: Id
    number: Id
    invoice_id: Id
    total: PositiveAmount
    journal: Journal
    invoice: InvoiceAfter
    status: Literal["void"] = Field(default="void", json_schema_extra=_not_promised)
    trigger: OutputTrigger | SkipJsonSchema[None] = Field(default=None,
                                                          json_schema_extra=_not_promised)


class CreditNoteRejectedData(BaseModel):
    """A request was refused by a business rule; nothing changed."""

    trigger: OutputTrigger
    invoice_id: Id | None = Field(description="null when the invoice is not known (a void of an "
                                              "unknown credit note).")
    reason: str = Field(pattern=r"^[a-z][a-z_]*$", examples=[
        "exceeds_creditable_amount", "invoice_void", "nothing_left_to_credit", "currency_mismatch",
        "not_voidable", "already_void", "settlement_not_allowed"], description="A machine code.")
    message: str = Field(description="What is wrong, in words; never payload or personal data.")


class InvoicePaidData(BaseModel):
    """A credit note brought the invoice's amount remaining to zero."""

    invoice_id: Id
    paid_by: Literal["credit_note"]
    credit_note_id: Id
    amount_remaining: Literal[0]


class RefundRequestedData(BaseModel):
    """Cash to pay back to the customer: one per payment a credit note's refund part touches
    (newest payment first). `id` is the refund id, the same after a crash or redelivery; the
    outcome comes back on `refund-results`."""

    id: Id = Field(description="The refund id.")
    invoice_id: Id
    customer_id: Id
    credit_note_id: Id
    payment_id: Id | None = Field(description="The payment to refund; null: the payment "
                                              "recorded at finalization.")
    amount: PositiveAmount
    currency: Currency


class RefundOutcomeData(BaseModel):
    """A refund's outcome applied; `refund_status` is its credit note's after it."""

    credit_note_id: Id
    invoice_id: Id
    refund_id: Id
    payment_id: Id | None
    amount: PositiveAmount
    refund_status: RefundStatusName
    effective_at: datetime = Field(json_schema_extra=_not_promised,
                                   description="The date of the journal: the outcome's time.")


class CreditNoteRefundSucceededData(RefundOutcomeData):
    """The refund was paid out: journal debit `refunds_payable`, credit `cash`."""

    journal: Journal


class CreditNoteRefundFailedData(RefundOutcomeData):
    """The refund failed: the payment's refundable cash is restored and the amount settled
    again as `resettled_to` says: `customer_balance` (journal debit `refunds_payable`, credit
    `customer_credit_balance`, and a `customer_balance.credited`) or `none` (no journal: it
    stays in `refunds_payable` for a person to settle)."""

    journal: list[JournalLine]
    failure_reason: str | None
    resettled_to: Literal["customer_balance", "none"]


class CreditNoteUpdatedData(BaseModel):
    """A credit note's memo and/or metadata changed; both as they stand after it."""

    id: Id
    number: Id
    invoice_id: Id
    memo: str | None
    metadata: Metadata
    trigger: OutputTrigger | SkipJsonSchema[None] = Field(default=None,
                                                          json_schema_extra=_not_promised)


class CustomerBalanceCreditedData(BaseModel):
    """An amount sent to the customer's credit balance, once: a credit note's `credit_amount`
    (`credit_note`), a failed refund settled to the balance (`refund_failed`), or the part of a
    payment beyond what the invoice had left (`overpayment`). `credit_note_id`, `refund_id`
    and `payment_id` are present where they apply, else left out."""

    id: Id = Field(description="Stable: the CloudEvent's id.")
    customer_id: Id
    currency: Currency
    amount: PositiveAmount
    reason: Literal["credit_note", "refund_failed", "overpayment"]
    invoice_id: Id
    credit_note_id: Id | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)
    refund_id: Id | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)
    payment_id: Id | SkipJsonSchema[None] = Field(default=None, json_schema_extra=_no_default)


class OutputEvent(BaseModel):
    """A CloudEvents 1.0 event in structured JSON mode, published by the credit-notes service."""

    specversion: Literal["1.0"]
    id: Id = Field(description="Stable: the same effect published again carries the same id.")
    source: Literal["/credit-notes"]
    time: datetime
    datacontenttype: Literal["application/json"]
    subject: str | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default,
        description="The Kafka record key: the invoice id; absent when the invoice is not known.")


class CreditNoteIssuedEvent(OutputEvent):
    """A credit note was issued (topic `credit-note-events`)."""

    type: Literal["credit_note.issued"]
    data: CreditNoteIssuedData


class CreditNoteVoidedEvent(OutputEvent):
    """A credit note was voided (topic `credit-note-events`)."""

    type: Literal["credit_note.voided"]
    data: CreditNoteVoidedData


class CreditNoteRejectedEvent(OutputEvent):
    """A credit note request or trigger was refused (topic `credit-note-events`)."""

    type: Literal["credit_note.rejected"]
    data: CreditNoteRejectedData


class InvoicePaidEvent(OutputEvent):
    """An invoice became paid through a credit note (topic `invoice-events`)."""

    type: Literal["invoice.paid"]
    data: InvoicePaidData


class RefundRequestedEvent(OutputEvent):
    """A refund is to be paid out (topic `refund-requests`)."""

    type: Literal["refund.requested"]
    data: RefundRequestedData


class CreditNoteRefundSucceededEvent(OutputEvent):
    """A refund of a credit note succeeded (topic `credit-note-events`)."""

    type: Literal["credit_note.refund_succeeded"]
    data: CreditNoteRefundSucceededData


class CreditNoteRefundFailedEvent(OutputEvent):
    """A refund of a credit note failed (topic `credit-note-events`)."""

    type: Literal["credit_note.refund_failed"]
    data: CreditNoteRefundFailedData


class CreditNoteUpdatedEvent(OutputEvent):
    """A credit note's memo or metadata changed (topic `credit-note-events`)."""

    type: Literal["credit_note.updated"]
    data: CreditNoteUpdatedData


class CustomerBalanceCreditedEvent(OutputEvent):
    """An amount went to a customer's credit balance (topic `customer-balance-events`, keyed
    by customer id, in order per customer)."""

    type: Literal["customer_balance.credited"]
    subject: str | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default,
        description="The Kafka record key: the customer id.")
    data: CustomerBalanceCreditedData


#: type -> (topic, model); the topics are docs/contract.md's default names.
INPUTS: dict[str, tuple[str, type[BaseModel]]] = {
    "invoice.finalized": (TOPICS.invoices, InvoiceFinalizedEvent),
    "invoice.payment_succeeded": (TOPICS.invoices, InvoicePaymentSucceededEvent),
    "invoice.voided": (TOPICS.invoices, InvoiceVoidedEvent),
    "invoice.marked_uncollectible": (TOPICS.invoices, InvoiceMarkedUncollectibleEvent),
    "credit_note.issue": (TOPICS.credit_note_commands, CreditNoteIssueCommand),
    "credit_note.void": (TOPICS.credit_note_commands, CreditNoteVoidCommand),
    "credit_note.update": (TOPICS.credit_note_commands, CreditNoteUpdateCommand),
    "refund.succeeded": (TOPICS.refund_results, RefundSucceededEvent),
    "refund.failed": (TOPICS.refund_results, RefundFailedEvent),
    "return.received": (TOPICS.returns, ReturnReceivedEvent),
    "sla.breached": (TOPICS.sla_breaches, SlaBreachedEvent),
    "subscription.downgraded": (TOPICS.downgrades, SubscriptionDowngradedEvent),
    "subscription.canceled": (TOPICS.cancellations, SubscriptionCanceledEvent),
}
OUTPUTS: dict[str, tuple[str, type[BaseModel]]] = {
    "credit_note.issued": (TOPICS.credit_note_events, CreditNoteIssuedEvent),
    "credit_note.voided": (TOPICS.credit_note_events, CreditNoteVoidedEvent),
    "credit_note.rejected": (TOPICS.credit_note_events, CreditNoteRejectedEvent),
    "invoice.paid": (TOPICS.invoice_events, InvoicePaidEvent),
    "refund.requested": (TOPICS.refund_requests, RefundRequestedEvent),
    "credit_note.refund_succeeded": (TOPICS.credit_note_events, CreditNoteRefundSucceededEvent),
    "credit_note.refund_failed": (TOPICS.credit_note_events, CreditNoteRefundFailedEvent),
    "credit_note.updated": (TOPICS.credit_note_events, CreditNoteUpdatedEvent),
    "customer_balance.credited": (TOPICS.customer_balance_events, CustomerBalanceCreditedEvent),
}
MESSAGES = {**INPUTS, **OUTPUTS}


def schema_for(type_: str) -> dict[str, Any]:
    """The JSON Schema of one message type, as written to ``schemas/json/<type>.json``."""
    topic, model = MESSAGES[type_]
    direction = "read" if type_ in INPUTS else "written"
    generated = model.model_json_schema()
    generated.pop("title", None)
    return {
        "$schema": DIALECT,
        "$comment": "Generated by schemas/generate.py; do not edit by hand.",
        "title": type_,
        "x-topic": topic,
        "x-direction": direction,
        **generated,
    }


def schemas() -> dict[str, dict[str, Any]]:
    return {type_: schema_for(type_) for type_ in MESSAGES}


# --- output examples, produced by the real code -------------------------------------------

#: The ``time`` of the generated output examples (the codec stamps the current time).
EXAMPLE_TIME = datetime(2026, 11, 21, 10, 5, tzinfo=UTC)
#: The command that issues the credit note voided in ``examples/credit_note.void.json``.
VOIDED_NOTE_TRIGGER = Trigger(source="/support/console", id="cmd-7f39", type="credit_note.issue")
#: The command that issues the credit note whose refund ``examples/refund.succeeded.json`` pays.
REFUNDED_NOTE_TRIGGER = Trigger(source="/support/console", id="cmd-7f3c", type="credit_note.issue",
                                time=datetime(2026, 11, 21, 10, 3, tzinfo=UTC))

C = TypeVar("C", bound=Command)


def input_example(type_: str) -> dict[str, Any]:
    """A hand-written input example, as checked in."""
    loaded: dict[str, Any] = json.loads((EXAMPLES_DIR / f"{type_}.json").read_text("utf-8"))
    return loaded


#: The translators of the input examples the stories below use (failed refunds go to the
#: customer balance: the setting's default).
_TRANSLATORS: dict[str, translators.Translator] = {
    "invoice.finalized": translators.finalized,
    "invoice.payment_succeeded": translators.payment_succeeded,
    "invoice.voided": translators.voided,
    "credit_note.issue": translators.issue,
    "credit_note.void": translators.void,
    "credit_note.update": translators.update,
    "refund.succeeded": partial(translators.refund_outcome, outcome=RefundState.SUCCEEDED),
    "refund.failed": partial(translators.refund_outcome, outcome=RefundState.FAILED),
}


def _command(type_: str, kind: type[C]) -> C:
    """The domain command the service makes of the input example of ``type_``."""
    event = translators.parse(wire.CloudEvent, input_example(type_), "CloudEvent")
    command = _TRANSLATORS[type_](event, Trigger(event.source, event.id, event.type, event.time))
    if not isinstance(command, kind):
        raise TypeError(f"{type_} translates to {type(command).__name__}, not {kind.__name__}")
    return command


def _finalized() -> Invoice:
    return finalize_invoice(_command("invoice.finalized", FinalizeInvoice))


def _paid_in_part() -> Invoice:
    """The example invoice with the example payment received."""
    invoice = _finalized()
    payment = _command("invoice.payment_succeeded", RecordPayment)
    invoice.receive_payment(payment.payment_id, payment.amount, payment.currency, payment.trigger)
    return invoice


def _settle(invoice: Invoice, type_: str) -> None:
    outcome = _command(type_, RecordRefundOutcome)
    invoice.settle_refund(outcome.refund_id, outcome.outcome, outcome.trigger,
                          failure_reason=outcome.failure_reason,
                          settlement=outcome.failure_settlement,
                          now=outcome.trigger.time or EXAMPLE_TIME)  # processed as it arrives


def example_events() -> list[Event]:
    """The domain events of four short stories told with the input examples."""
    # 1. Paid in part, then six widgets credited: pre- and post-payment, the rest refunded;
    #    the credit note's memo and metadata updated; its refund fails (to the balance).
    invoice = _paid_in_part()
    note = issuing.issue_credit_note(invoice, _command("credit_note.issue", IssueCreditNote),
                                     now=EXAMPLE_TIME)
    update = _command("credit_note.update", UpdateCreditNote)
    if update.credit_note_id != note.id:
        raise ValueError(f"examples/credit_note.update.json must update credit note {note.id!r}")
    invoice.update_credit_note(note, update.trigger, memo=update.memo,
                               memo_set=update.memo_set, metadata_patch=update.metadata_patch)
    _settle(invoice, "refund.failed")
    events = list(invoice.events)

    # 2. One widget credited on the open invoice, then that credit note voided.
    invoice = _finalized()
    note = issuing.issue_credit_note(invoice, IssueCreditNote(
        trigger=VOIDED_NOTE_TRIGGER, invoice_id=invoice.id, reason="order_change",
        lines=(InvoiceLineByQuantity(invoice.lines[0].id, 1),)), now=EXAMPLE_TIME)
    void = _command("credit_note.void", VoidCreditNote)
    if void.credit_note_id != note.id:
        raise ValueError(f"examples/credit_note.void.json must void credit note {note.id!r}")
    issuing.void_credit_note(invoice, note, void, now=EXAMPLE_TIME)
    events += [event for event in invoice.events if isinstance(event, CreditNoteVoided)]

    # 3. The invoice voided upstream, then the credit note of story 1 refused (as handlers do).
    invoice = _finalized()
    if _command("invoice.voided", VoidInvoice).invoice_id != invoice.id:
        raise ValueError("examples/invoice.voided.json must void the example invoice")
    invoice.void()
    issue = _command("credit_note.issue", IssueCreditNote)
    try:
        issuing.issue_credit_note(invoice, issue, now=EXAMPLE_TIME)
    except errors.Rejection as rejection:
        events.append(CreditNoteRejected(trigger=issue.trigger, invoice_id=issue.invoice_id,
                                         reason=rejection.code, message=rejection.message))
    else:
        raise ValueError("a credit note on a void invoice was not refused")

    # 4. Story 1's credit again under another command, and this time its refund succeeds.
    invoice = _paid_in_part()
    issuing.issue_credit_note(invoice, dataclasses.replace(issue, trigger=REFUNDED_NOTE_TRIGGER),
                              now=EXAMPLE_TIME)
    _settle(invoice, "refund.succeeded")
    events += [event for event in invoice.events if isinstance(event, CreditNoteRefundSucceeded)]
    return events


def output_examples() -> dict[str, dict[str, Any]]:
    encoded = [event_codec.encode(event, TOPICS, now=EXAMPLE_TIME) for event in example_events()]
    examples = {outgoing.type: outgoing.cloudevent for outgoing in encoded}
    if sorted(examples) != sorted(OUTPUTS) or len(encoded) != len(OUTPUTS):
        raise ValueError(f"the example stories give {[e.type for e in encoded]}, one of each of "
                         f"{sorted(OUTPUTS)} expected")
    return examples


# --- files ----------------------------------------------------------------------------------


def render(document: dict[str, Any], sort_keys: bool = False) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"


def generated_files() -> dict[Path, str]:
    """Every file this module writes, with its content."""
    files = {SCHEMA_DIR / f"{type_}.json": render(schema) for type_, schema in schemas().items()}
    files.update({EXAMPLES_DIR / f"{type_}.json": render(example)
                  for type_, example in output_examples().items()})
    version = Settings.model_fields["service_version"].default
    files[ASYNCAPI] = render(asyncapi.document(INPUTS, OUTPUTS, version), sort_keys=True)
    files[CONSOLE_OPENAPI] = render(console_openapi(), sort_keys=True)
    return files


def console_openapi() -> dict[str, Any]:
    """The OpenAPI document of the console's JSON API, as the console serves it at
    ``/api/v1/openapi.json`` (built from the app itself, with the default settings)."""
    from service.entrypoints.console.app import create_app
    from service.entrypoints.console.auth import Authenticator
    from service.entrypoints.console.deps import ConsoleDeps

    settings = Settings.model_construct()
    deps = ConsoleDeps(settings=settings, pool=cast(Any, None), producer=cast(Any, None),
                       auth=Authenticator(settings, secret=b"openapi"))
    document: dict[str, Any] = create_app(deps).openapi()
    return document


def stale_files() -> list[str]:
    """Files that differ from what would be generated, are missing, or should not be there."""
    expected = generated_files()
    stale = [str(path.relative_to(HERE.parent)) for path, text in expected.items()
             if not path.is_file() or path.read_text("utf-8") != text]
    stale += [str(path.relative_to(HERE.parent)) for path in sorted(SCHEMA_DIR.glob("*.json"))
              if path not in expected]
    return sorted(stale)


def write() -> list[Path]:
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    expected = generated_files()
    for path in SCHEMA_DIR.glob("*.json"):
        if path not in expected:
            path.unlink()
    written = []
    for path, text in expected.items():
        if not path.is_file() or path.read_text("utf-8") != text:
            path.write_text(text, "utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a checked-in file differs from the generated one")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        if stale:
            print("run `python -m schemas.generate` and commit the result", file=sys.stderr)
            return 1
        print(f"{len(MESSAGES)} schemas and {len(OUTPUTS)} output examples are up to date")
        return 0
    written = write()
    for path in written:
        print(f"wrote {path.relative_to(HERE.parent)}")
    if not written:
        print("nothing to write: everything is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
