"""Attack: a console replay whose request dies after records were republished (cancelled
at the await after dlq.replay: shutdown timeout, kill) leaves NO console_audit row: the
console's audit row of a replay is written only at the very end, with its outcome, so
"every action is audited" failed exactly when it matters (dlq_replays names
console:<user>, console_audit knew nothing). Regression: the row is begun 'pending'
before anything is republished and finished (shielded) with how it ended."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.entrypoints import dlq as dlq_module
from service.settings import Settings
from tests.console.conftest import OPERATOR, RunningConsole
from tests.console.test_api_dead_letters import dead_letters_of
from tests.support import Kafka, fetch

pytestmark = pytest.mark.integration


async def test_a_replay_cut_short_after_republishing_is_still_in_the_console_audit(
        console: RunningConsole, settings: Settings, kafka: Kafka,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await dead_letters_of(settings, kafka)
    dlq = f"{settings.topics.credit_note_commands}.dlq"
    real = dlq_module.replay

    async def then_cancelled(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise asyncio.CancelledError  # the request task cancelled at its next await

    monkeypatch.setattr(dlq_module, "replay", then_cancelled)
    answer = await console.operator(timeout=120).post(
        f"/api/v1/dead-letters/{dlq}/replay",
        json={"all_matching": True, "filters": {"reason": "invoice_not_found"}})
    assert answer.status_code >= 500
    sent = await fetch(settings, "SELECT 1 FROM dlq_replays WHERE replayed_by = $1",
                       f"console:{OPERATOR}")
    assert len(sent) == 2
    audited = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 AND "
                          "action = 'replay'", OPERATOR)
    assert audited, "two records republished by the console; its audit has no row of it"
    assert [row["outcome"] for row in audited] == ["interrupted:CancelledError"]
