"""The console's pure parts: the field a dead letter's message names, note cursors,
where a NUL is, the refusal body, every code's status."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from urllib.parse import quote

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


@given(at=st.datetimes(timezones=st.just(UTC)),
       note_id=st.text(st.characters(exclude_characters="\x00"), max_size=40))
def test_a_cursor_gives_back_what_it_holds(at: datetime, note_id: str) -> None:
    assert actions._note_cursor(actions._encode_cursor(at, note_id)) == (at, note_id)


def test_a_cursor_holding_a_nul_is_refused_before_postgresql_sees_it() -> None:
    page = actions._encode_cursor(datetime(2026, 1, 1, tzinfo=UTC), "cn\x00")
    with pytest.raises(ConsoleError) as refusal:
        actions._note_cursor(page)
    assert (refusal.value.code, refusal.value.field) == ("invalid_request", "page")


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


@pytest.mark.parametrize("key", ["k", "A-1_b.c:d-e", "x" * 200, "0", "SUP-1234-1", "-x", "_Ab9"])
def test_a_key_of_the_alphabet_is_taken(key: str) -> None:
    assert actions.check_key(key) == key


@given(st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=210))
def test_a_key_is_taken_only_if_its_location_routes_back_to_it(key: str) -> None:
    """The Location /api/v1/commands/<key> is routed after percent-decoding as one path
    segment: a key is taken only if it is that segment, unchanged ('/', '.', '..', '%'
    and spaces are not)."""
    try:
        taken = actions.check_key(key)
    except ConsoleError as refusal:
        assert refusal.code == "idempotency_key_invalid"  # noqa: PT017
        return
    assert quote(taken, safe=":") == taken and taken not in (".", "..") and len(taken) <= 200


@pytest.mark.parametrize(("key", "code"), [
    (None, "idempotency_key_required"), ("", "idempotency_key_required"),
    ("x" * 201, "idempotency_key_invalid"), ("é", "idempotency_key_invalid"),
    ("a\nb", "idempotency_key_invalid"), ("\x7f", "idempotency_key_invalid"),
    ("order/1", "idempotency_key_invalid"), (".", "idempotency_key_invalid"),
    ("..", "idempotency_key_invalid"), (" ~", "idempotency_key_invalid"),
    (".x", "idempotency_key_invalid"), ("100%", "idempotency_key_invalid")])
def test_a_missing_or_malformed_key_is_refused(key: str | None, code: str) -> None:
    with pytest.raises(ConsoleError) as refusal:
        actions.check_key(key)
    assert refusal.value.code == code and refusal.value.status == 400


@given(st.binary(min_size=18, max_size=18))
def test_every_key_the_pages_make_is_taken(raw: bytes) -> None:
    """The pages' forms carry ``secrets.token_urlsafe(18)``: each such key is valid."""
    key = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert actions.check_key(key) == key
