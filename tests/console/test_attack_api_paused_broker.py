"""Attack: the broker frozen (SIGSTOP tansu) while the console publishes a command.

The design bounds a command's answer by CREDITNOTES_CONSOLE_WAIT_SECONDS (then 202 and
a Location to poll); the publish itself is awaited unbounded by it (aiokafka's
request_timeout_ms, 30 s), then the console answered 503 'nothing was sent' although
the record it handed over is applied once the broker wakes. Regression: the publish is
bounded by the wait (202 + Location, the send goes on), and the poll tells."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from service.settings import Settings
from tests.console.api_helpers import new_key, seed_invoice
from tests.support import Kafka, RunningService, fetch

pytestmark = pytest.mark.integration

WAIT = 2.0
LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
          "tax_rate_bps": 1_000}]


def body(invoice_id: str) -> dict[str, Any]:
    return {"invoice_id": invoice_id, "reason": "product_unsatisfactory",
            "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1", "quantity": 1}]}


def broker_pid(settings: Settings) -> int:
    port = urlsplit("//" + settings.kafka_bootstrap_servers.split(",")[0]).port
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port \
                and connection.pid:
            return int(connection.pid)
    raise AssertionError(f"no process listens on {port}")


@contextlib.contextmanager
def paused(pid: int) -> Iterator[Callable[[], None]]:
    os.kill(pid, signal.SIGSTOP)
    resumed = False

    def resume() -> None:
        nonlocal resumed
        if not resumed:
            os.kill(pid, signal.SIGCONT)
            resumed = True
    try:
        yield resume
    finally:
        resume()


async def test_a_publish_to_a_frozen_broker_answers_within_the_wait_and_honestly(
        service: RunningService, console_factory: Any, settings: Settings,
        kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_pb1", lines=LINES)
    await seed_invoice(settings, kafka, "in_pb2", lines=LINES)
    async with console_factory(console_wait_seconds=WAIT) as console:
        operator = console.operator(timeout=120)
        warm = await operator.post("/api/v1/credit-notes", json=body("in_pb1"),
                                   headers={"Idempotency-Key": new_key()})
        assert warm.status_code in (200, 202), warm.text  # the producer knows the topic
        key = new_key()
        with paused(broker_pid(settings)) as resume:
            began = time.monotonic()
            answer = await operator.post("/api/v1/credit-notes", json=body("in_pb2"),
                                         headers={"Idempotency-Key": key})
            took = time.monotonic() - began
            resume()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await fetch(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_pb2'"):
                break
            await asyncio.sleep(0.2)
        issued = bool(await fetch(settings,
                                  "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_pb2'"))
        assert took < WAIT + 5, (
            f"answered {answer.status_code} after {took:.1f} s with the broker frozen; "
            f"the wait is {WAIT} s")
        if issued:
            assert not (answer.status_code == 503
                        and "nothing was sent" in answer.json()["error"]["message"]), (
                "told 'nothing was sent' and the credit note was issued")
        # bounded by the wait: 202 and the Location; the poll then tells what became of it
        assert answer.status_code == 202, answer.text
        polled = await operator.get(answer.headers["location"])
        assert polled.json()["status"] == ("applied" if issued else "pending"), polled.text
