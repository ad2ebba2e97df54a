"""Dead letters through the API: grouped, listed and shown from the broker, and replayed
through the code of ``creditnotes dlq replay``: the same verdicts, the same audit rows, with
``console:<user>`` as the operator (real service, broker, PostgreSQL, and the real CLI)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service.settings import Settings
from tests.console.api_helpers import end_offsets, seed_invoice, wait_for_row
from tests.console.conftest import OPERATOR, RunningConsole
from tests.support import Kafka, cloudevent, creditnotes, fetch

pytestmark = pytest.mark.integration

LINES = [{"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000}]


async def dead_letters_of(settings: Settings, kafka: Kafka) -> list[Any]:
    topic = settings.topics.credit_note_commands
    for n, invoice_id in enumerate(("in_9001", "in_9002"), start=1):
        # for an invoice not received (yet): dead-lettered invoice_not_found after 3 s
        await kafka.publish(topic, cloudevent("credit_note.issue",
                                              {"invoice_id": invoice_id, "amount": 500},
                                              id_=f"late-{n}"))
    # and one that does not fit the contract: never replayable as it is
    await kafka.publish(topic, cloudevent("credit_note.issue",
                                          {"invoice_id": "in_9001", "amount": "5"},
                                          id_="bad-1"))
    return await kafka.expect(f"{topic}.dlq", count=3, timeout_s=60)


def verdict_lines(stdout: str) -> list[str]:
    """The CLI's verdict lines (not its summary)."""
    return [line for line in stdout.splitlines() if "  " in line and ":" in line.split()[0]]


