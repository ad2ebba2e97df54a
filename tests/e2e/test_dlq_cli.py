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

    # the unparseable record is held back, not republished to fail again
    again = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq")
    assert again.returncode == 6, again.stderr
    assert "cannot be parsed as a CloudEvent" in again.stdout
    assert "republished 0, already replayed 1," in again.stdout
    await kafka.settle(1.0)
    assert len(kafka.on(f"{commands}.dlq")) == 2

    forced = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq", "--force")
    assert "republished 1," in forced.stdout
    if forced.returncode != 0:  # the service was quick: it failed again while the run read on
        assert forced.returncode == 6, forced.stderr
        assert "this run already replayed the same record" in forced.stdout
    await kafka.expect(f"{commands}.dlq", count=3)  # the invalid record fails again, as it should

    # dead-lettered again after a replay: not replayed again unforced
    third = await creditnotes(settings, "dlq", "replay", f"{commands}.dlq")
    assert third.returncode == 6, third.stderr
    assert "replayed before and dead-lettered again" in third.stdout
    assert "republished 0, already replayed 2," in third.stdout, third.stdout
    await kafka.settle(1.5)
    assert len(kafka.on(f"{commands}.dlq")) == 3
    assert len(kafka.on(settings.topics.credit_note_events)) == 1
    audit = await fetch(settings, "SELECT reason, state FROM dlq_replays ORDER BY dlq_offset")
    assert sorted((row["reason"], row["state"]) for row in audit) == [
        ("invalid_message", "sent"), ("invoice_not_found", "sent")]
    for run in (listed, shown, dry, replayed, again, forced, third):
        assert "Traceback" not in run.stderr and "Unclosed" not in run.stderr, run.stderr
