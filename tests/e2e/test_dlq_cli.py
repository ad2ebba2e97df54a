"""``creditnotes dlq list|show|replay`` run as an operator would, against the real service."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support import Kafka, RunningService, cloudevent, fetch, invoice_data

pytestmark = pytest.mark.e2e
CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))


async def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``creditnotes dlq ...`` without blocking the loop the in-process service runs on."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    for name, value in settings.model_dump().items():
        if name.startswith("topic_") or name in {"database_url", "kafka_bootstrap_servers",
                                                 "consumer_group"}:
            env[f"CREDITNOTES_{name.upper()}"] = str(value)
    env["COLUMNS"] = "200"
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, "dlq", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def test_ops_list_show_and_replay_a_dead_letter_once_its_invoice_exists(
        service: RunningService, kafka: Kafka, settings: Settings) -> None:
    commands = settings.topics.credit_note_commands
    early = cloudevent("credit_note.issue", {"invoice_id": "in_1001", "amount": 2_500},
                       id_="early-credit")
    await kafka.publish(commands, early)
    await kafka.publish(commands, b"definitely not json", key="in_1001")
    await kafka.expect(f"{commands}.dlq", count=2, timeout_s=30)

    listed = await cli(settings, "list", f"{commands}.dlq")
    assert listed.returncode == 0, listed.stderr
    assert "invoice_not_found" in listed.stdout
    assert "invalid_message" in listed.stdout
    assert "2 dead letter(s)" in listed.stdout

    shown = await cli(settings, "show", f"{commands}.dlq", "--reason", "invalid_message")
    assert shown.returncode == 0, shown.stderr
    assert "definitely not json" in shown.stdout
    assert "dlq.original.topic" in shown.stdout

    await kafka.publish(settings.topics.invoices,
                        cloudevent("invoice.finalized", invoice_data("in_1001")))
    dry = await cli(settings, "replay", f"{commands}.dlq", "--reason", "invoice_not_found",
              "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 1" in dry.stdout
    await kafka.settle(1.0)
    assert kafka.on(settings.topics.credit_note_events) == []

    replayed = await cli(settings, "replay", f"{commands}.dlq", "--reason", "invoice_not_found")
    assert replayed.returncode == 0, replayed.stderr
    assert "republished 1" in replayed.stdout
    [issued] = await kafka.expect(settings.topics.credit_note_events, "credit_note.issued")
    assert issued.event["data"]["trigger"]["id"] == "early-credit"

    again = await cli(settings, "replay", f"{commands}.dlq")
    assert again.returncode == 0, again.stderr
    assert "republished 1," in again.stdout  # the invalid one, left out by the first filter
    await kafka.expect(f"{commands}.dlq", count=3)  # the invalid record fails again, as it should

    third = await cli(settings, "replay", f"{commands}.dlq", "--reason", "invoice_not_found")
    assert "republished 0," in third.stdout
    await kafka.settle(1.5)
    assert len(kafka.on(settings.topics.credit_note_events)) == 1
    audit = await fetch(settings, "SELECT reason FROM dlq_replays ORDER BY dlq_offset")
    assert sorted(row["reason"] for row in audit) == ["invalid_message", "invoice_not_found"]
