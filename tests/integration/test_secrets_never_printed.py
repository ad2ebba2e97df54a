"""Secrets are never printed (issue 10, finding 3): every secret setting holds a marker,
and every configuration error and startup failure we can provoke through the real
``creditnotes`` process is grepped for it, on stdout and stderr, at DEBUG level."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from service.devtools.devstack import free_port
from service.settings import Settings
from tests.support import CREDITNOTES

pytestmark = pytest.mark.integration

MARKER = f"Mk{uuid.uuid4().hex[:12]}"
ALLOW_ANY = {"ALLOW_ANY_SOURCE": "true"}


def with_password(url: str, password: str = MARKER) -> str:
    parts = urlsplit(url)
    user = (parts.username or "postgres")
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@dataclass
class Output:
    code: int
    text: str


async def creditnotes(*args: str, **settings: str) -> Output:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    env |= {"CREDITNOTES_LOG_LEVEL": "DEBUG", "CREDITNOTES_KAFKA_SASL_PASSWORD": MARKER,
            "CREDITNOTES_DATABASE_URL": with_password("postgresql://app@127.0.0.1:1/creditnotes"),
            "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    env |= {f"CREDITNOTES_{name}": value for name, value in settings.items()}
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, *args, env=env, cwd="/", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    stdout, _ = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return Output(process.returncode, stdout.decode(errors="replace"))


def assert_no_secret(output: Output) -> None:
    assert MARKER.lower() not in output.text.lower(), output.text
    assert "input_value" not in output.text, output.text


CONFIGURATION_ERRORS = {
    "sasl without a mechanism": {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                                 "KAFKA_SASL_USERNAME": "creditnotes"},
    "sasl without a username": {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                "KAFKA_SASL_MECHANISM": "PLAIN"},
    "an unknown protocol": {"KAFKA_SECURITY_PROTOCOL": "BOGUS"},
    "an unknown mechanism": {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                             "KAFKA_SASL_MECHANISM": "GSSAPI", "KAFKA_SASL_USERNAME": "u"},
    "an unknown sslmode": {"DATABASE_SSLMODE": "maybe"},
    "a database URL that is no URL": {"DATABASE_URL": f"postgresql://app:{MARKER}@[::1/db"},
    "a database URL of another scheme": {"DATABASE_URL": f"mysql://app:{MARKER}@db/db"},
    "a pool size that is no number": {"DATABASE_POOL_SIZE": "many"},
    "an allow-list that is no JSON": {"ALLOWED_SOURCES_RETURNS": "[/warehouse"},
}


@pytest.mark.parametrize("settings", CONFIGURATION_ERRORS.values(), ids=CONFIGURATION_ERRORS)
async def test_configuration_errors_name_the_setting_never_the_values(
        settings: dict[str, str]) -> None:
    for command in ("run", "migrate") if "PROTOCOL" in str(settings) else ("run",):
        output = await creditnotes(command, **settings)
        assert output.code == 2, output.text
        lines = output.text.strip().splitlines()
        assert lines and all(line.startswith("creditnotes: invalid configuration: ")
                             for line in lines), output.text
        assert_no_secret(output)


async def test_run_without_allow_lists_refuses_in_one_line_naming_the_settings() -> None:
    output = await creditnotes("run", ALLOWED_SOURCES_RETURNS='["/warehouse/returns"]')
    assert output.code == 2
    [line] = output.text.strip().splitlines()
    assert line.startswith("creditnotes: refusing to start: ")
    assert "CREDITNOTES_ALLOWED_SOURCES_INVOICES" in line
    assert "CREDITNOTES_ALLOWED_SOURCES_RETURNS" not in line
    assert "CREDITNOTES_ALLOW_ANY_SOURCE=true" in line
    assert_no_secret(output)


async def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    output = await creditnotes("run", **ALLOW_ANY)
    assert output.code == 3, output.text
    assert "creditnotes: cannot start: PostgreSQL at postgresql://app:***@127.0.0.1:1/" in (
        output.text)
    assert_no_secret(output)
    for command in ("migrate", "verify"):
        assert_no_secret(await creditnotes(command))


async def test_an_unreachable_broker_is_one_line_without_the_sasl_password(
        settings: Settings) -> None:
    for security in ({}, {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                          "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                          "KAFKA_SASL_USERNAME": "creditnotes"}):
        output = await creditnotes("run", DATABASE_URL=with_password(settings.database_url),
                                   **security, **ALLOW_ANY)
        assert output.code == 3, output.text
        assert "creditnotes: cannot start: Kafka at 127.0.0.1:" in output.text
        assert_no_secret(output)


async def test_dev_names_its_database_without_the_password(
        settings: Settings, tmp_path: Path) -> None:
    """``creditnotes dev`` prints the servers it uses: the URL, redacted."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    env |= {"CREDITNOTES_LOG_LEVEL": "DEBUG", "CREDITNOTES_KAFKA_SASL_PASSWORD": MARKER,
            "CREDITNOTES_DATABASE_URL": with_password(settings.database_url),
            "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "CREDITNOTES_HTTP_PORT": str(free_port()), "COLUMNS": "200"}
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, "dev", "--data-dir", str(tmp_path / "dev"), env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    seen = b""
    try:
        async with asyncio.timeout(90):
            while b"service started" not in seen:
                chunk = await process.stdout.read(4096)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    output = Output(process.returncode or 0, (seen + rest).decode(errors="replace"))
    assert ":***@" in output.text, output.text
    assert_no_secret(output)


async def test_a_health_port_in_use_is_named_as_such(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104  (where the health server listens)
        taken.listen()
        port = taken.getsockname()[1]
        output = await creditnotes("run", DATABASE_URL=with_password(settings.database_url),
                                   KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
                                   HTTP_PORT=str(port), **ALLOW_ANY)
    assert output.code == 3, output.text
    assert f"creditnotes: cannot start: port {port} is in use" in output.text
    assert_no_secret(output)
