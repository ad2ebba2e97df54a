"""Attack (/work/notes/attack-crash): `creditnotes console` told to stop (SIGTERM sets
`stopping`) while a command's publish hangs on a frozen broker took ~30 s (aiokafka's
request timeout: the producer's flush, the pool waiting for the request's connection).
The stop is bounded: shutdown_timeout_seconds for the requests in flight, then
CLOSE_SECONDS for the pool and the producer; a request cut short answers 503
`unavailable` saying to poll or retry with the key (it was a bare 500). (What the audit
row says of such a command is the actions' side: tests/console/test_api_*.)"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service.entrypoints.console.server import CLOSE_SECONDS, Console
from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.console.conftest import console_settings
from tests.console.test_attack_api_paused_broker import LINES, body, broker_pid, paused
from tests.support import Kafka, RunningService

pytestmark = pytest.mark.integration

STOP = 2.0


async def test_stopping_with_a_publish_in_flight_is_bounded(
        service: RunningService, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_st1", lines=LINES)
    await seed_invoice(settings, kafka, "in_st2", lines=LINES)
    configured, _, operator_token = console_settings(
        settings, shutdown_timeout_seconds=STOP, console_wait_seconds=2.0)
    console = Console(configured)
    stopping = asyncio.Event()
    task = asyncio.create_task(console.run(stopping))
    await asyncio.wait_for(console.ready.wait(), 30)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{console.port}", timeout=120,
                               headers={"Authorization": f"Bearer {operator_token}"})
    try:
        warm = await client.post("/api/v1/credit-notes", json=body("in_st1"),
                                 headers={"Idempotency-Key": new_key()})
        assert warm.status_code in (200, 202), warm.text
        with paused(broker_pid(settings)) as resume:
            request = asyncio.create_task(client.post(
                "/api/v1/credit-notes", json=body("in_st2"),
                headers={"Idempotency-Key": new_key()}))
            await asyncio.sleep(1.0)
            began = time.monotonic()
            stopping.set()
            done, _ = await asyncio.wait([task], timeout=60)
            took = time.monotonic() - began
            resume()
            if not done:
                await asyncio.wait_for(task, 60)
        answer = await asyncio.wait_for(request, 60)
        assert took < STOP + 2 * CLOSE_SECONDS + 2, (
            f"the console took {took:.1f} s to stop (shutdown {STOP} s)")
        assert took < STOP + 5, f"the console took {took:.1f} s to stop (shutdown {STOP} s)"
        # 202 + Location, or a 503 that says to poll or retry with the key: never a bare 500
        # that leaves the audit row pending while the command is applied after all
        assert answer.status_code in (202, 503), (answer.status_code, answer.text)
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "unavailable"
            assert "retry with the same Idempotency-Key" in answer.json()["error"]["message"]
    finally:
        stopping.set()
        await client.aclose()
        if not task.done():
            await asyncio.wait_for(task, 60)
