"""The servers and processes a benchmark run uses.

- :class:`BenchStack`: a fresh embedded PostgreSQL and tansu broker in a temporary
  directory, or, when ``CREDITNOTES_DATABASE_URL`` / ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS``
  are set, those servers with a fresh ``bench_<hex>`` database and ``bench-<hex>.``
  topic prefix so that runs never collide.
- :class:`ChildProcess`: ``creditnotes run`` (or the ceiling pipe) as its own process,
  started, waited for and stopped with SIGTERM.
- :class:`CpuMeter`: CPU seconds used by each process group during a phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

from service.settings import Settings

#: tansu holds each consumer-group join for about half the session timeout (see devstack).
#: tansu: short group timeouts, and a short fetch wait (it holds every fetch about that long)
EMBEDDED_GROUP_TIMEOUTS = {"kafka_session_timeout_ms": 2_000, "kafka_heartbeat_interval_ms": 300,
                           "kafka_fetch_max_wait_ms": 10}
TOPIC_FIELDS = ("invoices", "returns", "sla_breaches", "downgrades", "cancellations",
                "credit_note_commands", "credit_note_events", "invoice_events", "refund_requests")
CEILING_INPUTS = ("credit-note-commands", "returns", "sla-breaches", "cancellations")


def _base_url(url: str) -> str:
    base, _, _ = url.rpartition("/")
    return base


class BenchStack:
    """Servers for one run; ``settings`` points the service and the bench at them."""

    def __init__(self, partitions: int = 8, keep: bool = False,
                 service_env: Mapping[str, str] | None = None) -> None:
        self.partitions = partitions
        self.keep = keep
        #: extra ``CREDITNOTES_*`` settings for the service (``--shards``)
        self.service_env = dict(service_env or {})
        #: ``track_commit_timestamp`` is on: commit times can be read back
        self.commit_timestamps = False
        self.run_id = secrets.token_hex(4)
        self.embedded_postgres = "CREDITNOTES_DATABASE_URL" not in os.environ
        self.embedded_kafka = "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS" not in os.environ
        self.work_dir = Path(tempfile.mkdtemp(prefix="creditnotes-bench-"))
        self._postgres: object | None = None
        self._kafka: object | None = None
        self._admin_url: str | None = None
        self.database = "creditnotes" if self.embedded_postgres else f"bench_{self.run_id}"
        self.settings: Settings = Settings()
        self.ceiling_topics: dict[str, str] = {}
        self.ceiling_output = ""

    # -- lifetime

    def start(self) -> None:
        from service.devtools.devstack import EmbeddedKafka, EmbeddedPostgres

        base = Settings()
        updates: dict[str, object] = {}
        if self.embedded_postgres:
            postgres = EmbeddedPostgres(self.work_dir / "postgres")
            postgres.start()
            # commit times of the service's transactions, for the latency split
            asyncio.run(self._alter_system(postgres.url, "track_commit_timestamp", "on"))
            postgres.stop()
            postgres.start()
            self._postgres = postgres
            self._admin_url = postgres.url
        else:
            self._admin_url = base.database_url
        asyncio.run(self._create_database())
        self.commit_timestamps = asyncio.run(self._setting_on("track_commit_timestamp"))
        updates["database_url"] = f"{_base_url(self._admin_url)}/{self.database}"
        prefix = ""
        if self.embedded_kafka:
            kafka = EmbeddedKafka(log_file=self.work_dir / "broker.log")
            kafka.start()
            self._kafka = kafka
            updates["kafka_bootstrap_servers"] = kafka.bootstrap_servers
            updates |= EMBEDDED_GROUP_TIMEOUTS
            updates["consumer_group"] = "credit-notes"
        else:
            prefix = f"bench-{self.run_id}."
            for name in TOPIC_FIELDS:
                updates[f"topic_{name}"] = prefix + getattr(base, f"topic_{name}")
            updates["consumer_group"] = f"bench-{self.run_id}"
        self.settings = base.model_copy(update=updates)
        self.ceiling_topics = {name: f"{prefix}bench-ceiling.{name}" for name in CEILING_INPUTS}
        self.ceiling_output = f"{prefix}bench-ceiling.out"
        asyncio.run(self._create_topics())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if self._kafka is not None:
                self._kafka.stop()  # type: ignore[attr-defined]
        if not self.embedded_postgres and not self.keep and self._admin_url:
            with contextlib.suppress(Exception):
                asyncio.run(self._drop_database())
        with contextlib.suppress(Exception):
            if self._postgres is not None:
                self._postgres.stop()  # type: ignore[attr-defined]
        if not self.keep:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    async def _create_database(self) -> None:
        assert self._admin_url is not None
        connection = await asyncpg.connect(self._admin_url)
        try:
            exists = await connection.fetchval(
                "SELECT true FROM pg_database WHERE datname = $1", self.database)
            if not exists:
                await connection.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await connection.close()

    @staticmethod
    async def _alter_system(url: str, name: str, value: str) -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        finally:
            await connection.close()

    async def _setting_on(self, name: str) -> bool:
        assert self._admin_url is not None
        connection = await asyncpg.connect(self._admin_url)
        try:
            return bool(await connection.fetchval(
                "SELECT setting = 'on' FROM pg_settings WHERE name = $1", name))
        finally:
            await connection.close()

    async def _drop_database(self) -> None:
        assert self._admin_url is not None
        connection = await asyncpg.connect(self._admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await connection.close()

    async def _create_topics(self) -> None:
        from service.devtools.devstack import create_topics

        topics = [*self.settings.topics.all(), *self.ceiling_topics.values(), self.ceiling_output]
        await create_topics(self.settings.kafka_bootstrap_servers, topics, self.partitions)

    # -- what the children need

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for ``creditnotes`` children: these servers, topics and group."""
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("CREDITNOTES_")}
        # keep the operator's security settings (SASL, TLS) for their own broker
        env |= {name: value for name, value in os.environ.items()
                if name.startswith("CREDITNOTES_KAFKA_S")}
        dumped = self.settings.model_dump()
        for name, value in dumped.items():
            if name.startswith("topic_") or name in {
                    "database_url", "kafka_bootstrap_servers", "consumer_group",
                    "kafka_session_timeout_ms", "kafka_heartbeat_interval_ms",
                    "kafka_fetch_max_wait_ms"}:
                env[f"CREDITNOTES_{name.upper()}"] = str(value)
        env["CREDITNOTES_LOG_LEVEL"] = "WARNING"
        env["CREDITNOTES_LOG_FORMAT"] = "json"
        env["CREDITNOTES_ALLOW_ANY_SOURCE"] = "true"  # the load publishes from /bench sources
        env |= self.service_env
        env |= extra
        return env

    def server_processes(self) -> dict[str, list[psutil.Process]]:
        """The embedded servers' processes (for CPU accounting); empty for external ones."""
        found: dict[str, list[psutil.Process]] = {}
        postgres = self._postgres
        if postgres is not None:
            master = postgres._postmaster()  # type: ignore[attr-defined]
            if master is not None:
                with contextlib.suppress(psutil.Error):
                    found["postgres"] = [master, *master.children(recursive=True)]
        kafka = self._kafka
        if kafka is not None and kafka._process is not None:  # type: ignore[attr-defined]
            with contextlib.suppress(psutil.Error):
                found["broker"] = [psutil.Process(kafka._process.pid)]  # type: ignore[attr-defined]
        return found


