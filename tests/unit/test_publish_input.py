"""``creditnotes publish``: what it accepts, the key it picks, and that a bad file sends nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.entrypoints import publish

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
INPUT_EXAMPLES = ["invoice.finalized", "invoice.payment_succeeded", "invoice.voided",
                  "invoice.marked_uncollectible", "credit_note.issue", "return.received",
                  "sla.breached", "subscription.downgraded", "subscription.canceled"]


@pytest.mark.parametrize("name", INPUT_EXAMPLES)
def test_every_shipped_input_example_is_publishable_with_its_invoice_as_key(name: str) -> None:
    events = publish.read_events(str(EXAMPLES / f"{name}.json"))
    [outgoing] = publish.prepare(events, key=None, raw=False)
    assert outgoing.key == "in_1001"


def test_an_array_and_json_lines_are_published_in_order(tmp_path: Path) -> None:
    one = {"specversion": "1.0", "id": "a", "source": "/s", "type": "invoice.voided",
           "data": {"invoice_id": "in_1"}}
    two = {**one, "id": "b", "data": {"invoice_id": "in_2"}}
    (tmp_path / "array.json").write_text(json.dumps([one, two]))
    (tmp_path / "lines.jsonl").write_text(json.dumps(one) + "\n\n" + json.dumps(two) + "\n")
    for name in ("array.json", "lines.jsonl"):
        prepared = publish.prepare(publish.read_events(str(tmp_path / name)), None, raw=False)
        assert [event.key for event in prepared] == ["in_1", "in_2"]


def test_a_given_key_wins_and_a_void_without_an_invoice_uses_its_subject() -> None:
    void = {"specversion": "1.0", "id": "v", "source": "/s", "type": "credit_note.void",
            "subject": "in_9", "data": {"credit_note_id": "cn_1"}}
    assert publish.prepare([void], None, raw=False)[0].key == "in_9"
    assert publish.prepare([void], "in_7", raw=False)[0].key == "in_7"


def test_a_file_with_one_bad_envelope_publishes_nothing_and_says_which() -> None:
    good = {"specversion": "1.0", "id": "a", "source": "/s", "type": "t", "data": {}}
    with pytest.raises(publish.PublishError, match="event 2 would be dead-lettered as invalid_message"):
        publish.prepare([good, {"id": "no envelope"}], None, raw=False)
    assert len(publish.prepare([good, {"id": "no envelope"}], None, raw=True)) == 2


def test_unreadable_input_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(publish.PublishError, match="no file"):
        publish.read_events(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{]")
    with pytest.raises(publish.PublishError, match="not JSON"):
        publish.read_events(str(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(publish.PublishError, match="nothing to publish"):
        publish.prepare(publish.read_events(str(tmp_path / "empty.json")), None, raw=False)
