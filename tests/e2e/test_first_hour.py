"""The first hour of a new user: ``dev`` beside ``demo``, ``publish``, ops commands that find
the dev stack, and failures said in one line with their exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.devtools.devstack import free_port
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.e2e

CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))
EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"


def clean_environment(**overrides: str) -> dict[str, str]:
    """No ``CREDITNOTES_*`` from the test run: the command must find its servers itself."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    env.update(overrides)
    return env


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CREDITNOTES, *args], cwd=cwd, env=env or clean_environment(),
                          capture_output=True, text=True, timeout=timeout)


def eventually(check: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while True:
        result = check()  # type: ignore[operator]
        if result.returncode == 0 or time.monotonic() > deadline:
            return result  # type: ignore[no-any-return]
        time.sleep(0.5)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``creditnotes dev`` on the embedded servers, run from a fresh directory."""
    port = free_port()
    process = subprocess.Popen(
        [CREDITNOTES, "dev"], cwd=tmp_path, text=True, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "dev.log").open("w"),
        env=clean_environment(CREDITNOTES_HTTP_PORT=str(port),
                              CREDITNOTES_KAFKA_SESSION_TIMEOUT_MS="2000",
                              CREDITNOTES_KAFKA_HEARTBEAT_INTERVAL_MS="300"))
    servers_file = tmp_path / ".creditnotes" / "dev" / "servers.json"
    deadline = time.monotonic() + 120
    while not servers_file.exists():
        assert process.poll() is None, (tmp_path / "dev.log").read_text()
        assert time.monotonic() < deadline, "creditnotes dev did not start"
        time.sleep(0.3)
    yield process, port
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def ready(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
        return str(answer.read().decode().strip())


def test_dev_beside_demo_publish_and_ops_commands_that_find_the_dev_stack(
        tmp_path: Path, dev: tuple[subprocess.Popen[str], int]) -> None:
    process, port = dev
    banner = (tmp_path / "dev.log").read_text()
    assert "publish invoices schemas/examples/invoice.finalized.json" in banner
    assert "gone when dev stops" in banner  # says plainly what does not survive a restart

    second = cli(tmp_path, "dev")
    assert second.returncode == 2
    assert "in use by creditnotes dev" in second.stderr and "Traceback" not in second.stderr

    for topic, example in (("invoices", "invoice.finalized"),
                           ("invoices", "invoice.payment_succeeded")):
        published = cli(tmp_path, "publish", topic, str(EXAMPLES / f"{example}.json"))
        assert published.returncode == 0, published.stderr
        assert "key in_1001" in published.stdout
        assert "(from creditnotes dev" in published.stderr  # says which servers it used
    paid = eventually(lambda: _shows(tmp_path, "30.00 USD"))
    assert paid.returncode == 0, paid.stdout + paid.stderr
    command = cli(tmp_path, "publish", "credit-note-commands",
                  str(EXAMPLES / "credit_note.issue.json"))
    assert command.returncode == 0, command.stderr
    issued = eventually(lambda: _shows(tmp_path, "ACME-0001-CN-01"))
    assert issued.returncode == 0, issued.stdout + issued.stderr
    assert "6.00 USD" in issued.stdout  # the refund part, in major units with its currency

    demo = cli(tmp_path, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "every example matched docs/rules.md" in demo.stdout

    # the demo had its own servers: dev's are untouched and its topics still there
    assert process.poll() is None
    assert ready(port) == "ready"
    listed = cli(tmp_path, "dlq", "list", "credit-note-commands.dlq")
    assert listed.returncode == 0, listed.stderr
    again = cli(tmp_path, "invoice", "show", "in_1001")
    assert again.returncode == 0 and "ACME-0001-CN-01" in again.stdout

    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    assert not (tmp_path / ".creditnotes" / "dev" / "servers.json").exists()


def _shows(cwd: Path, text: str) -> subprocess.CompletedProcess[str]:
    shown = cli(cwd, "invoice", "show", "in_1001")
    if text not in shown.stdout:
        return subprocess.CompletedProcess(shown.args, 1, shown.stdout, shown.stderr)
    return shown


async def test_expected_failures_are_one_line_with_distinct_exit_codes(
        servers: Servers, tmp_path: Path) -> None:
    example = str(EXAMPLES / "invoice.finalized.json")
    broker = clean_environment(CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS=servers.bootstrap_servers)
    unreachable = f"127.0.0.1:{free_port()}"
    database = await create_database(servers.database_url)
    missing_database = database.rsplit("/", 1)[0] + "/no_such_database"
    try:
        cases = [
            (["publish", "no-such-topic", example], broker, 4, "no topic 'no-such-topic'"),
            (["publish", "invoices", str(tmp_path / "missing.json")], broker, 2, "no file"),
            (["publish", "invoices", example],
             clean_environment(CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS=unreachable), 3,
             f"cannot reach the broker at {unreachable}"),
            (["verify"], clean_environment(
                CREDITNOTES_DATABASE_URL=f"postgresql://u:s3cret@{unreachable}/db"), 3,
             f"cannot reach PostgreSQL at {unreachable}/db"),
            (["invoice", "show", "in_1"], clean_environment(
                CREDITNOTES_DATABASE_URL=missing_database), 4, "no database 'no_such_database'"),
            (["dlq", "list", "no-such.dlq"], broker, 4, "no topic 'no-such.dlq'"),
        ]
        for args, env, code, message in cases:
            done = cli(tmp_path, *args, env=env, timeout=120)
            assert done.returncode == code, (args, done.stdout, done.stderr)
            assert message in done.stderr, (args, done.stderr)
            assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
            debug = cli(tmp_path, *args, "--debug", env=env, timeout=120)
            assert debug.returncode != 0
        assert "Traceback" in debug.stderr  # --debug shows where it failed
    finally:
        await drop_database(servers.database_url, database.rsplit("/", 1)[1])


def test_every_command_documents_the_exit_codes(tmp_path: Path) -> None:
    for args in (["publish", "--help"], ["verify", "--help"], ["dlq", "replay", "--help"],
                 ["invoice", "show", "--help"]):
        shown = cli(tmp_path, *args)
        assert shown.returncode == 0
        assert "exit codes" in shown.stdout, args
    examples = json.loads((EXAMPLES / "invoice.finalized.json").read_text())
    assert examples["data"]["invoice"]["id"] == "in_1001"  # the key publish derives
