"""``creditnotes dlq`` as an operator meets it: one-line errors with distinct exit codes,
record bytes that cannot inject terminal markup, output that is not wrapped (15.7, 10.7)."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from service.devtools.devstack import free_port
from service.devtools.stack import EMBEDDED_BROKER_GROUP_TIMEOUTS
from service.settings import Settings
from tests.integration.test_dlq_replay_security import dead_letter_headers, issue
from tests.support import CREDITNOTES, Kafka, creditnotes

pytestmark = pytest.mark.e2e


async def run_with(settings: Settings, env_extra: dict[str, str],
                   *args: str) -> subprocess.CompletedProcess[str]:
    """Like ``creditnotes`` but with no COLUMNS (as when piped) and extra variables."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_") and name != "COLUMNS"}
    for name, value in settings.model_dump().items():
        if name.startswith("topic_") or name in {"database_url", "kafka_bootstrap_servers",
                                                 *EMBEDDED_BROKER_GROUP_TIMEOUTS}:
            env[f"CREDITNOTES_{name.upper()}"] = str(value)
    env |= env_extra
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines()
             if not line.startswith("creditnotes dlq: broker ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_expected_failures_are_one_line_with_distinct_exit_codes(
        settings: Settings) -> None:
    servers = settings.kafka_bootstrap_servers
    missing = await creditnotes(settings, "dlq", "list", "credit-note-command.dlq")
    assert missing.returncode == 4
    assert one_line_error(missing) == (
        f"creditnotes dlq: no topic 'credit-note-command.dlq' on the broker at {servers}")

    for command in ("list", "show", "replay"):
        normal = await creditnotes(settings, "dlq", command, settings.topics.returns)
        assert normal.returncode == 5, normal.stderr
        assert "is not a dead-letter topic" in one_line_error(normal)
    output = await creditnotes(settings, "dlq", "replay",
                               f"{settings.topics.credit_note_events}.dlq")
    assert output.returncode == 5
    assert "not the dead-letter topic of an input topic" in one_line_error(output)

    nowhere = await run_with(settings, {"CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS":
                                        f"127.0.0.1:{free_port()}"},
                             "dlq", "list", f"{settings.topics.returns}.dlq")
    assert nowhere.returncode == 3
    assert "cannot reach the broker at 127.0.0.1:" in one_line_error(nowhere)
    no_database = await run_with(settings, {"CREDITNOTES_DATABASE_URL":
                                            f"postgresql://u:s3cret@127.0.0.1:{free_port()}/x"},
                                 "dlq", "replay", f"{settings.topics.returns}.dlq")
    assert no_database.returncode == 3
    line = one_line_error(no_database)
    assert "cannot reach PostgreSQL at 127.0.0.1:" in line and "s3cret" not in line

    debug = await creditnotes(settings, "dlq", "list", "nope.dlq", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr

    helped = await creditnotes(settings, "dlq", "replay", "--help")
    assert "exit codes:" in helped.stdout and "4  no such topic" in helped.stdout


async def test_record_bytes_cannot_inject_markup_or_control_sequences(
        settings: Settings, kafka: Kafka) -> None:
    commands = settings.topics.credit_note_commands
    fake_ok = "[link=https://evil.example]OK to replay[/link]"
    event = issue("in_6001")
    event["data"]["memo"] = "[/bold] \x1b[2J\u202e[bold red]wiped"
    headers = dead_letter_headers(commands, reason="[/bold]",
                                  extra=[("x-note", f"[bold]{fake_ok}\x1b]8;;x\x07".encode())])
    headers = [(name, value.replace(b"3", b"[/]")) if name == "dlq.attempts" else (name, value)
               for name, value in headers]
    await kafka.publish(f"{commands}.dlq", event, key="[/bold]in_6001", headers=headers)
    await kafka.expect(f"{commands}.dlq")

    for args in (("list",), ("show",), ("replay", "--dry-run")):
        result = await run_with(settings, {"FORCE_COLOR": "1"}, "dlq", *args, f"{commands}.dlq")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert "[/bold]" in result.stdout
        assert "\x1b]8;" not in result.stdout and "\x1b[2J" not in result.stdout
        assert "\u202e" not in result.stdout
        assert "key=[/bold]in_6001" in result.stdout or "[/bold]in_6001" in result.stdout
    shown = await run_with(settings, {"FORCE_COLOR": "1"}, "dlq", "show", f"{commands}.dlq")
    assert fake_ok in shown.stdout
    assert "\\u202e[bold red]wiped" in shown.stdout  # the value, escaped, not styled
    assert "\\x1b]8;;x\\x07" in shown.stdout  # a header's control bytes, escaped


async def test_piped_output_is_not_wrapped_and_dry_run_rechecks(
        settings: Settings, kafka: Kafka) -> None:
    commands = settings.topics.credit_note_commands
    await kafka.publish(f"{commands}.dlq", issue("in_7001"), key="in_7001",
                        headers=dead_letter_headers(commands, extra=[
                            ("dlq.error.message", b"no invoice with this id " + b"x" * 150)]))
    await kafka.publish(f"{commands}.dlq", b"{not a cloudevent", key="in_7002",
                        headers=dead_letter_headers(commands, reason="invalid_message"))
    await kafka.expect(f"{commands}.dlq", count=2)

    listed = await run_with(settings, {}, "dlq", "list", f"{commands}.dlq")
    assert listed.returncode == 0, listed.stderr
    [line] = [line for line in listed.stdout.splitlines() if "key=in_7001" in line]
    assert "Z" in line and "x" * 150 in line  # the timestamp and the message, on one line

    dry = await run_with(settings, {}, "dlq", "replay", f"{commands}.dlq", "--dry-run")
    assert dry.returncode == 6, dry.stderr
    assert "would replay 1," in dry.stdout
    [held] = [line for line in dry.stdout.splitlines() if 'key="in_7002"' in line]
    assert "cannot be parsed as a CloudEvent" in held
    forced = await run_with(settings, {}, "dlq", "replay", f"{commands}.dlq", "--dry-run",
                            "--force")
    assert forced.returncode == 0, forced.stderr
    assert "would replay 2," in forced.stdout
    for run in (listed, dry, forced):
        assert "Unclosed" not in run.stderr and "Traceback" not in run.stderr, run.stderr
