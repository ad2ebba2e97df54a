"""Attack: the request task cancelled at an await of the write path (what uvicorn does to
requests still running when its graceful-shutdown timeout ends, and what a kill -9 leaves
behind), then the user polls the Location or does nothing.

1. cancelled at the publish (before anything reached the broker): the audit row must not
   stay 'pending' and GET /api/v1/commands/{key} must not answer 'pending' for ever: the
   row says 'unknown:CancelledError' and the poll 'unknown' with the advice to retry with
   the same key (which then has its one effect).
2. a client that hangs up mid-wait: uvicorn does not cancel the route, which finishes
   the audit with the real outcome (this one HOLDS; kept as a guard).
Regression tests of the console's write path."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key, seed_invoice
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, RunningService, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]


def body(invoice_id: str) -> dict[str, Any]:
    return {"invoice_id": invoice_id, "reason": "product_unsatisfactory",
            "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]}


async def audit_outcome(settings: Settings, key: str) -> str:
    [row] = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 AND "
                        "idempotency_key = $2", OPERATOR, key)
    return str(row["outcome"])


async def test_a_command_cancelled_before_it_was_published_is_not_pending_for_ever(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_cc1", lines=LINES)
    producer = console.deps.producer
    real_send = producer.send

    async def cancelled(*args: Any, **kwargs: Any) -> None:
        raise asyncio.CancelledError  # the request task cancelled at this await

    producer.send = cancelled  # type: ignore[method-assign]
    operator = console.operator()
    key = new_key()
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    answer = await operator.post("/api/v1/credit-notes", json=body("in_cc1"),
                                 headers={"Idempotency-Key": key})
    assert answer.status_code >= 500
    producer.send = real_send  # type: ignore[method-assign]
    await asyncio.sleep(console.settings.console_wait_seconds + 1)
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    polled = await operator.get(f"/api/v1/commands/{key}")
    assert not (polled.status_code == 202 or polled.json().get("status") == "pending"), (
        f"nothing was published, yet the poll says {polled.json()} (it will for ever)")
    assert await audit_outcome(settings, key) != "pending", "the audit row is pending for ever"
    assert polled.json()["status"] == "unknown" and "same Idempotency-Key" in \
        polled.json()["message"], polled.text
    again = await operator.post("/api/v1/credit-notes", json=body("in_cc1"),
                                headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["status"] == "applied", again.text


async def test_a_client_that_hangs_up_mid_wait_still_gets_its_command_audited(
        bare_console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    console = bare_console
    async with RunningService(settings):
        await seed_invoice(settings, kafka, "in_cc2", lines=LINES)
    key = new_key()
    client = console.operator(timeout=1.0)
    with pytest.raises(httpx.TimeoutException):  # hangs up while the console waits
        await client.post("/api/v1/credit-notes", json=body("in_cc2"),
                          headers={"Idempotency-Key": key})
    async with RunningService(settings):  # the outcome comes after the hang-up
        deadline = time.monotonic() + console.settings.console_wait_seconds + 5
        while await audit_outcome(settings, key) == "pending":
            assert time.monotonic() < deadline, "the audit of a hung-up request stays pending"
            await asyncio.sleep(0.2)
    assert await audit_outcome(settings, key) == "applied"
