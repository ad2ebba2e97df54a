"""Pure translation: a CloudEvent read from a topic becomes a domain command.

One function per message type, registered per topic in :data:`TRANSLATORS`.
Parsing is strict (see :mod:`wire`); anything that does not fit raises
``InvalidMessage`` or ``UnsupportedType`` with a reason that names the field,
never its value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import orjson
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
    OnExcess,
    RecordPayment,
    RecordRefundOutcome,
    ServicePeriod,
    Settlement,
    SettlementSplit,
    Trigger,
    UnusedTime,
    UpdateCreditNote,
    VoidCreditNote,
    VoidInvoice,
)
from service.domain.refunds import FailureSettlement, LinkedRefund, RefundState
from service.entrypoints import wire
from service.headers import Header
from service.settings import SETTLEMENTS, Settings

Model = TypeVar("Model", bound=BaseModel)
Translator = Callable[[wire.CloudEvent, Trigger], Command]


def decode_envelope(value: bytes | None, headers: Sequence[Header]) -> wire.CloudEvent:
    """A CloudEvent from a Kafka record, in structured or binary content mode."""
    if value is None:
        raise errors.InvalidMessage("the record has no value")
    body = load_json(value)
    try:
        attributes = {name[3:]: raw.decode("utf-8") for name, raw in headers
                      if name.startswith("ce_")}
    except UnicodeDecodeError:
        raise errors.InvalidMessage("a ce_ header is not valid UTF-8") from None
    _clean_failure_reason(body, attributes)
    # a NUL in parsed JSON can only come from a \u0000 escape (a raw one is not JSON)
    if ((b"\\u0000" in value and _has_nul(body))
            or any("\x00" in text for text in attributes.values())):
        # PostgreSQL text cannot hold NUL; refusing it here keeps the partition flowing
        raise errors.InvalidMessage("text must not contain NUL characters")
    if attributes:  # binary mode: attributes in ce_* headers, the value is the data
        return parse(wire.CloudEvent, {**attributes, "data": body}, "CloudEvent")
    if not isinstance(body, dict):
        raise errors.InvalidMessage("the record value is not a CloudEvent object")
    return parse(wire.CloudEvent, body, "CloudEvent")


def load_json(value: bytes) -> Any:
    """The record value parsed as JSON: orjson, with Python's ``json`` wherever they could differ.

    orjson accepts only strict JSON in valid UTF-8 (no NaN or Infinity, no lone
    surrogate escape, at most 1,024 levels), a subset of what ``json.loads`` takes
    here, and gives the same values, but for integers outside 64 bits, which it
    reads as floats: a run of 19 digits sends the value to ``json.loads`` (so does
    anything orjson refuses), which decides and words the refusal as it always
    did. ``tests/unit/test_fast_codec.py`` checks both give the same.
    """
    if _LONG_DIGITS.search(value) is None:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidMessage("the record value is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError:  # JSONDecodeError, NaN/Infinity, an integer of more than 4,300 digits
        raise errors.InvalidMessage("the record value is not JSON") from None
    except RecursionError:
        raise errors.InvalidMessage("the record value is nested too deeply") from None


#: An integer orjson would read as a float has 19 digits at least (past -2**63 or 2**64 - 1).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _clean_failure_reason(body: Any, attributes: dict[str, str]) -> None:
    """An outcome's ``data.failure_reason`` cleaned in place before the NUL check (a
    fact is never refused for its reason): the only field where NUL is replaced, not refused."""
    kind = attributes.get("type") if attributes else (
        body.get("type") if isinstance(body, dict) else None)
    if kind not in ("refund.failed", "refund.succeeded"):
        return
    data = body if attributes else body.get("data")
    if isinstance(data, dict) and isinstance(data.get("failure_reason"), str):
        data["failure_reason"] = wire.clean_failure_reason(data["failure_reason"])


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (Python's parser accepts them)."""
    raise ValueError(f"{name} is not JSON")