async def test_dead_letters_are_grouped_listed_shown_and_replayed_as_the_cli_does(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    records = await dead_letters_of(settings, kafka)
    dlq = f"{settings.topics.credit_note_commands}.dlq"
    viewer, operator = console.viewer(), console.operator()

    groups = (await viewer.get("/api/v1/dead-letters")).json()
    counts = {(group["topic"], group["reason"]): group["count"] for group in groups}
    assert counts == {(dlq, "invoice_not_found"): 2, (dlq, "invalid_message"): 1}
    assert all(group["oldest_age_seconds"] >= 0 for group in groups)

    bad = (await viewer.get(f"/api/v1/dead-letters/{dlq}",
                            params={"reason": "invalid_message"})).json()
    [listed] = bad["items"]
    assert bad["next"] is None and listed["failing_field"] == "amount"
    shown = (await viewer.get(f"/api/v1/dead-letters/{dlq}/{listed['partition']}/"
                              f"{listed['offset']}")).json()
    headers = {header["name"]: header["value"] for header in shown["headers"]}
    assert headers["dlq.error.reason"] == "invalid_message"
    assert shown["payload_json"]["data"]["amount"] == "5"
    assert shown["failing_field"] == "amount" and shown["key"] == "in_9001"

    # paged one at a time: every dead letter once, in partition:offset order
    seen, after = [], None
    while True:
        page = (await viewer.get(f"/api/v1/dead-letters/{dlq}",
                                 params={"limit": 1, **({"after": after} if after else {})}
                                 )).json()
        seen += [item["position"] for item in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert sorted(seen) == sorted(f"{r.partition}:{r.offset}" for r in records)
    assert len(seen) == len(set(seen)) == 3

    await seed_invoice(settings, kafka, "in_9001", lines=LINES)
    await seed_invoice(settings, kafka, "in_9002", lines=LINES)
    invoice = (await viewer.get("/api/v1/invoices/in_9001")).json()
    assert invoice["dead_letters_read"] is True
    assert sorted(item["reason"] for item in invoice["dead_letters"]) == [
        "invalid_message", "invoice_not_found"]

    # a dry run: the CLI's verdicts, word for word
    cli = await creditnotes(settings, "dlq", "replay", dlq, "--dry-run")
    api = await operator.post(f"/api/v1/dead-letters/{dlq}/replay",
                              json={"all_matching": True, "dry_run": True})
    assert api.status_code == 200, api.text
    assert api.json()["lines"] == verdict_lines(cli.stdout)
    assert api.json()["would_replay"] == 2 and api.json()["held"] == 1
    assert await fetch(settings, "SELECT 1 FROM dlq_replays") == []
    assert (await viewer.post(f"/api/v1/dead-letters/{dlq}/replay",
                              json={"all_matching": True, "dry_run": True})).status_code == 403

    # one replayed from the console (chosen by position), the other by the CLI
    late_1 = next(r for r in records if r.event["id"] == "late-1")
    before = await end_offsets(settings, settings.topics.credit_note_commands)
    replayed = await operator.post(f"/api/v1/dead-letters/{dlq}/replay",
                                   json={"positions": [f"{late_1.partition}:{late_1.offset}"]})
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["republished"] == 1
    assert replayed.json()["verdicts"] == [
        {"position": f"{late_1.partition}:{late_1.offset}",
         "verdict": f"replayed to {settings.topics.credit_note_commands}"}]
    after_offsets = await end_offsets(settings, settings.topics.credit_note_commands)
    assert sum(after_offsets.values()) == sum(before.values()) + 1
    await wait_for_row(settings, "SELECT 1 FROM credit_notes WHERE trigger_id = 'late-1'")

    cli = await creditnotes(settings, "dlq", "replay", dlq, "--reason", "invoice_not_found")
    assert cli.returncode == 0, cli.stderr
    assert "already replayed 1" in cli.stdout
    await wait_for_row(settings, "SELECT 1 FROM credit_notes WHERE trigger_id = 'late-2'")
    rows = await fetch(settings, "SELECT replayed_by, state, reason, original_topic,"
                                 " dlq_topic FROM dlq_replays ORDER BY replayed_at")
    assert [dict(row) | {"replayed_by": row["replayed_by"].startswith("console:")}
            for row in rows] == [
        {"replayed_by": True, "state": "sent", "reason": "invoice_not_found",
         "original_topic": settings.topics.credit_note_commands, "dlq_topic": dlq},
        {"replayed_by": False, "state": "sent", "reason": "invoice_not_found",
         "original_topic": settings.topics.credit_note_commands, "dlq_topic": dlq}]
    assert rows[0]["replayed_by"] == f"console:{OPERATOR}"

    history = (await viewer.get("/api/v1/replays")).json()
    assert [row["replayed_by"] for row in history][-1] == f"console:{OPERATOR}"
    assert len(history) == 2
    audit = await fetch(settings, "SELECT action, outcome FROM console_audit WHERE actor = $1"
                                  " AND action LIKE 'replay%' ORDER BY id", OPERATOR)
    assert [(row["action"], row["outcome"]) for row in audit] == [
        ("replay_dry_run", "would_replay:2/held:1/refused:0"),
        ("replay", "replayed:1/held:0/refused:0")]


async def test_flow_health_names_lag_backlog_rejections_and_dead_letters(
        console: RunningConsole, settings: Settings, kafka: Kafka) -> None:
    await dead_letters_of(settings, kafka)
    started = time.monotonic()
    while True:
        health = (await console.viewer().get("/api/v1/health/flow")).json()
        if health["lag_total"] == 0 or time.monotonic() - started > 20:
            break
        await asyncio.sleep(0.2)
    assert health["consumer_group"] == settings.consumer_group
    assert health["lag_error"] is None and health["lag_total"] == 0
    assert {item["topic"] for item in health["lag"]} == set(settings.topics.inputs())
    dlq = f"{settings.topics.credit_note_commands}.dlq"
    reasons = {(item["topic"], item["reason"]): item["count"]
               for item in health["dead_letters"]}
    assert reasons == {(dlq, "invoice_not_found"): 2, (dlq, "invalid_message"): 1}
    decided = {(item["topic"], item["reason"]): item["count"]
               for item in health["dead_lettered"]}
    assert decided == {(settings.topics.credit_note_commands, "invoice_not_found"): 2}
    assert health["outbox_parked"] == 0 and health["refunds_pending"] == 0
    assert health["policies"] == []

    # an SLA breach asking for all of an invoice gets the policy's half: capped
    await seed_invoice(settings, kafka, "in_7001", lines=LINES)
    await kafka.publish(settings.topics.sla_breaches, cloudevent(
        "sla.breached", {"invoice_id": "in_7001", "sla_id": "sla-1", "credit_bps": 10_000}))
    await wait_for_row(settings, "SELECT 1 FROM credit_notes WHERE invoice_id = 'in_7001'")
    health = (await console.viewer().get("/api/v1/health/flow")).json()
    [policy] = health["policies"]
    assert (policy["trigger_type"], policy["credit_notes"], policy["total"],
            policy["invoices_at_cap"]) == ("sla.breached", 1, 5_000, 1)
    assert health["last_verify"] is None
    verified = await creditnotes(settings, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    health = (await console.viewer().get("/api/v1/health/flow")).json()
    assert health["last_verify"]["violations"] == 0
    assert health["last_verify"]["invariants"] == [] and health["last_verify"]["ran_by"]
