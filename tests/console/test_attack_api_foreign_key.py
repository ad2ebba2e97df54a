"""Attack (hostile upstream), regression: anyone who may write credit-note-commands
(another upstream on the allow-list, a dev stack with allow-any) can publish as
``/console/<user>``: the entry ``/console/*`` admits every name (Kafka ACLs are the
boundary, docs/api.md). With a key the operator will use, the upstream's command is
processed first; the operator's later request with that key must not be answered with
the upstream's outcome as if it were theirs: it is refused 409 ``idempotency_key_reused``
(received from elsewhere), audited, nothing is published, and the poll does not show
the foreign outcome as the user's."""

from __future__ import annotations

import uuid

from service.settings import Settings
from tests.console.api_helpers import end_offsets, seed_invoice, wait_for_row
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, cloudevent, fetch


async def test_an_outcome_the_console_did_not_cause_is_not_answered_as_the_users(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await seed_invoice(settings, kafka, "in_pre", paid=0)
    key = f"ticket-{uuid.uuid4().hex[:6]}"
    source = f"/console/{OPERATOR}"
    await kafka.publish(settings.topics.credit_note_commands, cloudevent(
        "credit_note.issue", {"invoice_id": "in_pre", "reason": "other", "amount": 90_000},
        id_=key, source=source))
    await wait_for_row(settings, "SELECT 1 FROM processed_messages WHERE source = $1 AND id = $2",
                       source, key)
    before = await end_offsets(settings, settings.topics.credit_note_commands)

    operator = console.operator()
    answer = await operator.post(
        "/api/v1/credit-notes", json={"invoice_id": "in_pre", "reason": "other", "amount": 100},
        headers={"Idempotency-Key": key})
    body = answer.json()
    # what the operator asked was never sent; the console must not report it applied
    assert not (answer.status_code == 200 and body.get("status") == "applied"
                and body["credit_note"]["total"] != 100), body["credit_note"]["total"]
    assert answer.status_code == 409, answer.text
    assert body["error"]["code"] == "idempotency_key_reused"
    assert "elsewhere" in body["error"]["message"]
    assert await end_offsets(settings, settings.topics.credit_note_commands) == before
    rows = await fetch(settings, "SELECT outcome FROM console_audit WHERE actor = $1 AND "
                       "idempotency_key = $2", OPERATOR, key)
    assert [row["outcome"] for row in rows] == ["refused:idempotency_key_reused"]
    polled = await operator.get(f"/api/v1/commands/{key}")
    assert polled.status_code == 404 and polled.json()["error"]["code"] == "command_not_found"
