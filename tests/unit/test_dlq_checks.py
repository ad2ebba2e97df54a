"""The dead-letter tool's pure checks: which records may be replayed, and how bytes are shown."""

from __future__ import annotations

import io
import json
import time
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from service.entrypoints.dlq import (
    KEY_LIMIT,
    Checked,
    DeadLetter,
    audit_key,
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
                                           b"", b"\xff", "٣".encode(), b"[/bold]",
                                           b"2147483647", b"2147483648", b"99999999999",
                                           b"9223372036854775807", b"9223372036854775808",
                                           b"reason\x00", b"r" * 100, b"r" * 101]),
                          st.binary(max_size=30),
                          st.integers(min_value=0, max_value=10**20).map(lambda n: str(n).encode()))


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
        # what the audit row holds: integer partition, bigint offset, a short plain reason
        assert checked.partition <= 2**31 - 1 and checked.offset <= 2**63 - 1
        reason = values["dlq.error.reason"].decode()
        assert len(reason) <= 100 and "\x00" not in reason and shown(reason) == reason
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


@pytest.mark.parametrize(("name", "value", "why"), [
    ("dlq.original.partition", b"2147483648", "over 2147483647"),
    ("dlq.original.partition", b"99999999999", "over 2147483647"),
    ("dlq.original.offset", b"9223372036854775808", "over 9223372036854775807"),
    ("dlq.error.reason", b"x" * 6000, "longer than 100"),
    ("dlq.error.reason", b"invoice_not_found\x00", "control characters"),
    ("dlq.error.reason", b"invoice\xe2\x80\x8bnot_found", "invisible"),
    ("dlq.error.reason", b"\xff\xfe", "invalid UTF-8"),
])
def test_what_the_audit_row_cannot_hold_is_refused(name: str, value: bytes, why: str) -> None:
    """Before, these passed the checks and failed the claim of every record of their chunk."""
    bad = {**GOOD, name: value}
    refusal = check_headers(letter(list(bad.items())), INPUT)
    assert isinstance(refusal, str) and why in refusal
    edge = {**GOOD, "dlq.original.partition": b"2147483647",
            "dlq.original.offset": b"9223372036854775807"}
    assert check_headers(letter(list(edge.items())), INPUT) == Checked(2**31 - 1, 2**63 - 1)


@given(st.one_of(st.none(), st.binary(max_size=2_000)))
def test_any_key_is_recorded_escaped_and_bounded(key: bytes | None) -> None:
    recorded = audit_key(letter(list(GOOD.items()), key=key))
    if not key:
        assert recorded is None
        return
    assert recorded is not None and "\x00" not in recorded and len(recorded) <= KEY_LIMIT + 3
    recorded.encode("utf-8")  # no lone surrogate
    if len(shown(key.decode("utf-8", "replace"))) <= KEY_LIMIT:
        assert recorded == shown(key.decode("utf-8", "replace"))


#: Drawn as nothing, or as a blank: the characters an attacker hides text with.
INVISIBLE = ["\U000E0041", "\U000E007F", "\u00ad", "\u180e", "\ufff9", "\ufffb",
             "\U0001D173", "\u034f", "\ufe0f", "\u3164", "\u115f", "\u2028", "\u00a0",
             "\u3000", "\ue000", "\U0010fffd", "\u2064"]


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
def test_invisible_characters_are_escaped(char: str) -> None:
    escaped = shown(f"in_1{char}")
    assert char not in escaped and escaped.startswith("in_1\\")
    assert int(escaped[6:], 16) == ord(char)  # \xNN, \uNNNN or \UNNNNNNNN


@given(st.text(alphabet=st.characters(codec=None)))
def test_shown_text_has_only_visible_characters(text: str) -> None:
    for char in shown(text):
        category = unicodedata.category(char)
        assert category not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}, hex(ord(char))
        assert category != "Zs" or char == " ", hex(ord(char))


def test_show_prints_the_whole_of_a_long_unbroken_value_and_key() -> None:
    value = json.dumps({"id": "ev-1", "data": {"memo": "A" * 1500 + "HIDDEN-PART"}}).encode()
    record = DeadLetter("t.dlq", 0, 0, 0, b"K" * 1500 + b"KEY-END", value,
                        (("dlq.error.reason", b"x"), ("x-note", b"N" * 1500 + b"NOTE-END")))
    for width in (80, 1000):
        out = io.StringIO()
        Console(file=out, soft_wrap=False, width=width, highlight=False).print(
            show_panel(record))
        rendered = out.getvalue()
        assert "…" not in rendered
        for end in ("HIDDEN-PART", "KEY-END", "NOTE-END"):
            assert end in rendered.replace("\n", "").replace("│", "").replace(" ", "") or (
                end in rendered), (width, end)


def test_show_of_a_record_with_many_headers_is_fast_and_counts_the_rest() -> None:
    record = DeadLetter("t.dlq", 0, 1, 0, b"k", b"{}",
                        tuple((f"h{i}", b"v") for i in range(30_000)))
    started = time.process_time()
    out = io.StringIO()
    Console(file=out, soft_wrap=False, width=1000).print(show_panel(record))
    assert time.process_time() - started < 2
    assert "h999: v" in out.getvalue() and "29000 more header(s)" in out.getvalue()
