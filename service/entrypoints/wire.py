"""Wire models of the messages the service reads (docs/contract.md), as pydantic v2 models.

Strict on purpose: amounts are integers (a float or a numeric string is
refused), payloads refuse unknown fields, and every amount is bounded so that
no sum can overflow a PostgreSQL ``bigint``. A message that does not fit is
dead-lettered as ``invalid_message`` with the reason in words.
The JSON Schemas in ``schemas/`` are generated from these models.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

#: No amount may exceed 10^15 minor units (10 trillion in a two-decimal currency),
#: so that any sum the service makes stays far inside a 64-bit integer.
MAX_AMOUNT = 10**15
MAX_QUANTITY = 10**9
#: What one message may put into the lines of a credit note: the ids and descriptions
#: of an invoice's lines, or of a credit_note.issue's lines, add up to at most this
#: many bytes of JSON text. With the other limits below, every event an accepted
#: message can produce stays under Kafka's default 1 MB (docs: outbox limits;
#: tests/unit/test_event_size_bounds.py builds the largest and measures them).
MAX_LINE_TEXT_BYTES = 200_000


def json_bytes(text: str) -> int:
    """The bytes ``text`` takes inside a JSON string as the service writes it: UTF-8,
    with a quote, backslash or control character counted as its escape."""
    try:
        return len(orjson.dumps(text)) - 2  # the bytes json.dumps(text, ensure_ascii=False) has
    except TypeError:  # a lone surrogate: refused as it always was (UnicodeEncodeError)
        return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def _line_text_bounded(texts: Iterable[str], what: str) -> None:
    if sum(json_bytes(text) for text in texts) > MAX_LINE_TEXT_BYTES:
        raise ValueError(f"the {what} ids and descriptions exceed {MAX_LINE_TEXT_BYTES:,}"
                         " bytes together")

Amount = Annotated[int, Field(strict=True, ge=0, le=MAX_AMOUNT)]
PositiveAmount = Annotated[int, Field(strict=True, gt=0, le=MAX_AMOUNT)]
Quantity = Annotated[int, Field(strict=True, gt=0, le=MAX_QUANTITY)]
TaxRate = Annotated[int, Field(strict=True, ge=0, le=100_000)]
Percent = Annotated[int, Field(strict=True, ge=0, le=10_000)]
Id = Annotated[str, Field(min_length=1, max_length=255)]
Currency = Annotated[str, Field(pattern=r"^[a-z]{3}$")]
Reason = Literal["duplicate", "fraudulent", "order_change", "product_unsatisfactory",
                 "service_credit", "subscription_change", "subscription_cancellation", "other"]
SettlementName = Literal["refund", "customer_balance", "out_of_band"]


def _in_utc_range(moment: datetime) -> datetime:
    """A time whose UTC equivalent exists (9999-12-31T23:59-23:59 does not: year 10000)."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range once converted to UTC") from None
    return moment


_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_text(value: object) -> object:
    """Only an RFC 3339 string with its offset: a JSON number (or a numeric string) would be
    read as epoch seconds or milliseconds, guessed by size, with UTC assumed."""
    if isinstance(value, datetime):  # built in Python, not read from JSON: no guess
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("a time must be an RFC 3339 string with its timezone offset"
                         " (e.g. 2026-10-16T00:00:00Z)")
    return value


#: Every time on input is an RFC 3339 string carrying its UTC offset: a naive time, a
#: number or any other form is refused, never guessed.
Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_in_utc_range)]


def _printable(text: str) -> str:
    """No C0/C1 control characters (newline included): ids are derived by joining with one."""
    if _CONTROL.search(text) is not None:
        raise ValueError("must not contain control characters")
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


