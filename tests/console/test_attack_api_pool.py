"""Attack (availability): while the service lags, each write waiting for its outcome
holds one of the console's 5 pooled connections for up to console_wait_seconds. Five
concurrent writes (one operator, well inside the rate limit) freeze every page and API
read, and /readyz answers 503 "database unreachable": the ingress drops the console."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.support import Kafka, RunningService


async def test_waiting_writes_do_not_starve_reads_or_readiness(
        settings: Settings, service: RunningService, kafka: Kafka, console_factory: Any) -> None:
    await seed_invoice(settings, kafka, "in_starve", paid=0)
    await service.stop()  # the service lags: no outcome arrives for a while
    async with console_factory(console_wait_seconds=6.0) as running:
        operator, viewer = running.operator(), running.viewer()
        writes = [asyncio.create_task(operator.post(
            "/api/v1/credit-notes", json={"invoice_id": "in_starve", "reason": "other",
                                          "amount": 100},
            headers={"Idempotency-Key": new_key()})) for _ in range(6)]
        await asyncio.sleep(1.0)  # the writes are published and waiting
        began = time.monotonic()
        ready = await running.client().get("/readyz")
        read = await viewer.get("/api/v1/credit-notes")
        took = time.monotonic() - began
        answers = await asyncio.gather(*writes)
        assert all(answer.status_code == 202 for answer in answers), [a.text for a in answers]
        assert ready.status_code == 200, ready.text
        assert read.status_code == 200
        assert took < 2.0, f"a read and /readyz took {took:.1f} s behind waiting writes"
