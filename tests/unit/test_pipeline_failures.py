"""Which failures hold a partition and which dead-letter a record; what a dead letter may say.

- only the infrastructure's failures are ``Unavailable`` (retried in place);
- decoding never raises anything but ``Undeliverable``, whatever the bytes;
- a dead-letter message never carries a key, an unknown field name, or a value;
- ``source``, ``id`` and ``type`` with control characters are refused, so a derived
  id (fields joined with a newline) always names exactly one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import string
from typing import Any

import asyncpg
import pytest
from aiokafka import errors as kafka_errors
from asyncpg.exceptions import _base as asyncpg_base
from hypothesis import given, settings
from hypothesis import strategies as st

from service.adapters.unavailable import Backoff, is_unavailable, mapped_to_unavailable
from service.domain import errors
from service.domain.commands import IssueCreditNote, Trigger
from service.domain.credit_note import derived_id
from service.entrypoints import consumer, wire
from service.entrypoints.translators import Route, decode_envelope, parse, translate
from service.handlers import Delivery, Message

# --------------------------------------------------------------- what is the infrastructure's


def postgres_error(sqlstate: str) -> asyncpg.PostgresError:
    kind = asyncpg.PostgresError.__subclasses__()[0]
    for candidate in _all_subclasses(asyncpg.PostgresError):
        if getattr(candidate, "sqlstate", None) == sqlstate:
            kind = candidate
            break
    error = kind.__new__(kind)
    error.sqlstate = sqlstate  # type: ignore[attr-defined]
    return error


def _all_subclasses(kind: type) -> list[type]:
    found = []
    for sub in kind.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


@pytest.mark.parametrize("error", [
    ConnectionRefusedError(), ConnectionResetError(), TimeoutError(), OSError("no route"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.exceptions.ConnectionDoesNotExistError("closed in the middle of operation"),
    postgres_error("08006"), postgres_error("57P01"), postgres_error("57P02"),
    postgres_error("57P03"), postgres_error("40001"), postgres_error("40P01"),
    postgres_error("53300"), postgres_error("25006"),
    # the database refuses the service, not the record: a login refused, a privilege
    # revoked, a migration not applied, no such database or schema, a plan invalidated
    postgres_error("28000"), postgres_error("28P01"), postgres_error("42501"),
    postgres_error("42P01"), postgres_error("42703"), postgres_error("3D000"),
    postgres_error("3F000"),
    asyncpg.exceptions.InvalidCachedStatementError("cached plan must not change result type"),
    kafka_errors.KafkaConnectionError(), kafka_errors.KafkaTimeoutError(),
    kafka_errors.NodeNotReadyError(), kafka_errors.LeaderNotAvailableError(),
    kafka_errors.NotLeaderForPartitionError(), kafka_errors.RequestTimedOutError(),
], ids=lambda error: f"{type(error).__name__}{getattr(error, 'sqlstate', '')}")
def test_the_infrastructures_failures_are_unavailable(error: Exception) -> None:
    assert is_unavailable(error)
    with pytest.raises(errors.Unavailable) as raised, mapped_to_unavailable("PostgreSQL"):
        raise error
    assert raised.value.error_class == type(error).__name__


@pytest.mark.parametrize("error", [
    ValueError("Exceeds the limit (4300 digits)"), TypeError("can't compare offset-naive"),
    KeyError("x"), OverflowError(), RecursionError(), ZeroDivisionError(), AssertionError(),
    postgres_error("22001"), postgres_error("23505"), postgres_error("54000"),
    postgres_error("XX000"), postgres_error("0A000"),
    asyncpg_base.DataError("invalid input for query argument $1"),
    kafka_errors.MessageSizeTooLargeError(), kafka_errors.RecordTooLargeError(),
], ids=lambda error: f"{type(error).__name__}{getattr(error, 'sqlstate', '')}")
def test_anything_else_is_the_records_fault(error: Exception) -> None:
    assert not is_unavailable(error)
    with pytest.raises(type(error)), mapped_to_unavailable("PostgreSQL"):
        raise error


# --------------------------------------------------------------- decoding never raises anything else

JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                      max_size=4),
    max_leaves=20)


@settings(max_examples=300)
@given(value=st.one_of(st.binary(max_size=200),
                       JSON_TEXT.map(lambda doc: json.dumps(doc).encode()),
                       st.sampled_from([b"1" * 5_000, b"NaN", b"[Infinity]", b'{"a": -Infinity}',
                                        b"[" * 3_000 + b"]" * 3_000, b"", b"\xff"])),
       headers=st.lists(st.tuples(st.sampled_from(["ce_id", "ce_source", "ce_type",
                                                   "ce_specversion", "ce_time", "x"]),
                                  st.binary(max_size=20)), max_size=4))
def test_decoding_any_bytes_either_yields_an_event_or_says_undeliverable(
        value: bytes, headers: list[tuple[str, bytes]]) -> None:
    with contextlib.suppress(errors.Undeliverable):
        decode_envelope(value, headers)


def test_a_json_integer_of_more_than_4300_digits_is_an_invalid_message() -> None:
    with pytest.raises(errors.InvalidMessage, match="not JSON"):
        decode_envelope(b'{"specversion": "1.0", "n": 1' + b"0" * 5_000 + b"}", [])


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(token: bytes) -> None:
    with pytest.raises(errors.InvalidMessage, match="not JSON"):
        decode_envelope(b'{"specversion": "1.0", "id": "a", "source": "/s", "type": "t",'
                        b' "data": {"amount": ' + token + b"}}", [])


def test_a_ce_header_that_is_not_utf8_is_an_invalid_message() -> None:
    with pytest.raises(errors.InvalidMessage, match="ce_ header"):
        decode_envelope(b"{}", [("ce_specversion", b"1.0"), ("ce_id", b"a"),
                                ("ce_source", b"/te\xffsts"), ("ce_type", b"t")])


# --------------------------------------------------------------- naive times

@pytest.mark.parametrize(("model", "data"), [
    (wire.Period, {"start": "2026-10-01T00:00:00", "end": "2026-11-01T00:00:00Z"}),
    (wire.Period, {"start": "2026-10-01T00:00:00Z", "end": "2026-11-01T00:00:00"}),
    (wire.SubscriptionCanceled, {"invoice_id": "in_1", "invoice_line_id": "il_1",
                                 "canceled_at": "2026-10-16T00:00:00"}),
    (wire.SubscriptionDowngraded, {"invoice_id": "in_1", "invoice_line_id": "il_1",
                                   "effective_at": "2026-10-16T00:00:00"}),
    (wire.CloudEvent, {"specversion": "1.0", "id": "a", "source": "/s", "type": "t",
                       "time": "2026-10-16T00:00:00"}),
])
def test_a_time_without_utc_offset_is_an_invalid_message(model: type[Any],
                                                         data: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidMessage, match="timezone"):
        parse(model, data, "data")


# --------------------------------------------------------------- nothing of the message in the message

PERSONAL = "jane.roe@example.com"


def invalid_issue(key: str, value: str) -> dict[str, Any]:
    return {"invoice_id": value * 300, "amount": value, key: value, "metadata": {
        key: value * 600, f"{key}-2": 1, key * 50: value}, "lines": [
        {"type": value, "invoice_line_id": value}], "memo": [value], "reason": value,
        "currency": value}


NAME = st.text(string.ascii_lowercase + "éü😀.+-", min_size=3, max_size=12)


@settings(max_examples=200)
@given(marker=st.builds(lambda name, host: f"{name}@{host}.example", NAME, NAME),
       model=st.sampled_from([wire.CreditNoteIssue, wire.InvoiceFinalized, wire.ReturnReceived,
                              wire.SlaBreached, wire.SubscriptionCanceled, wire.CloudEvent]))
def test_a_dead_letter_message_names_places_never_keys_or_values(marker: str,
                                                                   model: type[Any]) -> None:
    data = invalid_issue(marker, marker)
    data["invoice"] = {**data, "lines": [{marker: marker, "id": marker, "period": {
        "start": marker, marker: marker}}]}
    with pytest.raises(errors.InvalidMessage) as raised:
        parse(model, data, "data")
    message = raised.value.message
    assert marker not in message and "@" not in message


def test_the_place_of_a_bad_metadata_value_and_an_unknown_field_is_named_without_them() -> None:
    with pytest.raises(errors.InvalidMessage) as raised:
        parse(wire.CreditNoteIssue, {"invoice_id": "in_1", "amount": 1, PERSONAL: "x",
                                     "metadata": {PERSONAL: 5, "a" * 41: "Jane"}}, "data")
    message = raised.value.message
    assert PERSONAL not in message and "Jane" not in message and "a" * 41 not in message
    assert "metadata.<key>: Input should be a valid string" in message
    assert "metadata.<key>.[key]: String should have at most 40 characters" in message
    assert "<extra field>: Extra inputs are not permitted" in message


def test_an_unknown_line_type_is_refused_without_repeating_it() -> None:
    with pytest.raises(errors.InvalidMessage) as raised:
        parse(wire.CreditNoteIssue, {"invoice_id": "in_1", "lines": [{"type": PERSONAL}]},
              "data")
    assert PERSONAL not in raised.value.message
    assert "lines.0: the tag does not match any of the expected tags" in raised.value.message


# --------------------------------------------------------------- control characters and derived ids

CONTROL = [chr(code) for code in [*range(0x20), *range(0x7F, 0xA0)]]


@pytest.mark.parametrize("attribute", ["source", "id", "type"])
@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\x85", "\x9b", "\x7f"])
def test_source_id_and_type_with_a_control_character_are_refused(attribute: str,
                                                                   char: str) -> None:
    event = {"specversion": "1.0", "id": "a", "source": "/s", "type": "t",
             attribute: f"x{char}y"}
    with pytest.raises(errors.InvalidMessage, match="control characters"):
        parse(wire.CloudEvent, event, "CloudEvent")


def test_two_events_can_no_longer_be_made_to_share_a_derived_id() -> None:
    first = Trigger("/billing\npay-9", "x", "credit_note.issue")
    second = Trigger("/billing", "pay-9\nx", "credit_note.issue")
    assert derived_id("cn", first) == derived_id("cn", second)  # the attack, were they accepted
    for trigger in (first, second):
        with pytest.raises(errors.InvalidMessage, match="control characters"):
            parse(wire.CloudEvent, {"specversion": "1.0", "id": trigger.id,
                                    "source": trigger.source, "type": trigger.type}, "CloudEvent")


ATTRIBUTE = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                    max_size=12)


@settings(max_examples=300)
@given(a=st.tuples(ATTRIBUTE, ATTRIBUTE), b=st.tuples(ATTRIBUTE, ATTRIBUTE))
def test_accepted_events_with_different_source_or_id_never_share_a_derived_id(
        a: tuple[str, str], b: tuple[str, str]) -> None:
    accepted = []
    for source, id_ in (a, b):
        try:
            event = parse(wire.CloudEvent, {"specversion": "1.0", "id": id_, "source": source,
                                            "type": "credit_note.issue"}, "CloudEvent")
        except errors.InvalidMessage:
            return
        accepted.append(Trigger(event.source, event.id, event.type))
    first, second = accepted
    if (first.source, first.id) != (second.source, second.id):
        assert derived_id("cn", first) != derived_id("cn", second)


def test_derived_ids_of_valid_input_are_unchanged() -> None:
    """Byte-identical to the ids issued before control characters were refused."""
    assert derived_id("cn", Trigger("/billing", "pay-9", "invoice.payment_succeeded")) == (
        "cn_4fa0e8a251665cc09cda9bfd")
    assert derived_id("re", Trigger("/tests", "cmd-1", "credit_note.issue"), "refund") == (
        "re_e41ef528220c576eb512bf44")


def test_a_refused_source_or_type_is_named_by_its_topic_never_by_its_value() -> None:
    table = {"commands": Route({"credit_note.issue": lambda event, trigger: None},  # type: ignore[dict-item,return-value,arg-type]
                               frozenset({"/billing"}))}
    event = parse(wire.CloudEvent, {"specversion": "1.0", "id": "a", "source": f"/{PERSONAL}",
                                    "type": "credit_note.issue"}, "CloudEvent")
    with pytest.raises(errors.UnauthorizedSource) as refused:
        translate(event, "commands", table)
    assert PERSONAL not in refused.value.message and "commands" in refused.value.message
    event = parse(wire.CloudEvent, {"specversion": "1.0", "id": "a", "source": "/billing",
                                    "type": f"{PERSONAL}.issue"}, "CloudEvent")
    with pytest.raises(errors.UnsupportedType) as unsupported:
        translate(event, "commands", table)
    assert PERSONAL not in unsupported.value.message and "commands" in unsupported.value.message


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00"])
def test_a_time_that_has_no_utc_equivalent_is_an_invalid_message(moment: str) -> None:
    with pytest.raises(errors.InvalidMessage, match="out of range once converted to UTC"):
        parse(wire.SubscriptionCanceled, {"invoice_id": "in_1", "invoice_line_id": "il_1",
                                          "canceled_at": moment}, "data")
    assert parse(wire.SubscriptionCanceled, {"invoice_id": "in_1", "invoice_line_id": "il_1",
                                             "canceled_at": "9999-12-31T23:59:59Z"}, "data")


# --------------------------------------------------------------- a batch's retries have a budget


class _Failing:
    """A unit of work whose batch always fails (a bug): every message is the record's fault."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @contextlib.asynccontextmanager
    async def transaction(self) -> Any:
        yield

    async def lock(self, invoice_ids: Any, credit_note_ids: Any = (), refund_ids: Any = ()) -> None:
        self.log.append("apply")
        raise KeyError("a bug")

    async def record(self, message: Message, outcome: str) -> bool:
        self.log.append(f"decide {message.command.trigger.id}")
        return True