#: ``source``, ``id`` and ``type`` of a CloudEvent: the idempotency key and its routing.
Attribute = Annotated[str, AfterValidator(_printable)]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CloudEvent(BaseModel):
    """CloudEvents 1.0 attributes; extension attributes are allowed and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: Annotated[Id, AfterValidator(_printable)]
    source: Annotated[Attribute, Field(min_length=1, max_length=1024)]
    type: Annotated[Attribute, Field(min_length=1, max_length=255)]
    time: Time | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    data: Any = None


class Period(Payload):
    start: Time
    end: Time

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if self.end <= self.start:
            raise ValueError("period end must be after its start")
        return self


class InvoiceLine(Payload):
    id: Id
    description: Annotated[str, Field(max_length=1000)] = ""
    quantity: Quantity
    unit_amount: Amount
    tax_rate_bps: TaxRate = 0
    period: Period | None = None

    @model_validator(mode="after")
    def _bounded(self) -> InvoiceLine:
        if self.quantity * self.unit_amount > MAX_AMOUNT:
            raise ValueError("line amount (quantity x unit_amount) is too large")
        return self


class Discount(Payload):
    percent_off_bps: Percent | None = None
    amount_off: Amount | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Discount:
        if (self.percent_off_bps is None) == (self.amount_off is None):
            raise ValueError("a discount has exactly one of percent_off_bps and amount_off")
        return self


class Invoice(Payload):
    id: Id
    number: Id
    customer_id: Id
    currency: Currency
    status: Literal["open", "paid", "uncollectible"]
    lines: Annotated[list[InvoiceLine], Field(min_length=1, max_length=1000)]
    discounts: Annotated[list[Discount], Field(max_length=20)] = []
    customer_balance_applied: Amount = 0
    #: Absent: 0, or the whole amount due when the invoice arrives ``paid`` (docs/rules.md).
    amount_paid: Amount | None = None
    total: Amount | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Invoice:
        if sum(line.quantity * line.unit_amount for line in self.lines) > MAX_AMOUNT:
            raise ValueError("invoice subtotal is too large")
        _line_text_bounded((text for line in self.lines for text in (line.id, line.description)),
                           "invoice lines'")
        return self


class InvoiceFinalized(Payload):
    invoice: Invoice


class InvoicePaymentSucceeded(Payload):
    invoice_id: Id
    amount: PositiveAmount
    currency: Currency
    #: The payment system's id: a payment is recorded once per id (absent: once per event).
    payment_id: Annotated[Id, AfterValidator(_printable)] | None = None


class InvoiceReference(Payload):
    invoice_id: Id


class InvoiceLineItem(Payload):
    type: Literal["invoice_line_item"]
    invoice_line_id: Id
    quantity: Quantity | None = None
    amount: PositiveAmount | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InvoiceLineItem:
        if (self.quantity is None) == (self.amount is None):
            raise ValueError("an invoice_line_item has exactly one of quantity and amount")
        return self


class CustomLineItem(Payload):
    type: Literal["custom_line_item"]
    description: Annotated[str, Field(min_length=1, max_length=1000)]
    quantity: Quantity
    unit_amount: PositiveAmount
    tax_rate_bps: TaxRate = 0

    @model_validator(mode="after")
    def _bounded(self) -> CustomLineItem:
        if self.quantity * self.unit_amount > MAX_AMOUNT:
            raise ValueError("line amount (quantity x unit_amount) is too large")
        return self


LineItem = Annotated[InvoiceLineItem | CustomLineItem, Field(discriminator="type")]


#: Most refunds one credit_note.issue may link, and the longest failure reason kept.
MAX_LINKED_REFUNDS = 100
MAX_FAILURE_REASON = 500
#: Metadata as issue takes it: at most 50 keys of 40 characters, values of 500.
MetadataKey = Annotated[str, Field(max_length=40)]
MetadataValue = Annotated[str, Field(max_length=500)]
MAX_METADATA_KEYS = 50
Memo = Annotated[str, Field(max_length=5000)]
RefundId = Annotated[Id, AfterValidator(_printable)]


def _not_ours(refund_id: str) -> str:
    """A linked refund id may not start ``rf_``: the service's own refunds' prefix, so
    that it cannot take the id the service derives for a later refund."""
    if refund_id.startswith("rf_"):
        raise ValueError("a linked refund id must not start with rf_ (the service's own ids)")
    return refund_id


def clean_failure_reason(reason: Any) -> Any:
    """A refund's failure reason as kept: control characters (NUL included) replaced by
    U+FFFD, then cut to 500 characters. An outcome is a fact: its reason never refuses it."""
    if not isinstance(reason, str):
        return reason
    cleaned = "".join("\ufffd" if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F else char
                      for char in reason)
    return cleaned[:MAX_FAILURE_REASON]


class LinkedRefund(Payload):
    """A refund already made in the payment system, counted as part of ``refund_amount``."""

    refund_id: Annotated[RefundId, AfterValidator(_not_ours)]
    amount: PositiveAmount


class CreditNoteIssue(Payload):
    invoice_id: Id
    amount: PositiveAmount | None = None
    lines: Annotated[list[LineItem], Field(min_length=1, max_length=1000)] | None = None
    refund_amount: Amount | None = None
    credit_amount: Amount | None = None
    out_of_band_amount: Amount | None = None
    currency: Currency | None = None
    refunds: Annotated[list[LinkedRefund], Field(max_length=MAX_LINKED_REFUNDS)] = []
    reason: Reason = "other"
    memo: Memo | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)] = {}
    #: The accounting date (absent: the event's ``time``, else when it is processed).
    effective_at: Time | None = None

    @model_validator(mode="after")
    def _amount_or_lines(self) -> CreditNoteIssue:
        if (self.amount is None) == (self.lines is None):
            raise ValueError("credit_note.issue needs exactly one of amount and lines")
        refund_ids = [refund.refund_id for refund in self.refunds]
        if len(set(refund_ids)) != len(refund_ids):
            raise ValueError("a refund id may be linked only once in a credit note")
        if sum(refund.amount for refund in self.refunds) > MAX_AMOUNT:
            raise ValueError("the linked refunds are too large together")
        _line_text_bounded((line.invoice_line_id if isinstance(line, InvoiceLineItem)
                            else line.description for line in self.lines or ()), "lines'")
        return self


class CreditNoteVoid(Payload):
    credit_note_id: Id


class CreditNoteUpdate(Payload):
    """``memo`` (null clears it) and/or ``metadata`` (merged key by key; null removes a key).

    A field left out is left as it is; at least one of the two is given.
    """

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["memo"]},
                                                           {"required": ["metadata"]}]})

    credit_note_id: Id
    memo: Memo | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue | None],
                        Field(max_length=MAX_METADATA_KEYS)] | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _something_to_change(self) -> CreditNoteUpdate:
        if not {"memo", "metadata"} & self.model_fields_set:
            raise ValueError("credit_note.update needs memo or metadata (or both)")
        if "metadata" in self.model_fields_set and self.metadata is None:
            raise ValueError("metadata is an object (a key set to null is removed)")
        return self

    @property
    def memo_set(self) -> bool:
        """Whether the message says what the memo becomes (``null``: none)."""
        return "memo" in self.model_fields_set


class RefundOutcome(Payload):
    """``refund.succeeded`` / ``refund.failed`` on ``refund-results``."""

    refund_id: RefundId
    invoice_id: Id
    #: Kept on a failure (ignored on a success); never logged.
    failure_reason: Annotated[str, BeforeValidator(clean_failure_reason),
                              Field(max_length=MAX_FAILURE_REASON)] | None = None


# Upstream triggers (issue #3): each becomes a credit_note.issue-like command.


class ReturnedLine(Payload):
    invoice_line_id: Id
    quantity: Quantity


class ReturnReceived(Payload):
    invoice_id: Id
    return_id: Id
    lines: Annotated[list[ReturnedLine], Field(min_length=1, max_length=1000)]
    reason: Reason | None = None
    settlement: SettlementName | None = None


class SlaBreached(Payload):
    invoice_id: Id
    sla_id: Id
    credit_bps: Annotated[int, Field(strict=True, gt=0, le=10_000)] | None = None
    credit_amount: PositiveAmount | None = None
    currency: Currency | None = None
    settlement: SettlementName | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SlaBreached:
        if (self.credit_bps is None) == (self.credit_amount is None):
            raise ValueError("sla.breached needs exactly one of credit_bps and credit_amount")
        return self


class SubscriptionDowngraded(Payload):
    invoice_id: Id
    invoice_line_id: Id
    effective_at: Time
    settlement: SettlementName | None = None


class SubscriptionCanceled(Payload):
    invoice_id: Id
    invoice_line_id: Id
    canceled_at: Time
    settlement: SettlementName | None = None


def _names() -> tuple[frozenset[str], frozenset[str]]:
    """Every field name and discriminator tag of the models above, and the dictionary fields.

    Error paths keep these (they come from the schema) and replace anything
    else (a dictionary key, an unknown field: they come from the message).
    """
    names: set[str] = set()
    dictionaries: set[str] = set()
    for model in [value for value in globals().values()
                  if isinstance(value, type) and issubclass(value, BaseModel)]:
        for name, field in model.model_fields.items():
            names.add(name)
            if "dict[" in str(field.annotation):
                dictionaries.add(name)
            if name == "type" and field.annotation is not None:
                names.update(arg for arg in getattr(field.annotation, "__args__", ())
                             if isinstance(arg, str))
    return frozenset(names), frozenset(dictionaries)


FIELD_NAMES, DICTIONARY_FIELDS = _names()