def free_port() -> int:
    from service.devtools.devstack import free_port as _free_port

    return _free_port()


def creditnotes_command() -> list[str]:
    script = Path(sys.executable).with_name("creditnotes")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "service.entrypoints.cli"]


def migrate(stack: BenchStack) -> None:
    subprocess.run([*creditnotes_command(), "migrate"], env=stack.env(),  # noqa: S603
                   check=True, capture_output=True, timeout=120)


class ChildProcess:
    """A child process with its output in a log file; SIGTERM to stop, SIGKILL if it lingers."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str], log_file: Path) -> None:
        self.name = name
        self.command = command
        self.env = dict(env)
        self.log_file = log_file
        self.popen: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.popen = subprocess.Popen(  # noqa: S603 - our own console scripts
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
        self.process = psutil.Process(self.popen.pid)
        self.started_at = time.time()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def rss(self) -> int:
        """Resident set size of the process and its children, in bytes (0 when gone)."""
        if self.process is None:
            return 0
        try:
            total = int(self.process.memory_info().rss)
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return 0

    def stop(self, timeout: float = 30.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def wait_until(condition: Callable[[], bool], limit_s: float, what: str,
                     child: ChildProcess | None = None, interval: float = 0.1) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited while waiting for {what}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{child.log_tail()}" if child is not None else ""
            raise TimeoutError(f"timed out after {limit_s:.0f} s waiting for {what}{tail}")
        await asyncio.sleep(interval)


def http_ok(port: int, path: str = "/readyz") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


@dataclass
class CpuMeter:
    """Cores used (CPU seconds / wall seconds) per named group of processes during a phase.

    Counted per process id, so a process started during the phase counts from
    its start; a process that ended during the phase is lost (postgres backends
    are not: the postmaster's reaped children are counted in its own times).
    """

    groups: Callable[[], Mapping[str, Iterable[psutil.Process]]]
    started: dict[str, dict[int, float]] = field(default_factory=dict)
    machine_started: float = 0.0
    wall_started: float = 0.0
    #: after :meth:`stop`: CPU seconds per group (and ``machine``, ``others``) and wall seconds
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    @staticmethod
    def _cpu(process: psutil.Process) -> float | None:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system + times.children_user + times.children_system)

    def snapshot(self) -> dict[str, dict[int, float]]:
        found: dict[str, dict[int, float]] = {}
        for name, processes in self.groups().items():
            for process in processes:
                cpu = self._cpu(process)
                if cpu is not None:
                    found.setdefault(name, {})[process.pid] = cpu
        return found

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def start(self) -> None:
        self.started = self.snapshot()
        self.machine_started = self._machine_busy()
        self.wall_started = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores used per group, ``machine`` (all processes) and ``others`` (not ours)."""
        wall = max(time.monotonic() - self.wall_started, 1e-9)
        used: dict[str, float] = {}
        spent: dict[str, float] = {}
        for name, processes in self.snapshot().items():
            before = self.started.get(name, {})
            seconds = sum(max(cpu - before.get(pid, 0.0), 0.0) for pid, cpu in processes.items())
            spent[name] = seconds
            used[name] = round(seconds / wall, 3)
        machine_s = self._machine_busy() - self.machine_started
        spent["machine"] = machine_s
        spent["others"] = max(machine_s - sum(v for k, v in spent.items() if k != "machine"), 0.0)
        used["machine"] = round(machine_s / wall, 3)
        used["others"] = round(spent["others"] / wall, 3)
        self.seconds, self.wall = spent, wall
        return used

    def ms_per_message(self, messages: int) -> dict[str, float | None]:
        """CPU milliseconds per message of each group over the phase (after :meth:`stop`)."""
        return {name: (round(seconds * 1000 / messages, 4) if messages > 0 else None)
                for name, seconds in self.seconds.items()}