def _has_nul(value: Any) -> bool:
    """Whether any string (key or value) in a parsed JSON document holds a NUL character."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse(model: type[Model], data: Any, what: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise errors.InvalidMessage(f"invalid {what}: {describe(error)}") from None
    except (ValueError, TypeError, ArithmeticError, RecursionError) as error:
        # a validator that failed in an unexpected way: still the message's fault
        raise errors.InvalidMessage(f"invalid {what}: a validator raised {type(error).__name__}",
                                    cause=error) from None


def describe(error: ValidationError) -> str:
    """Field paths and what is wrong with them, without the offending values.

    Neither the values nor the keys of the message appear: a dictionary key
    (a metadata key may be an e-mail address) or an unknown field's name in
    the path becomes a placeholder, and a message that would quote the input
    (an unknown discriminator tag) is replaced by one that does not.
    """
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(_safe_location(item["loc"], item["type"])) or "message"
        problems.append(f"{where}: {_safe_text(item)}")
    return "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")


def first_field(error: ValidationError) -> str | None:
    """The path of the first field a validation error names, as :func:`describe` words it
    (``lines.0.quantity``; a key that came from the message is ``<key>``), or None when the
    error is the whole message's."""
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(part for part in _safe_location(item["loc"], item["type"])
                         if part not in _LINE_TAGS)
        return where or None
    return None


#: The tags of a line item's union: pydantic puts the one it tried in the error's path.
_LINE_TAGS = frozenset({"invoice_line_item", "custom_line_item"})


#: Error types whose pydantic message quotes part of the input.
_QUOTING = {"union_tag_invalid": "the tag does not match any of the expected tags"}


def _safe_text(item: Any) -> str:
    return _QUOTING.get(str(item["type"]), str(item["msg"]))


def _safe_location(location: Sequence[int | str], kind: str) -> list[str]:
    """The path with every part that came from the message (not the schema) replaced."""
    parts: list[str] = []
    under_dictionary = False
    for position, part in enumerate(location):
        if isinstance(part, int):
            parts.append(str(part))
        elif kind == "extra_forbidden" and position == len(location) - 1:
            parts.append("<extra field>")
        elif under_dictionary:
            parts.append("<key>")
        elif part in wire.FIELD_NAMES or part == "[key]":
            parts.append(part)
        else:
            parts.append("<key>")
        under_dictionary = isinstance(part, str) and part in wire.DICTIONARY_FIELDS \
            and not under_dictionary
    return parts


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
    return RecordPayment(trigger, data.invoice_id, data.amount, data.currency,
                         payment_id=data.payment_id)


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
        settlement = SettlementSplit(data.refund_amount, data.credit_amount or 0,
                                     data.out_of_band_amount or 0)
    return IssueCreditNote(
        trigger=trigger, invoice_id=data.invoice_id, reason=data.reason,
        lines=tuple(_line(line) for line in data.lines or ()), amount=data.amount,
        settlement=settlement, currency=data.currency, memo=data.memo,
        metadata=dict(data.metadata),
        linked_refunds=tuple(LinkedRefund(refund.refund_id, refund.amount)
                             for refund in data.refunds),
        effective_at=data.effective_at,
    )


def void(event: wire.CloudEvent, trigger: Trigger) -> Command:
    data = parse(wire.CreditNoteVoid, event.data, "credit_note.void data")
    return VoidCreditNote(trigger, data.credit_note_id)


def update(event: wire.CloudEvent, trigger: Trigger) -> Command:
    """``credit_note.update``: memo (null clears it) and/or metadata (null removes a key)."""
    data = parse(wire.CreditNoteUpdate, event.data, "credit_note.update data")
    return UpdateCreditNote(trigger, data.credit_note_id, memo=data.memo,
                            memo_set=data.memo_set, metadata_patch=dict(data.metadata or {}))


def refund_outcome(event: wire.CloudEvent, trigger: Trigger, outcome: RefundState,
                   failure_settlement: str = FailureSettlement.CUSTOMER_BALANCE) -> Command:
    """``refund.succeeded`` / ``refund.failed``: stamped with where a failure's amount goes
    (``CREDITNOTES_REFUND_FAILURE_SETTLEMENT`` as it stands now, not at issue)."""
    data = parse(wire.RefundOutcome, event.data, f"{event.type} data")
    return RecordRefundOutcome(
        trigger=trigger, invoice_id=data.invoice_id, refund_id=data.refund_id, outcome=outcome,
        failure_reason=data.failure_reason if outcome is RefundState.FAILED else None,
        failure_settlement=FailureSettlement(failure_settlement))


