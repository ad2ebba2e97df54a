"""Attack, regression: replay filters or a selection over their limits (a reason over
200 characters, more than 1000 positions) are a 4xx with a code, never a 500, and the
refused write has its audit row: the API, the replay form and the list page."""

from __future__ import annotations

from typing import Any

import pytest

from tests.console.conftest import OPERATOR, RunningConsole


@pytest.mark.parametrize("selection", [
    {"all_matching": True, "filters": {"reason": "x" * 201}, "dry_run": True},
    {"all_matching": True, "filters": {"key": "k" * 1001}},
    {"positions": [f"0:{offset}" for offset in range(1001)]},
    {"positions": ["0:1"], "filters": {"since": "yesterday"}},
])
async def test_a_replay_over_the_limits_is_a_4xx_and_audited(
        bare_console: RunningConsole, selection: dict[str, Any]) -> None:
    topic = f"{bare_console.settings.topics.credit_note_commands}.dlq"
    pool = bare_console.deps.pool
    count = "SELECT count(*) FROM console_audit WHERE actor = $1 AND action LIKE 'replay%'"
    before = await pool.fetchval(count, OPERATOR)
    answer = await bare_console.operator().post(f"/api/v1/dead-letters/{topic}/replay",
                                                json=selection)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    assert await pool.fetchval(count, OPERATOR) == before + 1


async def test_a_too_long_reason_on_the_replay_form_is_a_4xx_and_audited(
        bare_console: RunningConsole) -> None:
    browser = await bare_console.session(bare_console.operator_token)
    csrf = bare_console.csrf_token(browser)
    topic = f"{bare_console.settings.topics.credit_note_commands}.dlq"
    count = "SELECT count(*) FROM console_audit WHERE actor = $1 AND action LIKE 'replay%'"
    before = await bare_console.deps.pool.fetchval(count, OPERATOR)
    answer = await browser.post(f"/dead-letters/{topic}/replay",
                                data={"csrf_token": csrf, "scope": "matching",
                                      "reason": "x" * 201, "dry_run": "1"})
    assert 400 <= answer.status_code < 500, answer.status_code
    assert await bare_console.deps.pool.fetchval(count, OPERATOR) == before + 1
    listed = await browser.get(f"/dead-letters/{topic}", params={"reason": "x" * 201})
    assert 400 <= listed.status_code < 500, listed.status_code
