"""Attack: the same dead letters replayed at once from two console replicas and the
`creditnotes dlq replay` CLI: each record replayed at most once, and the console audit
agrees with dlq_replays. (HOLDS on 5ffa49b: kept as a guard.) Regression guard."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.settings import Settings
from tests.console.conftest import OPERATOR, RunningConsole
from tests.console.test_api_dead_letters import dead_letters_of
from tests.support import Kafka, creditnotes, fetch

pytestmark = pytest.mark.integration


async def test_two_consoles_and_the_cli_replay_each_dead_letter_once(
        console: RunningConsole, console_factory: Any, settings: Settings,
        kafka: Kafka) -> None:
    await dead_letters_of(settings, kafka)
    dlq = f"{settings.topics.credit_note_commands}.dlq"
    async with console_factory() as other:
        other.deps.auth._tokens = console.deps.auth._tokens
        a, b = console.operator(timeout=120), other.client(console.operator_token, timeout=120)
        body = {"all_matching": True, "filters": {"reason": "invoice_not_found"}}
        *answers, cli = await asyncio.gather(
            a.post(f"/api/v1/dead-letters/{dlq}/replay", json=body),
            b.post(f"/api/v1/dead-letters/{dlq}/replay", json=body),
            a.post(f"/api/v1/dead-letters/{dlq}/replay", json=body),
            creditnotes(settings, "dlq", "replay", dlq, "--reason", "invoice_not_found"))
        assert all(answer.status_code == 200 for answer in answers), [x.text for x in answers]
        by_console = sum(answer.json()["republished"] for answer in answers)
        rows = await fetch(settings, "SELECT replayed_by, state FROM dlq_replays")
        assert len(rows) == 2 and {row["state"] for row in rows} == {"sent"}
        by_cli = sum(1 for row in rows if not row["replayed_by"].startswith("console:"))
        assert by_console + by_cli == 2, (by_console, by_cli, cli.stdout)
        audited = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 "
                              "AND action = 'replay'", OPERATOR)
        assert sum(int(row["outcome"].split("/")[0].split(":")[1]) for row in audited) \
            == by_console
