"""Attack (/work/notes/attack-crash): PostgreSQL stops answering the console. Every
request that needs it gets 503 `unavailable` (a page: the error page), nothing is
published; it was a bare 500 `internal_error`."""

from __future__ import annotations

import asyncpg
import pytest

from service.settings import Settings
from tests.console.api_helpers import end_offsets, new_key
from tests.console.conftest import RunningConsole

pytestmark = pytest.mark.integration


async def test_a_write_without_postgresql_is_refused_503_unavailable_and_sends_nothing(
        bare_console: RunningConsole, settings: Settings) -> None:
    console = bare_console
    browser = await console.session(console.viewer_token)
    name = settings.database_url.rsplit("/", 1)[1].split("?")[0]
    admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
        operator = console.operator()
        answers = [
            await operator.post("/api/v1/credit-notes", headers={"Idempotency-Key": new_key()},
                                json={"invoice_id": "in_1", "reason": "other",
                                      "amount": 100, "credit_amount": 100}),
            await operator.post("/api/v1/credit-notes/cn_1/void",
                                headers={"Idempotency-Key": new_key()}),
            await operator.get("/api/v1/invoices/in_1"),
            await browser.get("/api/v1/me"),  # a session is looked up in PostgreSQL
        ]
        page = await browser.get("/")
        healthz = await console.client().get("/healthz")
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == \
        [(503, "unavailable")] * 4
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    assert healthz.status_code == 200  # alive: only readiness depends on PostgreSQL
    # and once PostgreSQL is back, so is the console (the session too)
    assert (await browser.get("/api/v1/me")).status_code == 200
