"""``creditnotes console`` as a process of its own, ``console token``, and the one-time
token ``creditnotes dev`` prints (real PostgreSQL and tansu; the command line run as
the operator would)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from service.settings import ConsoleToken, Settings
from tests.support import CREDITNOTES

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """The test's servers and topics, as ``CREDITNOTES_*`` variables, and ``overrides``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    for name, value in settings.model_dump().items():
        if name.startswith("topic_") or name in {"database_url", "kafka_bootstrap_servers",
                                                 "consumer_group"}:
            env[f"CREDITNOTES_{name.upper()}"] = str(value)
    env.update(overrides)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CREDITNOTES, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def make_token(name: str, role: str) -> tuple[str, str]:
    """``creditnotes console token``: the token and its entry (JSON)."""
    made = run("console", "token", "--name", name, "--role", role)
    lines = dict(line.split(maxsplit=1) for line in made.stdout.splitlines())
    return lines["token"], lines["entry"]


async def wait_for_health(base_url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the process ended before it answered"
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"{base_url}/healthz did not answer within 60 s")


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return output


def test_console_token_prints_a_token_once_and_the_entry_that_admits_it() -> None:
    made = run("console", "token", "--name", "ada", "--role", "operator")

    assert made.returncode == 0, made.stderr
    lines = dict(line.split(maxsplit=1) for line in made.stdout.splitlines())
    token, entry = lines["token"], json.loads(lines["entry"])
    assert entry == {"name": "ada", "role": "operator",
                     "sha256": hashlib.sha256(token.encode()).hexdigest()}
    assert ConsoleToken.model_validate(entry).role == "operator"
    assert token not in made.stderr and "CREDITNOTES_CONSOLE_TOKENS" in made.stderr
    assert make_token("ada", "operator")[0] != token  # a fresh one each time


def test_console_token_refuses_a_name_no_user_can_have() -> None:
    made = run("console", "token", "--name", "ada lovelace", "--role", "viewer")
    assert made.returncode == 2
    assert "not a user name" in made.stderr
    assert made.stdout == ""


def test_the_console_refuses_to_start_when_nobody_could_sign_in(settings: Settings) -> None:
    refused = run("console", env=environment(settings, CREDITNOTES_CONSOLE_PORT="0"))
    assert refused.returncode == 2
    assert "CREDITNOTES_CONSOLE_TOKENS" in refused.stderr


async def test_the_console_runs_as_its_own_process_and_answers_only_with_a_token(
        settings: Settings) -> None:
    token = make_token("ada", "viewer")
    port = free_port()
    env = environment(settings, CREDITNOTES_CONSOLE_PORT=str(port),
                      CREDITNOTES_CONSOLE_HOST="127.0.0.1",
                      CREDITNOTES_CONSOLE_TOKENS=f"[{token[1]}]", CREDITNOTES_LOG_FORMAT="json")
    process = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
        [CREDITNOTES, "console"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        await wait_for_health(base_url, process)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as anonymous, \
                httpx.AsyncClient(base_url=base_url, timeout=10,
                                  headers={"Authorization": f"Bearer {token[0]}"}) as ada:
            assert (await anonymous.get("/readyz")).json() == {"status": "ready"}
            refused = await anonymous.get("/api/v1/openapi.json")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthenticated"
            assert (await anonymous.get("/metrics")).status_code == 401
            assert (await anonymous.get("/", follow_redirects=False)).headers["location"] == (
                "/login")
            assert (await ada.get("/api/v1/openapi.json")).status_code == 200
            assert "creditnotes_console_requests_total" in (await ada.get("/metrics")).text
    finally:
        output = stop(process)
    assert process.returncode == 0, output
    events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
    assert "console started" in events and "console stopped" in events
    assert token[0] not in output  # the token itself is never logged


def test_a_port_in_use_is_said_in_one_line(settings: Settings) -> None:
    _, entry = make_token("ada", "viewer")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = run("console", env=environment(
            settings, CREDITNOTES_CONSOLE_PORT=str(port), CREDITNOTES_CONSOLE_HOST="127.0.0.1",
            CREDITNOTES_CONSOLE_TOKENS=f"[{entry}]"))
    assert refused.returncode == 3
    assert f"port {port} is in use (CREDITNOTES_CONSOLE_PORT)" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_dev_prints_a_one_time_token_that_signs_in_exactly_once(
        settings: Settings, tmp_path: Path) -> None:
    console_port, http_port = free_port(), free_port()
    env = environment(settings, CREDITNOTES_CONSOLE_PORT=str(console_port),
                      CREDITNOTES_HTTP_PORT=str(http_port), COLUMNS="300")
    process = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
        [CREDITNOTES, "dev", "--data-dir", str(tmp_path / "dev")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stderr is not None
        token = None
        deadline = time.monotonic() + 90
        while token is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(process.stderr.readline)
            assert line or process.poll() is None, "dev ended without printing the token"
            found = re.search(r"one-time operator token: (\S+)", line)
            token = found.group(1) if found else None
        assert token is not None
        base_url = f"http://127.0.0.1:{console_port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as browser:
            first = await browser.post("/login", data={"token": token, "next": "/"})
            assert first.status_code == 303
            assert "cn_session" in browser.cookies
            assert (await browser.get("/api/v1/openapi.json")).status_code == 200
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as second_browser:
                again = await second_browser.post("/login", data={"token": token})
                assert again.status_code == 401
                assert "cn_session" not in second_browser.cookies
            bearer = await browser.get("/api/v1/openapi.json",
                                       headers={"Authorization": f"Bearer {token}"})
            assert bearer.status_code == 401  # it only ever opened that one session
    finally:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(process.wait, 60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0


async def test_verify_records_its_run_for_the_flow_health_page(settings: Settings) -> None:
    import asyncpg

    checked = await asyncio.to_thread(run, "verify", env=environment(settings, COLUMNS="200"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    connection = await asyncpg.connect(settings.database_url)
    try:
        rows = await connection.fetch("SELECT violations, invariants, ran_by, started_at, "
                                      "finished_at FROM verify_runs")
    finally:
        await connection.close()
    [row] = rows
    assert (row["violations"], row["invariants"]) == (0, [])
    assert row["ran_by"] and row["started_at"] <= row["finished_at"]
