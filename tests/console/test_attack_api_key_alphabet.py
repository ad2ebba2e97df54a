"""Attack (robustness), regression: the 202's Location /api/v1/commands/<key> is routed
after percent-decoding, so a key with '/' (or one that is '.' / '..') could never be
polled. The key alphabet is letters, digits, '.', '_', ':' and '-', not '.' first
(docs/api.md): such keys are refused 400 before anything is published (audited),
and every key of the alphabet can be polled back at its Location."""

from __future__ import annotations

import uuid

import pytest

from tests.console.api_helpers import end_offsets, seed_invoice
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, fetch

BODY = {"invoice_id": "in_slash", "reason": "other", "amount": 100}


@pytest.mark.parametrize("key", ["order/1", ".", "..", ".x", "a b", "100%", "a?b", "k#1"])
async def test_a_key_that_cannot_be_routed_back_is_refused_and_nothing_sent(
        console: RunningConsole, kafka: Kafka, key: str) -> None:
    settings = console.settings
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    answer = await console.operator().post("/api/v1/credit-notes", json=BODY,
                                           headers={"Idempotency-Key": key})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "idempotency_key_invalid"
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    audited = await fetch(settings, "SELECT 1 FROM console_audit WHERE actor = $1 AND "
                          "outcome = 'refused:idempotency_key_invalid'", OPERATOR)
    assert audited


async def test_the_location_of_a_command_answers_for_every_character_of_the_alphabet(
        console: RunningConsole, kafka: Kafka) -> None:
    await seed_invoice(console.settings, kafka, "in_slash", paid=0)
    key = f"-Order_1.{uuid.uuid4().hex[:8]}:a-b"
    api = console.operator()
    answer = await api.post("/api/v1/credit-notes", json=BODY,
                            headers={"Idempotency-Key": key})
    assert answer.status_code in (200, 202), answer.text
    location = answer.json()["location"]
    polled = await api.get(location)
    assert polled.status_code == 200, (location, polled.status_code, polled.text)
    assert polled.json()["key"] == key
