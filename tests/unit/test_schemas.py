"""The JSON Schemas in schemas/json: up to date, matching the examples and the code.

- the checked-in schemas (and generated output examples) are what
  ``schemas/generate.py`` writes today;
- every example in schemas/examples is valid against its schema;
- what ``event_codec.encode`` really emits for domain events validates against
  the output schemas, and carries no field the schemas do not describe;
- the input examples parse with the service's own wire models and translators.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, get_args

import jsonschema
import pytest
from jsonschema import Draft202012Validator

from schemas import generate
from service.adapters.event_codec import SOURCE, encode
from service.domain import errors
from service.domain.commands import Settlement, SettlementSplit, Trigger, VoidCreditNote
from service.domain.credit_note import Reason
from service.domain.events import (
    CreditNoteIssued,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CreditNoteRejected,
    CreditNoteUpdated,
    CreditNoteVoided,
    CustomerBalanceCredited,
    Event,
    InvoicePaid,
    RefundRequested,
)
from service.domain.issuing import issue_credit_note, void_credit_note
from service.domain.refunds import FailureSettlement, LinkedRefund, RefundState
from service.entrypoints import translators, wire
from service.settings import Settings, Topics

from .builders import (
    by_amount,
    by_quantity,
    command,
    custom,
    events_of,
    invoice,
    issue,
    line,
    paid_invoice,
    percent_off,
    trigger,
    void,
)

TOPICS = Topics()


@functools.cache
def routes() -> dict[str, translators.Route]:
    """The service's routing table with default settings (no .env: tests do not depend on one)."""
    return translators.routes(Settings(_env_file=None))

ALL_TYPES = sorted(generate.MESSAGES)
OUTPUT_TYPES = sorted(generate.OUTPUTS)
INPUT_TYPES = sorted(generate.INPUTS)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

#: What docs/contract.md promises in each output's `data`: the schema must require at least these.
CONTRACT_FIELDS = {
    "credit_note.issued": {
        "id", "number", "invoice_id", "customer_id", "currency", "type", "reason", "subtotal",
        "tax", "total", "pre_payment_amount", "post_payment_amount", "refund_amount",
        "credit_amount", "out_of_band_amount", "lines", "journal", "trigger", "invoice",
        "effective_at", "refund_status", "refunds", "memo", "metadata"},
    "credit_note.voided": {"id", "number", "invoice_id", "total", "journal", "invoice"},
    "credit_note.rejected": {"trigger", "invoice_id", "reason", "message"},
    "credit_note.updated": {"id", "number", "invoice_id", "memo", "metadata"},
    "credit_note.refund_succeeded": {"credit_note_id", "invoice_id", "refund_id", "payment_id",
                                     "amount", "refund_status", "journal"},
    "credit_note.refund_failed": {"credit_note_id", "invoice_id", "refund_id", "payment_id",
                                  "amount", "refund_status", "journal", "failure_reason",
                                  "resettled_to"},
    "invoice.paid": {"invoice_id", "paid_by", "credit_note_id", "amount_remaining"},
    "refund.requested": {"id", "invoice_id", "customer_id", "credit_note_id", "payment_id",
                         "amount", "currency"},
    "customer_balance.credited": {"id", "customer_id", "currency", "amount", "reason",
                                  "invoice_id"},
}


