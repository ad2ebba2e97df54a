"""Every event an accepted message can produce fits a broker's default 1 MB (issue 9, finding 2).

The inputs are the largest the wire models accept: 1,000 lines, the whole line
text budget spent in the characters that cost the most bytes in JSON (a
control character is a 6-byte escape, an emoji 4 bytes), the longest memo and
metadata, the longest trigger attributes. They go through the real path:
record bytes -> ``decode_envelope`` -> ``translate`` -> the domain -> the
codec, and each event is measured as the relay sends it (key, value, headers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.adapters.event_codec import encode
from service.adapters.kafka_producer import KafkaProducer
from service.domain import errors
from service.domain.commands import Command, FinalizeInvoice, IssueCreditNote, Trigger, VoidCreditNote
from service.domain.credit_note import CreditNote, derived_id
from service.domain.events import CreditNoteRejected, Event
from service.domain.invoice import Invoice, finalize_invoice
from service.domain.issuing import issue_credit_note, void_credit_note
from service.entrypoints import translators
from service.entrypoints.wire import MAX_AMOUNT, MAX_LINE_TEXT_BYTES, json_bytes
from service.settings import Settings

#: What the relay may send: Kafka's default ``message.max.bytes`` is 1,048,588 for a
#: whole record batch; this leaves room for a longer traceparent or a broker's overhead.
EVENT_BUDGET = 1_000_000
LINES = 1_000
CONTROL = "\x01"  # 6 bytes in JSON: \u0001
EMOJI = "\U0001F600"  # 4 bytes in UTF-8
SETTINGS = Settings(_env_file=None, allow_any_source=True)  # type: ignore[call-arg]
TOPICS = SETTINGS.topics
ROUTES = translators.routes(SETTINGS)
HEADERS = [("content-type", b"application/cloudevents+json"),
           ("traceparent", b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01")]
SOURCE = EMOJI * 1024  # attributes refuse control characters
INVOICE_ID = CONTROL * 255
MEMO = CONTROL * 5000
METADATA = {f"{n:02d}" + CONTROL * 38: CONTROL * 500 for n in range(50)}


def fill(nbytes: int, char: str) -> str:
    return char * (nbytes // json_bytes(char))


def record(topic: str, type_: str, data: dict[str, Any], event_id: str) -> Command:
    """A command from the bytes of a record, as the consumer makes it."""
    value = json.dumps({"specversion": "1.0", "id": event_id, "source": SOURCE, "type": type_,
                        "data": data}).encode()
    return translators.translate(translators.decode_envelope(value, []), topic, ROUTES)


def invoice_data(texts: list[tuple[str, str]], amount_paid: int = 0) -> dict[str, Any]:
    unit = (MAX_AMOUNT // len(texts)) // 22  # tax at 1000% stays inside the limits
    return {"invoice": {
        "id": INVOICE_ID, "number": CONTROL * 255, "customer_id": CONTROL * 255,
        "currency": "usd", "status": "open", "amount_paid": amount_paid,
        "lines": [{"id": line_id, "description": description, "quantity": 2,
                   "unit_amount": unit, "tax_rate_bps": 100_000}
                  for line_id, description in texts]}}


def line_texts(count: int, char: str, id_share: float = 0.0) -> list[tuple[str, str]]:
    """``count`` lines whose ids and descriptions spend the whole text budget."""
    per_line = MAX_LINE_TEXT_BYTES // count
    texts = []
    for n in range(count):
        line_id = f"L{n:04d}" + fill(max(int(per_line * id_share) - 5, 0), char)[:250]
        description = fill(per_line - json_bytes(line_id), char)[:1000]
        texts.append((line_id, description))
    return texts


def finalized(data: dict[str, Any]) -> Invoice:
    command = record(TOPICS.invoices, "invoice.finalized", data, "fin-1")
    assert isinstance(command, FinalizeInvoice)
    return finalize_invoice(command)


def issued(invoice: Invoice, command: Command) -> tuple[CreditNote, list[Event]]:
    assert isinstance(command, IssueCreditNote)
    note = issue_credit_note(invoice, command)
    return note, invoice.pop_events()


def rejected(invoice: Invoice, command: Command) -> Event:
    """The rejection event the handler writes (service/handlers.py)."""
    assert isinstance(command, IssueCreditNote)
    with pytest.raises(errors.Rejection) as refusal:
        issue_credit_note(invoice, command)
    return CreditNoteRejected(trigger=command.trigger, invoice_id=command.invoice_id,
                              reason=refusal.value.code, message=refusal.value.message)


def measured(events: list[Event]) -> Iterator[tuple[str, int]]:
    for event in events:
        outgoing = encode(event, TOPICS)
        key = outgoing.key.encode() if outgoing.key is not None else None
        yield outgoing.type, KafkaProducer.estimated_size(key, outgoing.to_json().encode(),
                                                          HEADERS)


def assert_fit(events: list[Event]) -> dict[str, int]:
    sizes = dict(measured(events))
    assert sizes and all(size <= EVENT_BUDGET for size in sizes.values()), sizes
    return sizes


def command_data(**data: Any) -> dict[str, Any]:
    return {"invoice_id": INVOICE_ID, "memo": MEMO, "metadata": METADATA, **data}


def test_the_finding_is_refused_at_the_door_instead_of_wedging_the_outbox() -> None:
    """1,000 lines of 300 two-byte characters: a 672 KB record, a ~2 MB credit_note.issued
    with ASCII escapes. Now over the line text budget: dead-lettered, never accepted."""
    lines = [(f"L{n}", "é" * 300) for n in range(LINES)]
    with pytest.raises(errors.InvalidMessage, match="exceed 200,000 bytes"):
        finalized(invoice_data(lines))


def test_a_line_less_credit_spread_over_every_line_its_void_and_the_paying_credit_fit() -> None:
    invoice = finalized(invoice_data(line_texts(LINES, CONTROL), amount_paid=1))
    first, events = issued(invoice, record(
        TOPICS.credit_note_commands, "credit_note.issue",
        command_data(amount=invoice.amount_remaining - 1), "cn-1"))
    assert len(first.lines) == LINES
    assert assert_fit(events)["credit_note.issued"] > 500_000  # the budget is really spent
    assert set(assert_fit(void(invoice, first)[1])) == {"credit_note.voided"}
    second, events = issued(invoice, record(
        TOPICS.credit_note_commands, "credit_note.issue",
        command_data(amount=invoice.amount_remaining + 1, refund_amount=1), "cn-1b"))
    assert len(second.lines) == LINES
    assert set(assert_fit(events)) == {"credit_note.issued", "invoice.paid", "refund.requested"}


def void(invoice: Invoice, note: CreditNote) -> tuple[CreditNote, list[Event]]:
    command = record(TOPICS.credit_note_commands, "credit_note.void",
                     {"credit_note_id": note.id}, EMOJI * 255)
    assert isinstance(command, VoidCreditNote)
    voided = void_credit_note(invoice, note, command)
    return voided, invoice.pop_events()


def test_lines_from_the_invoice_and_custom_lines_each_with_a_full_budget_fit() -> None:
    half = LINES // 2
    invoice = finalized(invoice_data(line_texts(half, CONTROL)))
    custom = [{"type": "custom_line_item", "description": description, "quantity": 1,
               "unit_amount": 1, "tax_rate_bps": 100_000}
              for _, description in line_texts(half, CONTROL)]
    referenced = [{"type": "invoice_line_item", "invoice_line_id": line.id,
                   "amount": line.unit_amount // 2} for line in invoice.lines]
    command = record(TOPICS.credit_note_commands, "credit_note.issue",
                     command_data(lines=referenced + custom), "cn-2")
    note, events = issued(invoice, command)
    assert len(note.lines) == LINES
    assert assert_fit(events)["credit_note.issued"] > 700_000


def test_a_return_of_every_line_and_an_sla_credit_over_every_line_fit() -> None:
    texts = line_texts(LINES, CONTROL, id_share=0.5)
    invoice = finalized(invoice_data(texts))
    returned = record(TOPICS.returns, "return.received", {
        "invoice_id": INVOICE_ID, "return_id": CONTROL * 255,
        "lines": [{"invoice_line_id": line_id, "quantity": 1} for line_id, _ in texts]}, "r-1")
    note, events = issued(invoice, returned)
    assert len(note.lines) == LINES
    assert_fit(events)
    invoice = finalized(invoice_data(texts))
    sla = record(TOPICS.sla_breaches, "sla.breached",
                 {"invoice_id": INVOICE_ID, "sla_id": CONTROL * 255, "credit_bps": 5_000}, "s-1")
    note, events = issued(invoice, sla)
    assert len(note.lines) == LINES
    assert_fit(events)


def test_the_longest_rejections_fit() -> None:
    invoice = finalized(invoice_data(line_texts(LINES, CONTROL)))
    unknown_line = record(TOPICS.credit_note_commands, "credit_note.issue", command_data(
        lines=[{"type": "invoice_line_item", "invoice_line_id": CONTROL * 255, "quantity": 1}]),
        "cn-3")
    too_much = record(TOPICS.credit_note_commands, "credit_note.issue",
                      command_data(amount=MAX_AMOUNT), "cn-4")
    assert_fit([rejected(invoice, unknown_line), rejected(invoice, too_much)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, LINES), char=st.sampled_from(["a", '"', "é", "€", EMOJI, CONTROL]),
       id_share=st.floats(0, 1), kind=st.sampled_from(["amount", "quantity", "custom"]))
def test_any_mix_of_lines_and_characters_within_the_limits_fits(
        count: int, char: str, id_share: float, kind: str) -> None:
    texts = line_texts(count, char, id_share)
    invoice = finalized(invoice_data(texts))
    if kind == "amount":
        data = command_data(amount=invoice.total // 2 or 1)
    elif kind == "quantity":
        data = command_data(lines=[{"type": "invoice_line_item", "invoice_line_id": line_id,
                                    "quantity": 1} for line_id, _ in texts])
    else:
        data = command_data(lines=[{"type": "custom_line_item", "description": description
                                    or "x", "quantity": 1, "unit_amount": 1}
                                   for _, description in texts])
    note, events = issued(invoice, record(TOPICS.credit_note_commands, "credit_note.issue",
                                          data, "cn-h"))
    assert_fit(events)
    assert_fit(void(invoice, note)[1])


def test_events_are_written_as_utf8_without_ascii_escapes_and_keep_their_ids() -> None:
    invoice = finalized(invoice_data([("L1", "Größe 😀 \"x\"")]))
    _, events = issued(invoice, record(TOPICS.credit_note_commands, "credit_note.issue",
                                       {"invoice_id": INVOICE_ID, "amount": 1}, "cn-u"))
    outgoing = encode(events[0], TOPICS)
    text = outgoing.to_json()
    assert "Größe 😀 \\\"x\\\"" in text and "\\u00f6" not in text and ", " not in text
    assert json.loads(text) == outgoing.cloudevent
    # ids derive from the trigger alone, never from the encoding
    trigger = Trigger(SOURCE, "cn-u", "credit_note.issue")
    assert outgoing.id == derived_id("evt", trigger, "credit_note.issued")
    assert derived_id("evt", Trigger("/billing", "e1", "credit_note.issue"),
                      "credit_note.issued") == "evt_53026dc3d27354ce8a851b56"
