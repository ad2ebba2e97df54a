"""How ``creditnotes dev`` tells the other commands where its servers are, and keeps
``dev`` and ``demo`` from sharing state by accident.

- Each of ``dev`` and ``demo`` has its own data directory (``.creditnotes/dev``,
  ``.creditnotes/demo``) and holds an exclusive lock on it while it runs: a
  second command on the same directory refuses to start, with a message,
  instead of starting a second PostgreSQL on the same files.
- While ``dev`` runs it writes ``servers.json`` in its data directory: the
  PostgreSQL URL, the broker's address and its own pid. The ops commands
  (``publish``, ``dlq``, ``verify``, ``invoice show``, ...) use it when no
  ``CREDITNOTES_DATABASE_URL`` / ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS`` is
  configured, so they talk to the stack ``dev`` started, whose ports change on
  every start. The file goes when ``dev`` stops; a file left by a killed
  ``dev`` is ignored (its pid is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_ROOT = Path(".creditnotes")
SERVERS_FILE = "servers.json"


class StackBusy(Exception):
    """Another ``creditnotes dev`` or ``demo`` holds this data directory."""


@dataclass(frozen=True)
class DevServers:
    database_url: str
    kafka_bootstrap_servers: str
    http_port: int
    pid: int
    file: Path


def data_dir(command: str) -> Path:
    """The default data directory of ``dev`` or ``demo``: separate, so they never collide."""
    return DATA_ROOT / command


@contextlib.contextmanager
def exclusive(directory: Path, command: str) -> Iterator[None]:
    """Hold the data directory for this command; refuse when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / "lock"
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise StackBusy(
                f"{directory} is in use by {holder}; stop it first, or give "
                f"`creditnotes {command} --data-dir <another directory>`") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"creditnotes {command} (pid {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def advertised(directory: Path, database_url: str, kafka_bootstrap_servers: str,
               http_port: int) -> Iterator[Path]:
    """Write ``servers.json`` for the other commands while the block runs."""
    path = directory / SERVERS_FILE
    path.write_text(json.dumps({
        "database_url": database_url, "kafka_bootstrap_servers": kafka_bootstrap_servers,
        "http_port": http_port, "pid": os.getpid()}, indent=2) + "\n")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def running_dev(directory: Path | None = None) -> DevServers | None:
    """The servers of a ``creditnotes dev`` running from this directory, if there is one."""
    path = (directory or data_dir("dev")) / SERVERS_FILE
    try:
        found = json.loads(path.read_text())
        servers = DevServers(str(found["database_url"]), str(found["kafka_bootstrap_servers"]),
                             int(found["http_port"]), int(found["pid"]), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return servers if _alive(servers.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