def schema(type_: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((generate.SCHEMA_DIR / f"{type_}.json").read_text("utf-8"))
    return loaded


def example(type_: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((generate.EXAMPLES_DIR / f"{type_}.json").read_text("utf-8"))
    return loaded


def validator(document: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(document)
    return Draft202012Validator(document, format_checker=Draft202012Validator.FORMAT_CHECKER)


def closed(document: dict[str, Any]) -> dict[str, Any]:
    """The schema with every described object closed: no property it does not name.

    The published output schemas stay open (docs/contract.md promises "at least" their
    fields); the tests close them so that a field the codec starts emitting
    without a schema change fails here.
    """
    document = copy.deepcopy(document)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(document)
    return document


def assert_valid(type_: str, cloudevent: dict[str, Any]) -> None:
    problems = [f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
                for error in validator(closed(schema(type_))).iter_errors(cloudevent)]
    assert problems == [], f"{type_} does not fit schemas/json/{type_}.json: {problems}"


# --- (a) no drift ---------------------------------------------------------------------------


def test_checked_in_schemas_and_output_examples_are_what_the_generator_writes() -> None:
    assert generate.stale_files() == [], "run `python -m schemas.generate` and commit the result"


def test_there_is_one_schema_and_one_example_per_message_type() -> None:
    assert sorted(path.stem for path in generate.SCHEMA_DIR.glob("*.json")) == ALL_TYPES
    assert sorted(path.stem for path in generate.EXAMPLES_DIR.glob("*.json")) == ALL_TYPES


def test_the_check_mode_exits_non_zero_on_drift(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.main(["--check"]) == 0
    monkeypatch.setattr(generate, "render", lambda document, **_: json.dumps(document) + "\n")
    assert generate.main(["--check"]) == 1
    assert "stale: schemas/json/invoice.paid.json" in capsys.readouterr().err


# --- (b) examples against schemas -----------------------------------------------------------


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_the_schema_is_valid_json_schema_and_names_its_type(type_: str) -> None:
    document = schema(type_)
    Draft202012Validator.check_schema(document)
    assert document["title"] == type_
    assert document["properties"]["type"]["const"] == type_


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_the_example_is_valid_against_its_schema(type_: str) -> None:
    document = example(type_)
    assert document["type"] == type_
    validator(schema(type_)).validate(document)


@pytest.mark.parametrize("type_", OUTPUT_TYPES)
def test_the_output_schema_requires_what_the_contract_promises(type_: str) -> None:
    document = schema(type_)
    data = document["$defs"][document["properties"]["data"]["$ref"].rsplit("/", 1)[1]]
    assert CONTRACT_FIELDS[type_] <= set(data["required"])
    assert {"specversion", "id", "source", "type", "time", "data"} <= set(document["required"])
    assert document["properties"]["source"]["const"] == SOURCE


def test_money_is_an_integer_in_the_output_schemas() -> None:
    issued = example("credit_note.issued")
    issued["data"]["total"] = 3_600.5
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("credit_note.issued")).validate(issued)
    refund = example("refund.requested")
    refund["data"]["amount"] = "600"
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("refund.requested")).validate(refund)


def test_a_journal_line_with_both_a_debit_and_a_credit_is_refused() -> None:
    issued = example("credit_note.issued")
    issued["data"]["journal"][0]["credit"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("credit_note.issued")).validate(issued)


def test_output_examples_have_no_field_the_schema_does_not_describe() -> None:
    for type_ in OUTPUT_TYPES:
        assert_valid(type_, example(type_))


# --- (c) what the real code emits fits the output schemas ----------------------------------


def encoded(events: Sequence[Event]) -> list[tuple[str, dict[str, Any]]]:
    return [(out.type, out.cloudevent) for out in (encode(event, TOPICS, now=NOW) for event in events)]


def test_a_pre_payment_credit_note_fits_the_schema() -> None:
    inv = invoice(lines=[line("L1", quantity=4, unit_amount=2_500, tax_rate_bps=825)],
                  discounts=[percent_off(1_000)])
    issue(inv, lines=[by_quantity("L1", 1)], reason="order_change")

    outputs = encoded(inv.events)

    assert [type_ for type_, _ in outputs] == ["credit_note.issued"]
    assert outputs[0][1]["data"]["type"] == "pre_payment"
    assert_valid(*outputs[0])


def test_a_refunded_post_payment_credit_note_fits_the_schemas() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=2, unit_amount=5_000, tax_rate_bps=2_000)])
    issue(inv, lines=[by_amount("L1", 3_333)], settlement=Settlement.REFUND)

    outputs = encoded(inv.events)

    assert [type_ for type_, _ in outputs] == ["credit_note.issued", "refund.requested"]
    issued = outputs[0][1]["data"]
    assert issued["type"] == "post_payment"
    assert issued["lines"][0]["quantity"] is None  # credited by amount: no quantity
    for output in outputs:
        assert_valid(*output)


def test_a_mixed_credit_note_that_pays_the_invoice_fits_the_schemas() -> None:
    # 100.00 owed, 40.00 paid: crediting 50.00 + a custom 11.00 takes the 60.00 left and 1.00 more
    inv = invoice(lines=[line("L1", quantity=2, unit_amount=5_000)], amount_paid=4_000)
    note = issue_credit_note(inv, command(
        lines=[by_quantity("L1", 1), custom("Goodwill", 1, 1_000, tax_rate_bps=1_000)],
        settlement=SettlementSplit(refund_amount=50, credit_amount=0, out_of_band_amount=50),
        reason="service_credit", policy="sla-gold"))

    outputs = encoded(inv.events)

    assert [type_ for type_, _ in outputs] == ["credit_note.issued", "invoice.paid",
                                                "refund.requested"]
    assert note.type.value == "mixed"
    assert any(entry["invoice_line_id"] is None for entry in outputs[0][1]["data"]["lines"])
    for output in outputs:
        assert_valid(*output)