@settings(max_examples=30, deadline=None)
@given(messages=st.integers(1, 60), attempts=st.integers(1, 5))
def test_a_batch_of_failing_messages_sleeps_at_most_its_retry_budget_in_order(
        messages: int, attempts: int) -> None:
    clock = {"now": 0.0, "slept": 0.0}
    log: list[str] = []

    async def sleep(seconds: float) -> None:
        clock["now"] += seconds
        clock["slept"] += seconds

    batch = [Message(IssueCreditNote(Trigger("/t", f"m{n}", "credit_note.issue"), "in_1",
                                     "other", amount=1), Delivery("commands", 0, n))
             for n in range(messages)]
    pipeline = consumer.Pipeline(lambda: _Failing(log), {}, None,  # type: ignore[arg-type]
                                 Backoff(1.0, 4.0), 0.0, 1_000, attempts=attempts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consumer.asyncio, "sleep", sleep)
        patch.setattr(consumer.time, "monotonic", lambda: clock["now"])
        pipeline._retry_deadline = clock["now"] + pipeline._retry_budget_s
        results = asyncio.run(pipeline._apply(batch, []))

    assert [r.decided for r in results] == [True] * messages
    assert clock["slept"] <= consumer.retry_budget_seconds(pipeline._backoff, attempts)
    # each message is tried (and decided) before the next one is tried at all
    decided = [entry for entry in log if entry.startswith("decide")]
    assert decided == [f"decide m{n}" for n in range(messages)]
    order = [n for n, entry in enumerate(log) if entry.startswith("decide")]
    assert all(log[i + 1:j].count("apply") >= 1 for i, j in itertools.pairwise(order))
    assert max(r.attempts for r in results) <= attempts
