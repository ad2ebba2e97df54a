"""The ``creditnotes`` command line as a user runs it: separate processes, real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from service.devtools.devstack import free_port
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.e2e
CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))


def environment(**overrides: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    env.update(overrides)
    return env


@pytest.fixture
async def fresh_database(servers: Servers) -> Iterator[str]:
    url = await create_database(servers.database_url)
    yield url
    await drop_database(servers.database_url, url.rsplit("/", 1)[1])


def test_migrate_applies_once_and_then_reports_up_to_date(fresh_database: str) -> None:
    env = environment(CREDITNOTES_DATABASE_URL=fresh_database)
    first = subprocess.run([CREDITNOTES, "migrate"], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
    second = subprocess.run([CREDITNOTES, "migrate"], env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    assert "0001_initial.sql" in first.stdout
    assert "up to date" in second.stdout


def test_demo_prints_every_example_with_the_expected_figures(
        servers: Servers, fresh_database: str, tmp_path: Path) -> None:
    env = environment(CREDITNOTES_DATABASE_URL=fresh_database,
                      CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS=servers.bootstrap_servers,
                      CREDITNOTES_CONSUMER_GROUP=f"demo-{tmp_path.name}",
                      CREDITNOTES_KAFKA_SESSION_TIMEOUT_MS="2000",
                      CREDITNOTES_KAFKA_HEARTBEAT_INTERVAL_MS="300")
    done = subprocess.run([CREDITNOTES, "demo", "--data-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stdout + done.stderr
    for example in range(1, 19):
        assert f"Example {example}:" in done.stdout
    assert "Downgrade:" in done.stdout
    assert "every example matched docs/rules.md" in done.stdout
    assert "800.00 USD due, open" in done.stdout  # major units, labelled with the currency
    assert "exceeds_creditable_amount" in done.stdout
    assert "✗" not in done.stdout
    assert "19.20" in done.stdout  # example 11
    assert done.stdout.count("✓") == 33


def _children_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if str(data_dir) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_dev_runs_on_embedded_servers_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    port = free_port()
    process = subprocess.Popen(
        [CREDITNOTES, "dev", "--data-dir", str(data_dir)],
        env=environment(CREDITNOTES_HTTP_PORT=str(port), CREDITNOTES_LOG_FORMAT="json"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        ready = ""
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as reply:
                    ready = reply.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert ready.strip() == "ready"
        assert (data_dir / "postgres").is_dir()
        assert _children_using(data_dir), "the embedded PostgreSQL should be running"

        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "service stopped" in output
    deadline = time.monotonic() + 10
    while _children_using(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children_using(data_dir) == []
    broker_port = int(output.split("Kafka       127.0.0.1:")[1].split()[0])
    assert not [c for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == broker_port], (
        "the embedded broker should be stopped")


async def test_verify_reports_every_invariant_and_names_a_violation(
        fresh_database: str) -> None:
    import asyncpg

    from service.adapters.migrations import migrate
    from service.settings import MIGRATIONS_DIR

    await migrate(fresh_database, MIGRATIONS_DIR)
    env = environment(CREDITNOTES_DATABASE_URL=fresh_database, COLUMNS="200")
    clean = await asyncio.to_thread(subprocess.run, [CREDITNOTES, "verify"], env=env,
                                    capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "every invariant holds" in clean.stdout

    connection = await asyncpg.connect(fresh_database)
    try:
        await connection.execute(
            "INSERT INTO invoices (id, number, customer_id, currency, status, subtotal, discount,"
            " tax, total, customer_balance_applied, amount_paid, credit_note_count)"
            " VALUES ('in_9', 'ACME-9', 'cus', 'usd', 'open', 100, 0, 0, 100, 0, 0, 2)")
        async with connection.transaction():  # a payment the invoice does not count
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(
                "INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied,"
                " trigger_source, trigger_id) VALUES ('in_9', 1, 'pay_9', 40, 40, '/x', 'p-9')")
    finally:
        await connection.close()
    broken = await asyncio.to_thread(subprocess.run, [CREDITNOTES, "verify"], env=env,
                                     capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    lines = broken.stdout.splitlines()
    assert any("✗ numbers_not_gapless: invoice in_9:" in line for line in lines)
    assert any("✗ payments_disagree: invoice in_9: amount paid 0; its 1 payment(s) applied 40"
               in line for line in lines), broken.stdout
    # the payment went in with the triggers off, so the totals the checks read never counted it
    assert any("✗ totals_disagree: invoice_totals in_9: kept no row; its history adds up to"
               in line for line in lines), broken.stdout
    assert "3 violation(s)" in broken.stdout