def test_a_voided_credit_note_fits_the_schema() -> None:
    inv = invoice()
    note = issue(inv, amount=2_500)
    void(inv, note)

    voided = events_of(inv, CreditNoteVoided)

    assert len(voided) == 1
    assert_valid(*encoded(list(voided))[0])


@pytest.mark.parametrize("invoice_id", ["in_1", None])
def test_a_rejection_fits_the_schema(invoice_id: str | None) -> None:
    inv = invoice()
    with pytest.raises(errors.Rejection) as refused:
        issue(inv, amount=1_000_000)
    rejected = CreditNoteRejected(trigger=trigger("credit_note.issue"), invoice_id=invoice_id,
                                  reason=refused.value.code, message=refused.value.message)

    [(type_, cloudevent)] = encoded([rejected])

    assert type_ == "credit_note.rejected"
    assert ("subject" in cloudevent) == (invoice_id is not None)
    assert_valid(type_, cloudevent)


def test_a_void_refusal_fits_the_schema() -> None:
    inv = paid_invoice()
    note = issue(inv, amount=1_000)
    command_ = VoidCreditNote(trigger=trigger("credit_note.void"), credit_note_id=note.id)
    with pytest.raises(errors.NotVoidable) as refused:
        void_credit_note(inv, note, command_)
    rejected = CreditNoteRejected(trigger=command_.trigger, invoice_id=None,
                                  reason=refused.value.code, message=refused.value.message)

    assert_valid(*encoded([rejected])[0])


def test_every_reason_and_settlement_fits_the_schema() -> None:
    for reason in Reason:
        for settlement in Settlement:
            inv = paid_invoice(lines=[line("L1", quantity=3, unit_amount=999, tax_rate_bps=1_500)])
            issue(inv, lines=[by_quantity("L1", 3)], settlement=settlement, reason=reason.value)
            for output in encoded(inv.events):
                assert_valid(*output)


def test_an_event_the_codec_emits_with_an_unknown_field_would_fail() -> None:
    inv = invoice()
    issue(inv, amount=100)
    [(type_, cloudevent)] = encoded(inv.events)
    cloudevent["data"]["surprise"] = 1
    with pytest.raises(AssertionError, match="surprise"):
        assert_valid(type_, cloudevent)


def test_every_domain_event_kind_has_an_output_schema() -> None:
    kinds = {CreditNoteIssued: "credit_note.issued", CreditNoteVoided: "credit_note.voided",
             CreditNoteRejected: "credit_note.rejected", InvoicePaid: "invoice.paid",
             RefundRequested: "refund.requested", CreditNoteUpdated: "credit_note.updated",
             CreditNoteRefundSucceeded: "credit_note.refund_succeeded",
             CreditNoteRefundFailed: "credit_note.refund_failed",
             CustomerBalanceCredited: "customer_balance.credited"}
    assert sorted(kinds.values()) == OUTPUT_TYPES
    assert set(get_args(Event)) == set(kinds)


# --- (d) input examples parse with the wire models ----------------------------------------


def test_every_type_the_service_reads_has_an_input_schema_on_its_topic() -> None:
    read = {(topic, type_) for topic, route in routes().items() for type_ in route.translators}
    assert read == {(topic, type_) for type_, (topic, _) in generate.INPUTS.items()}


@pytest.mark.parametrize("type_", INPUT_TYPES)
def test_the_input_example_parses_with_the_wire_models(type_: str) -> None:
    topic, model = generate.INPUTS[type_]
    document = example(type_)

    model.model_validate(document)
    envelope = wire.CloudEvent.model_validate(document)
    command_ = translators.translate(envelope, topic, routes())

    assert command_.trigger == Trigger(document["source"], document["id"], type_)


@pytest.mark.parametrize("type_", INPUT_TYPES)
def test_the_input_example_round_trips_as_a_kafka_record(type_: str) -> None:
    document = example(type_)
    envelope = translators.decode_envelope(json.dumps(document).encode(), [])
    assert envelope.type == type_


def test_a_float_amount_is_refused_by_both_the_schema_and_the_wire_model() -> None:
    document = example("invoice.payment_succeeded")
    document["data"]["amount"] = 3_000.5
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("invoice.payment_succeeded")).validate(document)
    with pytest.raises(errors.InvalidMessage):
        translators.translate(wire.CloudEvent.model_validate(document), TOPICS.invoices,
                              routes())


def test_an_unknown_data_field_is_refused_by_both_the_schema_and_the_wire_model() -> None:
    document = example("credit_note.void")
    document["data"]["note"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("credit_note.void")).validate(document)
    with pytest.raises(errors.InvalidMessage):
        translators.translate(wire.CloudEvent.model_validate(document),
                              TOPICS.credit_note_commands, routes())