def _line(line: wire.InvoiceLineItem | wire.CustomLineItem) -> LineRequest:
    if isinstance(line, wire.CustomLineItem):
        return CustomLine(line.description, line.quantity, line.unit_amount, line.tax_rate_bps)
    if line.quantity is not None:
        return InvoiceLineByQuantity(line.invoice_line_id, line.quantity)
    assert line.amount is not None  # the model requires one of the two
    return InvoiceLineByAmount(line.invoice_line_id, line.amount)


def returned(event: wire.CloudEvent, trigger: Trigger, max_credit_bps: int,
             allowed_settlements: Sequence[str] = SETTLEMENTS) -> Command:
    """Return of goods: the returned quantities of the named lines; refund by default."""
    data = parse(wire.ReturnReceived, event.data, "return.received data")
    quantities: dict[str, int] = {}
    for line in data.lines:  # the same line named twice is one return of both quantities
        quantities[line.invoice_line_id] = quantities.get(line.invoice_line_id, 0) + line.quantity
    return _trigger_credit(
        trigger, data.invoice_id, data.reason or "order_change",
        _settlement(data.settlement, "refund", allowed_settlements), max_credit_bps,
        {"return_id": data.return_id}, allowed_settlements=allowed_settlements,
        lines=tuple(InvoiceLineByQuantity(line_id, quantity)
                    for line_id, quantity in quantities.items()))


def sla_breached(event: wire.CloudEvent, trigger: Trigger, max_credit_bps: int,
                 allowed_settlements: Sequence[str] = SETTLEMENTS) -> Command:
    """SLA breach: a service credit spread over the lines; customer balance by default."""
    data = parse(wire.SlaBreached, event.data, "sla.breached data")
    return _trigger_credit(
        trigger, data.invoice_id, "service_credit",
        _settlement(data.settlement, "customer_balance", allowed_settlements), max_credit_bps,
        {"sla_id": data.sla_id}, amount=data.credit_amount, amount_bps=data.credit_bps,
        currency=data.currency, allowed_settlements=allowed_settlements)


def downgraded(event: wire.CloudEvent, trigger: Trigger, max_credit_bps: int,
               allowed_settlements: Sequence[str] = SETTLEMENTS) -> Command:
    """Downgrade: the unused time of the old plan's line; customer balance by default."""
    data = parse(wire.SubscriptionDowngraded, event.data, "subscription.downgraded data")
    return _trigger_credit(
        trigger, data.invoice_id, "subscription_change",
        _settlement(data.settlement, "customer_balance", allowed_settlements), max_credit_bps,
        {}, lines=(UnusedTime(data.invoice_line_id, data.effective_at),),
        allowed_settlements=allowed_settlements)


def canceled(event: wire.CloudEvent, trigger: Trigger, max_credit_bps: int,
             allowed_settlements: Sequence[str] = SETTLEMENTS) -> Command:
    """Cancellation: the unused part of the prepaid term; refund by default."""
    data = parse(wire.SubscriptionCanceled, event.data, "subscription.canceled data")
    return _trigger_credit(
        trigger, data.invoice_id, "subscription_cancellation",
        _settlement(data.settlement, "refund", allowed_settlements), max_credit_bps, {},
        lines=(UnusedTime(data.invoice_line_id, data.canceled_at),),
        allowed_settlements=allowed_settlements)


def _trigger_credit(trigger: Trigger, invoice_id: str, reason: str, settlement: str,
                    max_credit_bps: int, metadata: dict[str, str], *,
                    lines: tuple[LineRequest, ...] = (), amount: int | None = None,
                    amount_bps: int | None = None, currency: str | None = None,
                    allowed_settlements: Sequence[str] = SETTLEMENTS) -> IssueCreditNote:
    """A trigger's credit: capped at what is left and at its policy, never rejected for excess.

    The settlements its topic may ask for travel with it: the domain rejects
    another as ``settlement_not_allowed`` (a business rejection, published).
    """
    return IssueCreditNote(
        trigger=trigger, invoice_id=invoice_id, reason=reason, lines=lines, amount=amount,
        amount_bps=amount_bps, settlement=Settlement(settlement), on_excess=OnExcess.CAP,
        currency=currency, metadata=metadata, max_credit_bps=max_credit_bps,
        policy=f"{trigger.type}:max_credit_bps={max_credit_bps}",
        allowed_settlements=frozenset(Settlement(name) for name in allowed_settlements),
    )


