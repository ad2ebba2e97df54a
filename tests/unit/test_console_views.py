"""The console's pure parts: the field a dead letter's message names, note cursors,
where a NUL is, the refusal body, every code's status."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.entrypoints.console import actions
from service.entrypoints.console.errors import CODES, ConsoleError, refused
from service.entrypoints.console.views import failing_field


def test_the_failing_field_is_the_first_the_message_names() -> None:
    assert failing_field("invalid credit_note.issue data: lines.0.quantity: Input should be "
                         "a valid integer; amount: x") == "lines.0.quantity"
    assert failing_field("invalid CloudEvent: id: String should have at least 1 "
                         "character") == "id"
    assert failing_field("invalid credit_note.issue data: message: Value error, needs "
                         "exactly one of amount and lines") is None
    assert failing_field("the invoice has not been received (yet)") is None
    assert failing_field("") is None


@given(at=st.datetimes(timezones=st.just(UTC)), note_id=st.text(max_size=40))
def test_a_cursor_gives_back_what_it_holds(at: datetime, note_id: str) -> None:
    assert actions._note_cursor(actions._encode_cursor(at, note_id)) == (at, note_id)


@pytest.mark.parametrize("page", ["x", "e30", "WzEsMl0", "!!!", "W10"])
def test_a_cursor_not_made_here_is_refused(page: str) -> None:
    with pytest.raises(ConsoleError) as refusal:
        actions._note_cursor(page)
    assert (refusal.value.code, refusal.value.field) == ("invalid_request", "page")


def test_a_nul_is_found_and_no_key_from_the_body_is_shown() -> None:
    assert actions._nul_field({"memo": "a\x00"}) == "memo"
    assert actions._nul_field({"metadata": {"secret@mail": "\x00"}}) == "metadata.<key>"
    assert actions._nul_field({"lines": [{}, {"description": "\x00"}]}) == \
        "lines.1.description"
    assert actions._nul_field({"unknown": "\x00"}) == "<key>"
    assert actions._nul_field({"memo": "fine", "metadata": {"k": "v"}}) is None


def test_every_code_has_a_client_error_status_or_is_the_servers() -> None:
    for code, (status, meaning) in CODES.items():
        assert 400 <= status < 600 and meaning, code
        error = refused(code)
        assert (error.status, error.code, error.message) == (status, code, meaning)
    assert refused("invalid_message", "m", "amount").body() == {
        "error": {"code": "invalid_message", "message": "m", "field": "amount"}}
    assert "field" not in refused("forbidden").body()["error"]


@pytest.mark.parametrize("key", ["k", "A-1_b.c:d/e", "x" * 200, " ~"])
def test_a_key_of_printable_ascii_is_taken(key: str) -> None:
    assert actions.check_key(key) == key


@pytest.mark.parametrize(("key", "code"), [
    (None, "idempotency_key_required"), ("", "idempotency_key_required"),
    ("x" * 201, "idempotency_key_invalid"), ("é", "idempotency_key_invalid"),
    ("a\nb", "idempotency_key_invalid"), ("\x7f", "idempotency_key_invalid")])
def test_a_missing_or_malformed_key_is_refused(key: str | None, code: str) -> None:
    with pytest.raises(ConsoleError) as refusal:
        actions.check_key(key)
    assert refusal.value.code == code and refusal.value.status == 400
