"""Attack (lead, from the hostile-client report), regression: a same-key retry after
retention pruned the command's ``processed_messages`` row was published again and had a
second effect (the service, having forgotten the command, applies it anew). Once the
command's audit row holds its final outcome, a retry is answered from it and never
published again: the same answer, nothing on the topic, one credit note."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key, seed_invoice
from tests.console.conftest import RunningConsole
from tests.support import Kafka, fetch

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]
BODY: dict[str, Any] = {
    "invoice_id": "in_rt1", "reason": "product_unsatisfactory",
    "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]}


async def forget(settings: Settings, source: str, key: str) -> None:
    """What retention does to a processed command after its horizon (triggers bypassed:
    the row is younger than a day here)."""
    connection = await asyncpg.connect(settings.database_url)
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            deleted = await connection.execute(
                "DELETE FROM processed_messages WHERE source = $1 AND id = $2", source, key)
        assert deleted == "DELETE 1"
    finally:
        await connection.close()


async def test_a_retry_after_the_ledger_forgot_the_command_is_answered_not_republished(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_rt1", paid=0, lines=LINES)
    operator = console.operator(timeout=60)
    key = new_key()
    first = await operator.post("/api/v1/credit-notes", json=BODY,
                                headers={"Idempotency-Key": key})
    if first.status_code == 202:  # the outcome came later: the poll learns it
        for _ in range(100):
            first = await operator.get(f"/api/v1/commands/{key}")
            if first.json()["status"] != "pending":
                break
    assert first.json()["status"] == "applied", first.text
    await forget(settings, first.json()["source"], key)
    before = await end_offsets(settings, settings.topics.credit_note_commands)

    again = await operator.post("/api/v1/credit-notes", json=BODY,
                                headers={"Idempotency-Key": key})
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "applied"
    assert again.json()["credit_note"]["id"] == first.json()["credit_note"]["id"]
    polled = await operator.get(f"/api/v1/commands/{key}")
    assert polled.json()["status"] == "applied", polled.text
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_rt1'")
               ) == 1
