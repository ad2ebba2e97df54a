"""Attack: `creditnotes console` killed -9 while it waits for a command's outcome, then the
user retries with the same Idempotency-Key on another replica. One effect, the real
outcome, and the first attempt's audit row finished by the retry. (HOLDS on 5ffa49b: kept
as a guard.) Regression guard (uses test_console_process's helpers)."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import httpx
import pytest

from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.console.conftest import OPERATOR, running_console
from tests.console.test_console_process import (
    environment,
    free_port,
    make_token,
    wait_for_health,
)
from tests.support import CREDITNOTES, Kafka, RunningService, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]
BODY = {"invoice_id": "in_k9", "reason": "product_unsatisfactory",
        "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]}


async def test_a_console_killed_mid_wait_then_a_retry_on_another_replica_has_one_effect(
        settings: Settings, kafka: Kafka) -> None:
    async with RunningService(settings):
        await seed_invoice(settings, kafka, "in_k9", lines=LINES)
    token, entry = make_token(OPERATOR, "operator")
    port = free_port()
    env = environment(settings, CREDITNOTES_CONSOLE_PORT=str(port),
                      CREDITNOTES_CONSOLE_HOST="127.0.0.1", CREDITNOTES_CONSOLE_TOKENS=f"[{entry}]",
                      CREDITNOTES_CONSOLE_WAIT_SECONDS="30", CREDITNOTES_ALLOW_ANY_SOURCE="true")
    process = subprocess.Popen(  # noqa: ASYNC220
        [CREDITNOTES, "console"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True)
    key = new_key()
    try:
        await wait_for_health(f"http://127.0.0.1:{port}", process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            request = asyncio.ensure_future(client.post(
                "/api/v1/credit-notes", json=BODY, headers={"Idempotency-Key": key}))
            await asyncio.sleep(2)  # published; nobody consumes: it waits
            process.send_signal(signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                await request
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
    [row] = await fetch(settings, "SELECT outcome FROM console_audit WHERE idempotency_key = $1",
                        key)
    assert row["outcome"] == "pending"
    async with RunningService(settings), running_console(settings) as other:
        again = await other.operator().post("/api/v1/credit-notes", json=BODY,
                                            headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["status"] == "applied", again.text
    assert len(await fetch(settings, "SELECT 1 FROM credit_notes")) == 1
    rows = await fetch(settings, "SELECT outcome, idempotency_key FROM console_audit "
                       "WHERE actor = $1 AND action = 'issue' ORDER BY id", OPERATOR)
    assert [r["outcome"] for r in rows] == ["applied", "repeat:applied"]
