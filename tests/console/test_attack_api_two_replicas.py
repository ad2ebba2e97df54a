"""Attack: two console replicas (same DB and broker) get the same user's command with one
Idempotency-Key at the same moment, and the same key with two bodies. (HOLDS on 5ffa49b:
kept as a guard.) Regression guard."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]


def body(quantity: int) -> dict[str, Any]:
    return {"invoice_id": "in_rp1", "reason": "product_unsatisfactory",
            "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1",
                       "quantity": quantity}]}


async def test_one_key_on_two_replicas_at_once_has_one_effect_and_one_body(
        console: RunningConsole, console_factory: Any, settings: Settings,
        kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_rp1", lines=LINES)
    async with console_factory() as other:
        # the same users on both (a token configured on both replicas)
        token = console.operator_token
        other.deps.auth._tokens = console.deps.auth._tokens
        a, b = console.client(token), other.client(token)
        key = new_key()
        answers = await asyncio.gather(*[
            client.post("/api/v1/credit-notes", json=body(1), headers={"Idempotency-Key": key})
            for _ in range(4) for client in (a, b)])
        assert {answer.status_code for answer in answers} == {200}, [a.text for a in answers]
        assert len({answer.json()["credit_note"]["id"] for answer in answers}) == 1
        assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1
        [row] = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 AND "
                            "idempotency_key = $2 AND outcome NOT LIKE 'refused:%'",
                            OPERATOR, key)
        assert row["outcome"] == "applied"

        other_key = new_key()
        answers = await asyncio.gather(
            a.post("/api/v1/credit-notes", json=body(2), headers={"Idempotency-Key": other_key}),
            b.post("/api/v1/credit-notes", json=body(3), headers={"Idempotency-Key": other_key}))
        assert sorted(answer.status_code for answer in answers) == [200, 409]
        assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 2
