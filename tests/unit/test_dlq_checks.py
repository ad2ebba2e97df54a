"""The dead-letter tool's pure checks: which records may be replayed, and how bytes are shown."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from service.entrypoints.dlq import (
    Checked,
    DeadLetter,
    check_headers,
    list_line,
    show_panel,
    shown,
)

INPUT = "returns"
GOOD = {"dlq.original.topic": b"returns", "dlq.original.partition": b"2",
        "dlq.original.offset": b"41", "dlq.error.reason": b"invoice_not_found",
        "dlq.failed_at": b"2026-11-29T12:00:00.123456Z"}

header_names = st.sampled_from([*GOOD, "dlq.attempts", "content-type", "ce_id", "x"])
header_values = st.one_of(st.sampled_from([*GOOD.values(), b"refund-requests", b"-1", b"1e3",
                                           b"", b"\xff", "٣".encode(), b"[/bold]"]),
                          st.binary(max_size=30))


def letter(headers: list[tuple[str, bytes]], key: bytes | None = b"in_1",
           value: bytes | None = b"{}") -> DeadLetter:
    return DeadLetter("returns.dlq", 0, 5, 0, key, value, tuple(headers))


def test_a_dead_letter_the_service_wrote_is_replayable_to_its_own_input() -> None:
    assert check_headers(letter(list(GOOD.items())), INPUT) == Checked(2, 41)


@given(st.lists(st.tuples(header_names, header_values), max_size=12))
def test_only_well_formed_headers_naming_the_input_topic_pass(
        headers: list[tuple[str, bytes]]) -> None:
    checked = check_headers(letter(headers), INPUT)
    names = [name for name, _ in headers]
    if isinstance(checked, Checked):
        for name in GOOD:
            assert names.count(name) == 1
        values = dict(headers)
        assert values["dlq.original.topic"] == b"returns"
        assert checked == Checked(int(values["dlq.original.partition"].decode("ascii")),
                                  int(values["dlq.original.offset"].decode("ascii")))
        assert values["dlq.original.partition"].isdigit()
    else:
        assert checked  # a refusal in words


def test_a_forged_target_topic_or_a_second_topic_header_is_refused() -> None:
    forged = {**GOOD, "dlq.original.topic": b"refund-requests"}
    assert "refund-requests" in str(check_headers(letter(list(forged.items())), INPUT))
    doubled = [*GOOD.items(), ("dlq.original.topic", b"refund-requests")]
    assert "appears 2 times" in str(check_headers(letter(doubled), INPUT))
    bad_offset = {**GOOD, "dlq.original.offset": b"12abc"}
    assert "not a non-negative integer" in str(check_headers(letter(list(bad_offset.items())),
                                                             INPUT))


@given(st.text())
def test_shown_text_has_no_control_or_bidi_characters(text: str) -> None:
    escaped = shown(text)
    assert not any(ord(char) < 0x20 or 0x7f <= ord(char) <= 0x9f for char in escaped)
    assert not any(char in escaped for char in "\u202e\u2066\u2067\u2068\u2069\u200f")


@given(st.text(), st.binary(max_size=40), st.text())
def test_any_record_renders_on_one_line_and_in_a_panel_without_markup(
        reason: str, value: bytes, message: str) -> None:
    record = letter([("dlq.error.reason", reason.encode()),
                     ("dlq.error.message", message.encode()),
                     ("[/bold]", b"[link=https://evil.example]OK to replay[/link]")],
                    key=b"[bold]", value=value)
    line = list_line(record)
    assert "\n" not in line and "\x1b" not in line
    output = io.StringIO()
    Console(file=output, width=300, force_terminal=True).print(show_panel(record))
    rendered = output.getvalue()
    assert "[link=https://evil.example]OK to replay[/link]" in rendered
    assert "[/bold]" in rendered and "[bold]" in rendered
    assert "\x1b]8;" not in rendered  # no terminal hyperlink was made
