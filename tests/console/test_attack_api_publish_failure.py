"""Attack, regression: an exception at the publish await (the ack lost, as when the
broker is paused past request_timeout_ms, or the connection drops after the broker
appended the record). The console must not say "nothing was sent": it answers 503
``unavailable`` "it may have been sent: retry with the same Idempotency-Key"; the
command's audit row says ``unknown:<error>`` (never ``failed``: the console does not
know) until it learns better; the retry with the same key is ``applied`` once (one
credit note), audited as a repeat, and the command's row then ends ``applied``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]
BODY: dict[str, Any] = {
    "invoice_id": "in_pf1", "reason": "product_unsatisfactory",
    "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]}


async def test_a_publish_whose_ack_is_lost_is_not_called_unsent_and_its_audit_is_true(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_pf1", paid=0, lines=LINES)
    producer = console.deps.producer
    real_send = producer.send
    calls = 0

    async def ack_lost(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        await real_send(*args, **kwargs)  # the broker appended it ...
        if calls == 1:
            raise KafkaTimeoutError()      # ... but the console never heard so

    producer.send = ack_lost  # type: ignore[method-assign]
    operator = console.operator()
    key = new_key()
    first = await operator.post("/api/v1/credit-notes", json=BODY,
                                headers={"Idempotency-Key": key})
    # the service applies what was sent
    deadline = time.monotonic() + 30
    while not await fetch(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_pf1'"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert first.status_code == 503
    assert "nothing was sent" not in first.json()["error"]["message"], (
        "the console told the user nothing was sent, and the credit note was issued")

    again = await operator.post("/api/v1/credit-notes", json=BODY,
                                headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["status"] == "applied", again.text
    assert "may have been sent" in first.json()["error"]["message"]
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_pf1'")
               ) == 1
    [row] = await fetch(settings, "SELECT outcome, request_digest FROM console_audit WHERE "
                        "actor = $1 AND idempotency_key = $2", OPERATOR, key)
    assert row["outcome"] == "applied", (
        f"the command's audit row says {row['outcome']!r}; the credit note was issued")
    repeats = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 AND "
                          "idempotency_key IS NULL AND request_digest = $2",
                          OPERATOR, row["request_digest"])
    assert [repeat["outcome"] for repeat in repeats] == ["repeat:applied"]
    polled = await operator.get(f"/api/v1/commands/{key}")
    assert polled.json()["status"] == "applied", polled.text
