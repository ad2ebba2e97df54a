"""orjson reads and writes what Python's ``json`` did, byte for byte and refusal for refusal.

Inbound, a record the service used to apply must still be applied with the same
values, and one it dead-lettered must still be dead-lettered with the same
reason. Outbound, the outbox payloads (and the sizes ``wire.py`` bounds) must be
the same bytes as before, so a stored event and its republished copy never
differ. Issue 13 made both faster; these tests hold the old code as the reference.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.adapters.event_codec import OutgoingEvent
from service.domain import errors
from service.entrypoints import wire
from service.entrypoints.translators import decode_envelope, load_json

# -- the reference: the code before issue 13 -----------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def reference_load(value: bytes) -> Any:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidMessage("the record value is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        raise errors.InvalidMessage("the record value is not JSON") from None
    except RecursionError:
        raise errors.InvalidMessage("the record value is nested too deeply") from None


def reference_dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def outcome(load: Any, value: bytes) -> tuple[str, Any]:
    try:
        return "value", load(value)
    except errors.InvalidMessage as error:
        return "refused", error.message


def same(left: Any, right: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        return (math.isnan(left) and math.isnan(right)) or (
            left == right and math.copysign(1, left) == math.copysign(1, right))
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        return list(left) == list(right) and all(same(left[k], right[k]) for k in left)
    return bool(left == right)


# -- generated documents -------------------------------------------------------------------

any_text = st.text(alphabet=st.characters(codec=None), max_size=40)  # surrogates, NUL, controls
integers = st.one_of(st.integers(), st.integers(-(2**70), 2**70),
                     st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
                                      10**15, -(10**15), 0]))
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), integers, floats, any_text)
documents = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                     st.dictionaries(any_text, inner, max_size=5)),
    max_leaves=30)


def written(document: Any, ascii_only: bool, spaced: bool) -> bytes:
    text = json.dumps(document, ensure_ascii=ascii_only,
                      separators=(", ", ": ") if spaced else (",", ":"))
    return text.encode("utf-8", errors="surrogatepass")  # a lone surrogate: invalid UTF-8


@settings(max_examples=400)
@given(document=documents, ascii_only=st.booleans(), spaced=st.booleans())
def test_json_documents_read_as_python_read_them(document: Any, ascii_only: bool,
                                                 spaced: bool) -> None:
    value = written(document, ascii_only, spaced)
    (kind, got), (expected_kind, expected) = (outcome(load_json, value),
                                              outcome(reference_load, value))
    assert kind == expected_kind
    assert same(got, expected) if kind == "value" else got == expected


@settings(max_examples=400)
@given(document=documents, cut=st.integers(0, 10_000), insert=st.binary(max_size=4))
@example(document=None, cut=0, insert=b"\xef\xbb\xbf")  # a byte order mark
def test_damaged_documents_are_refused_as_python_refused_them(document: Any, cut: int,
                                                              insert: bytes) -> None:
    value = written(document, False, False)
    cut %= len(value) + 1
    damaged = value[:cut] + insert + value[cut:]
    (kind, got), (expected_kind, expected) = (outcome(load_json, damaged),
                                              outcome(reference_load, damaged))
    assert kind == expected_kind
    assert same(got, expected) if kind == "value" else got == expected


@given(value=st.binary(max_size=64))
def test_any_bytes_read_as_python_read_them(value: bytes) -> None:
    (kind, got), (expected_kind, expected) = (outcome(load_json, value),
                                              outcome(reference_load, value))
    assert kind == expected_kind
    assert same(got, expected) if kind == "value" else got == expected


@pytest.mark.parametrize("value", [
    b"NaN", b"[Infinity]", b'{"a": -Infinity}', b"1e400", b"-1e400", b"1e-400",
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808",
    b"-9223372036854775809", b'{"amount": 100000000000000000000000}', b"9" * 5000,
    b'"\\ud800"', b'"\\udc00\\ud800"', b'"\\u0000"', b'"a\x00b"', b'"\xed\xa0\x80"',
    b'"\xc0\x80"', b"[" * 1100 + b"]" * 1100, b"[" * 100_000, b'{"a":1,"a":2}', b"-0",
    b"-0.0", b" {} ", b"\t[]\n", b"", b"{}x", b'"\x1f"', b'"\x7f"',
])
def test_edge_cases_read_as_python_read_them(value: bytes) -> None:
    (kind, got), (expected_kind, expected) = (outcome(load_json, value),
                                              outcome(reference_load, value))
    assert kind == expected_kind
    assert same(got, expected) if kind == "value" else got == expected


def test_an_amount_past_64_bits_is_refused_for_its_size_not_as_a_float() -> None:
    """orjson alone would read 2**64 as a float: the reason would change."""
    event = {"specversion": "1.0", "id": "e1", "source": "/s", "type": "credit_note.issue",
             "data": {"invoice_id": "in_1", "amount": 2**64}}
    assert type(load_json(json.dumps(event).encode())["data"]["amount"]) is int


@pytest.mark.parametrize("escape", [b"\\u0000", b"\\u0000\\u0000"])
def test_a_nul_escape_is_still_refused(escape: bytes) -> None:
    value = (b'{"specversion":"1.0","id":"e' + escape + b'","source":"/s",'
             b'"type":"credit_note.issue","data":{}}')
    with pytest.raises(errors.InvalidMessage, match="NUL"):
        decode_envelope(value, [])


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    value = (b'{"specversion":"1.0","id":"e\\\\u0000","source":"/s",'
             b'"type":"credit_note.issue","data":{}}')
    assert decode_envelope(value, []).id == "e\\u0000"


# -- writing -------------------------------------------------------------------------------


def event_of(data: Any) -> OutgoingEvent:
    return OutgoingEvent("evt_1", "credit-note-events", "in_1", "credit_note.issued",
                         {"specversion": "1.0", "id": "evt_1", "data": data})


#: What an event's data holds: no float (amounts and quantities are integers, metadata values
#: strings: ``wire.py``), and there orjson writes exponents differently (1e-7, json: 1e-07)
#: and NaN as null (json: NaN, which PostgreSQL's json type refused).
event_documents = st.recursive(
    st.one_of(st.none(), st.booleans(), integers, any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(any_text, inner, max_size=5)),
    max_leaves=30)


@settings(max_examples=400)
@given(data=event_documents)
def test_events_are_written_as_json_dumps_wrote_them(data: Any) -> None:
    event = event_of(data)
    try:
        expected = reference_dumps(event.cloudevent)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error)):
            event.to_json()
        return
    assert event.to_json() == expected


@pytest.mark.parametrize("data", [
    2**64, -(2**63) - 1, 2**63, 2**64 - 1, "\ud800", {1: "a"}, {"k": [True, None, ("t",)]},
    "".join(map(chr, range(0x200))) + "\u2028\u2029\ufeff\U0001f600\"\\/",
])
def test_edge_cases_are_written_as_json_dumps_wrote_them(data: Any) -> None:
    assert event_of(data).to_json() == reference_dumps(event_of(data).cloudevent)


def test_what_json_refused_to_write_is_still_refused() -> None:
    from datetime import UTC, datetime
    with pytest.raises(TypeError):
        event_of({"at": datetime(2026, 1, 1, tzinfo=UTC)}).to_json()


@given(text=any_text)
def test_json_bytes_counts_what_json_dumps_wrote(text: str) -> None:
    try:
        expected = len(json.dumps(text, ensure_ascii=False).encode()) - 2
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            wire.json_bytes(text)
        return
    assert wire.json_bytes(text) == expected


def test_printable_refuses_exactly_the_control_characters_it_refused() -> None:
    refused = re.compile(r"[\x00-\x1f\x7f-\x9f]")
    for code in range(0x110000):
        was_refused = code < 0x20 or 0x7F <= code <= 0x9F
        assert (refused.search(chr(code)) is not None) is was_refused
        if was_refused:
            with pytest.raises(ValueError, match="control"):
                wire._printable(f"id{chr(code)}")
    wire._printable("".join(chr(code) for code in range(0xA0, 0x2000)))


# -- FastStream's batch parser -------------------------------------------------------------


def consumer_record(offset: int, headers: list[tuple[str, bytes]]) -> Any:
    from aiokafka.structs import ConsumerRecord
    return ConsumerRecord("credit-note-commands", 0, offset, 1_764_000_000_000 + offset, 0,
                          b"in_1", b"{}", None, 2, 2, headers)


@pytest.mark.parametrize("bad_at", [None, 0, 1, 4])
async def test_the_batch_parser_gives_the_records_untouched_and_never_raises(
        bad_at: int | None) -> None:
    """A header that is not UTF-8 (first, middle or last record) never stops the batch."""
    from faststream.kafka.message import KafkaAckableMessage
    from faststream.kafka.parser import AioKafkaBatchParser

    from service.entrypoints.consumer import parse_records

    records = tuple(consumer_record(10 + index, [
        ("content-type", b"application/cloudevents+json"),
        *([("trace", b"\xff\xfe")] if index == bad_at else [])]) for index in range(5))
    headers_before = [list(record.headers) for record in records]
    parser = AioKafkaBatchParser(KafkaAckableMessage, None)
    message = await parse_records(records, parser.parse_batch)
    assert message.raw_message is records
    assert [list(record.headers) for record in records] == headers_before
    assert message.message_id == "10-14-1764000000010"  # first and last offsets, first time
    assert message.headers == {"content-type": "application/cloudevents+json"}
