"""The package as a user installs it: a wheel, in a fresh venv, without any extra.

The wheel is built from a copy of what the Dockerfile builds from (pyproject.toml,
README.md, service/), installed with its dependencies only (pip's cache makes a
second run quick), and run from a directory outside the repository, so nothing of
the checkout (``schemas/``, ``.env``, ``.creditnotes/``) can stand in for what the
package must carry itself: its SQL migrations, and a one-line answer, not a
traceback, when ``dev`` or ``demo`` need the ``embedded`` extra.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from service.devtools.devstack import create_topics, free_port
from service.entrypoints.cli import EMBEDDED_EXTRA_MODULES
from service.settings import MIGRATIONS_DIR, Topics
from tests.servers import Servers, create_database, drop_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Installed:
    creditnotes: Path
    python: Path
    elsewhere: Path  # a working directory outside the repository


def clean_environment(**overrides: str) -> dict[str, str]:
    """No ``CREDITNOTES_*`` and no ``PYTHONPATH`` of the test run: only what the wheel has."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_") and name != "PYTHONPATH"}
    return env | overrides


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "service", source / "service",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "--wheel-dir", str(work / "dist"), "./source"],
                   cwd=work, check=True, timeout=180)
    [wheel] = (work / "dist").glob("creditnotes-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                   check=True, timeout=300, env=clean_environment())
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    return Installed(venv / "bin" / "creditnotes", venv / "bin" / "python", elsewhere)


def creditnotes(installed: Installed, *args: str, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(installed.creditnotes), *args], cwd=installed.elsewhere,
                          env=env or clean_environment(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_venv_has_the_wheel_and_none_of_the_embedded_extra(installed: Installed) -> None:
    found = subprocess.run(
        [str(installed.python), "-c",
         "import importlib.util, service; print(service.__file__); "
         f"print([name for name in {EMBEDDED_EXTRA_MODULES!r} "
         "if importlib.util.find_spec(name)])"],
        cwd=installed.elsewhere, env=clean_environment(), capture_output=True, text=True,
        timeout=60, check=True)
    location, extra = found.stdout.splitlines()
    assert "site-packages" in location and not location.startswith(str(ROOT))
    assert extra == "[]"
    assert all(importlib.util.find_spec(name) for name in EMBEDDED_EXTRA_MODULES)  # here: yes


def test_help_lists_the_commands(installed: Installed) -> None:
    done = creditnotes(installed, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("run", "migrate", "dev", "demo", "dlq", "verify"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_dev_and_demo_without_the_extra_exit_2_naming_it_in_one_line(
        installed: Installed, command: str) -> None:
    done = creditnotes(installed, command)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"creditnotes {command}: ")
    assert line.endswith("pip install 'creditnotes[embedded]'")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_wheel_migrates_a_fresh_database_then_runs_until_sigterm(
        installed: Installed, servers: Servers) -> None:
    url = asyncio.run(create_database(servers.database_url))
    try:
        migrated = creditnotes(installed, "migrate", env=clean_environment(
            CREDITNOTES_DATABASE_URL=url))
        assert migrated.returncode == 0, migrated.stderr
        shipped = sorted(path.name for path in MIGRATIONS_DIR.glob("[0-9]*.sql"))
        assert f"applied {len(shipped)} migration(s)" in migrated.stdout
        assert asyncio.run(applied_migrations(url)) == shipped and len(shipped) >= 15
        again = creditnotes(installed, "migrate", env=clean_environment(
            CREDITNOTES_DATABASE_URL=url))
        assert again.returncode == 0 and "up to date" in again.stdout, again.stderr

        prefix = f"w{uuid.uuid4().hex[:8]}-"
        topics = Topics(**{name: prefix + name.replace("_", "-") for name in Topics.model_fields})
        asyncio.run(create_topics(servers.bootstrap_servers, topics.all()))
        port = free_port()
        env = clean_environment(
            CREDITNOTES_DATABASE_URL=url,
            CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS=servers.bootstrap_servers,
            CREDITNOTES_CONSUMER_GROUP=f"{prefix}credit-notes",
            CREDITNOTES_HTTP_PORT=str(port),
            CREDITNOTES_ALLOW_ANY_SOURCE="true",
            CREDITNOTES_KAFKA_SESSION_TIMEOUT_MS="2000",
            CREDITNOTES_KAFKA_HEARTBEAT_INTERVAL_MS="300",
            CREDITNOTES_KAFKA_FETCH_MAX_WAIT_MS="10",
            **{f"CREDITNOTES_TOPIC_{name.upper()}": getattr(topics, name)
               for name in Topics.model_fields})
        with subprocess.Popen([str(installed.creditnotes), "run"], cwd=installed.elsewhere,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) as service:
            try:
                assert ready(port, service, timeout=60), "not ready within 60 s"
                service.send_signal(signal.SIGTERM)
                _, errors = service.communicate(timeout=30)
            finally:
                if service.poll() is None:
                    service.kill()
            assert service.returncode == 0, errors[-2000:]
    finally:
        asyncio.run(drop_database(servers.database_url, url.rsplit("/", 1)[1]))


async def applied_migrations(url: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        return [row["name"] for row in
                await connection.fetch("SELECT name FROM schema_migrations ORDER BY 1")]
    finally:
        await connection.close()


def ready(port: int, service: subprocess.Popen[str], timeout: float) -> bool:
    """Whether ``/readyz`` answered 200 before the deadline (False if the service exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and service.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    return False
