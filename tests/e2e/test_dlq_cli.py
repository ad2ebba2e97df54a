"""``creditnotes dlq list|show|replay`` run as an operator would, against the real service."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, creditnotes, fetch, invoice_data

pytestmark = pytest.mark.e2e


async def test_ops_list_show_and_replay_a_dead_letter_once_its_invoice_exists(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    commands = settings.topics.credit_note_commands
    early = cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 2_500},
                       id_="early-credit")
    await kafka.publish(commands, early)
    await kafka.publish(commands, b"definitely not json", key="in_1001")
    await kafka.expect(f"{commands}.dlq", count=2, timeout_s=30)

    listed = await creditnotes(settings, "dlq", "list", f"{commands}.dlq")
    assert listed.returncode == 0, listed.stderr
    assert "invoice_not_found" in listed.stdout
    assert "invalid_message" in listed.stdout
    assert "2 dead letter(s)" in listed.stdout

    shown = await creditnotes(settings, "dlq", "show", f"{commands}.dlq", "--reason", "invalid_message")
    assert shown.returncode == 0, shown.stderr
    assert "definitely not json" in shown.stdout
    assert "dlq.original.topic" in shown.stdout

    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data("in_1001")))
    dry = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq",
                            "--reason", "invoice_not_found", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 1" in dry.stdout
    await kafka.settle(1.0)
    assert kafka.on(settings.topics.credit_note_events) == []

    replayed = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq",
                                 "--reason", "invoice_not_found")
    assert replayed.returncode == 0, replayed.stderr
    assert "republished 1" in replayed.stdout
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert issued.event["data"]["trigger"]["id"] == "early-credit"

    again = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq")
    assert again.returncode == 0, again.stderr
    assert "republished 1," in again.stdout  # the invalid one, left out by the first filter
    await kafka.expect(f"{commands}.dlq", count=3)  # the invalid record fails again, as it should

    third = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq", "--reason", "invoice_not_found")
    assert "republished 0," in third.stdout
    await kafka.settle(1.5)
    assert len(kafka.on(settings.topics.credit_note_events)) == 1
    audit = await fetch(settings, "SELECT reason FROM dlq_replays ORDER BY dlq_offset")
    assert sorted(row["reason"] for row in audit) == ["invalid_message", "invoice_not_found"]