def test_the_asyncapi_document_names_every_topic_the_service_reads_and_writes() -> None:
    document = json.loads((generate.HERE / "asyncapi.json").read_text("utf-8"))
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert document["asyncapi"].startswith("3.")
    assert addresses == {topic for topic, _ in generate.MESSAGES.values()}
    text = json.dumps(document)
    for model in ("CreditNoteIssuedEvent", "ReturnReceivedEvent", "RefundRequestedEvent",
                  "RefundFailedEvent", "CustomerBalanceCreditedEvent", "CreditNoteUpdateCommand"):
        assert model in text


def test_no_generated_file_points_outside_the_repository() -> None:
    for path in generate.generated_files():
        text = path.read_text("utf-8")
        assert "CONTRACT.md" not in text and "RULES.md" not in text, path


# --- (e) the money loop: payments, refund outcomes, the balance, edits ----------------------


def test_a_payment_over_what_is_left_fits_the_balance_schema_with_no_null_field() -> None:
    inv = invoice(lines=[line("L1", quantity=1, unit_amount=10_000)])
    issue(inv, amount=3_000)
    inv.receive_payment("pay_1", 10_000, "usd", trigger("invoice.payment_succeeded"))

    [(type_, cloudevent)] = encoded(events_of(inv, CustomerBalanceCredited))

    assert type_ == "customer_balance.credited"
    data = cloudevent["data"]
    assert (data["amount"], data["reason"], data["payment_id"]) == (3_000, "overpayment", "pay_1")
    assert "credit_note_id" not in data and "refund_id" not in data
    assert cloudevent["subject"] == inv.customer_id
    assert_valid(type_, cloudevent)


@pytest.mark.parametrize("settlement", list(FailureSettlement))
def test_refund_outcomes_fit_their_schemas(settlement: FailureSettlement) -> None:
    inv = paid_invoice(lines=[line("L1", quantity=2, unit_amount=5_000)])
    note = issue(inv, amount=4_000, settlement=Settlement.REFUND)
    [refund] = note.refunds
    inv.settle_refund(refund.refund_id, RefundState.FAILED, trigger("refund.failed"),
                      failure_reason=None, settlement=settlement, now=NOW)
    note = issue(inv, amount=1_000, settlement=Settlement.REFUND)
    [refund] = note.refunds
    inv.settle_refund(refund.refund_id, RefundState.SUCCEEDED, trigger("refund.succeeded"),
                      now=NOW)

    outputs = {type_: cloudevent for type_, cloudevent in encoded(inv.events)
               if type_.startswith(("credit_note.refund", "customer_balance"))}

    failed = outputs["credit_note.refund_failed"]["data"]
    assert (failed["resettled_to"], failed["failure_reason"]) == (settlement.value, None)
    assert (failed["journal"] == []) == (settlement is FailureSettlement.NONE)
    assert ("customer_balance.credited" in outputs) == (
        settlement is FailureSettlement.CUSTOMER_BALANCE)
    assert outputs["credit_note.refund_succeeded"]["data"]["refund_status"] == "succeeded"
    for type_, cloudevent in outputs.items():
        assert_valid(type_, cloudevent)


def test_a_linked_refund_and_an_update_fit_their_schemas() -> None:
    inv = paid_invoice(lines=[line("L1", quantity=1, unit_amount=5_000)])
    note = issue_credit_note(inv, dataclasses.replace(
        command(amount=2_000), linked_refunds=(LinkedRefund("re_1", 2_000),)))
    inv.update_credit_note(note, trigger("credit_note.update"), memo=None, memo_set=True,
                           metadata_patch={"ticket": "T-1"})

    outputs = encoded(inv.events)

    assert [type_ for type_, _ in outputs] == ["credit_note.issued", "credit_note.updated"]
    issued, updated = (cloudevent["data"] for _, cloudevent in outputs)
    assert issued["refunds"] == [{"refund_id": "re_1", "payment_id": None, "amount": 2_000,
                                  "status": "succeeded", "linked": True}]
    assert issued["refund_status"] == "succeeded"
    assert (updated["memo"], updated["metadata"]) == (None, {"ticket": "T-1"})
    for output in outputs:
        assert_valid(*output)


def test_an_update_with_nothing_to_change_is_refused_by_both_the_schema_and_the_wire_model(
) -> None:
    document = example("credit_note.update")
    document["data"] = {"credit_note_id": document["data"]["credit_note_id"]}
    with pytest.raises(jsonschema.ValidationError):
        validator(schema("credit_note.update")).validate(document)
    with pytest.raises(errors.InvalidMessage):
        translators.translate(wire.CloudEvent.model_validate(document),
                              TOPICS.credit_note_commands, routes())