def _settlement(requested: str | None, default: str, allowed: Sequence[str]) -> str:
    """The settlement asked for; else the topic's default if allowed, else the first allowed."""
    if requested is not None:
        return requested
    return default if default in allowed or not allowed else allowed[0]


@dataclass(frozen=True)
class Route:
    """What one input topic carries, and who may publish there."""

    translators: Mapping[str, Translator]
    allowed_sources: frozenset[str] | None = None

    def allows(self, source: str) -> bool:
        """Whether ``source`` may publish here (no allow-list: anyone)."""
        return self.allowed_sources is None or source_allowed(source, self.allowed_sources)


def source_allowed(source: str, allowed: Iterable[str]) -> bool:
    """``source`` is on the list, or under an entry that ends in ``/*``.

    ``/console/*`` admits ``/console/alice`` (the ops console publishes as
    ``<prefix>/<user>``) and anything deeper, but not ``/console`` itself nor
    ``/consoles/x``: the prefix is matched up to and including its slash, and
    something must follow it.
    """
    for entry in allowed:
        if entry.endswith("/*"):
            prefix = entry[:-1]
            if len(source) > len(prefix) and source.startswith(prefix):
                return True
        elif source == entry:
            return True
    return False


def routes(settings: Settings) -> dict[str, Route]:
    """Every input topic: its message types, how each becomes a command, its allowed sources."""
    topics = settings.topics
    table: dict[str, dict[str, Translator]] = {
        topics.invoices: {
            "invoice.finalized": finalized,
            "invoice.payment_succeeded": payment_succeeded,
            "invoice.voided": voided,
            "invoice.marked_uncollectible": marked_uncollectible,
        },
        topics.credit_note_commands: {
            "credit_note.issue": issue,
            "credit_note.void": void,
            "credit_note.update": update,
        },
        topics.refund_results: {
            "refund.succeeded": partial(refund_outcome, outcome=RefundState.SUCCEEDED,
                                        failure_settlement=settings.refund_failure_settlement),
            "refund.failed": partial(refund_outcome, outcome=RefundState.FAILED,
                                     failure_settlement=settings.refund_failure_settlement),
        },
        topics.returns: {
            "return.received": partial(
                returned, max_credit_bps=settings.policy_return_max_credit_bps,
                allowed_settlements=tuple(settings.allowed_settlements_returns)),
        },
        topics.sla_breaches: {
            "sla.breached": partial(
                sla_breached, max_credit_bps=settings.policy_sla_max_credit_bps,
                allowed_settlements=tuple(settings.allowed_settlements_sla_breaches)),
        },
        topics.downgrades: {
            "subscription.downgraded": partial(
                downgraded, max_credit_bps=settings.policy_downgrade_max_credit_bps,
                allowed_settlements=tuple(settings.allowed_settlements_downgrades)),
        },
        topics.cancellations: {
            "subscription.canceled": partial(
                canceled, max_credit_bps=settings.policy_cancellation_max_credit_bps,
                allowed_settlements=tuple(settings.allowed_settlements_cancellations)),
        },
    }
    allowed = settings.allowed_sources()
    return {topic: Route(translators, _frozen(allowed[topic]))
            for topic, translators in table.items()}


def _frozen(sources: list[str] | None) -> frozenset[str] | None:
    return None if sources is None else frozenset(sources)


def translate(event: wire.CloudEvent, topic: str, table: Mapping[str, Route]) -> Command:
    route = table.get(topic)
    if route is not None and not route.allows(event.source):
        raise errors.UnauthorizedSource(f"the event's source may not publish on topic {topic}")
    translator = route.translators.get(event.type) if route is not None else None
    if translator is None:
        raise errors.UnsupportedType(f"the event's type is not read from topic {topic}")
    return translator(event, Trigger(event.source, event.id, event.type, event.time))
