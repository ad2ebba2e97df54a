"""What every ops command shares: which servers it talks to, and failures in one line.

An operator should never have to read a traceback to learn that the broker is
down or the topic is misspelt, and should always know which PostgreSQL and
which broker a command touched (``creditnotes dev`` moves its ports on every
start). The exit codes are one scheme for every command, listed in ``--help``.
"""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, NoBrokersAvailable
from rich.console import Console

from service.settings import Settings

OK = 0
#: the command's answer is "no": violations found, nothing matches, it would be rejected
ANSWER_NO = 1
#: the command line, the configuration or the input is invalid
INVALID = 2
#: PostgreSQL or the broker could not be reached, or refused the login
UNREACHABLE = 3
#: what was named does not exist: a topic or a database
NOT_THERE = 4
#: dlq: the topic named is not a dead-letter topic (of an input topic)
NOT_DEAD_LETTER_TOPIC = 5
#: dlq replay: some records were refused or held back
HELD_BACK = 6

EXIT_CODES_HELP = """exit codes (every command):
  0  done
  1  the answer is no: invariants violated, nothing matches, the credit would be rejected
  2  invalid command line, configuration or input
  3  PostgreSQL or the broker could not be reached (or refused the login)
  4  no such topic or database
  5  dlq: not a dead-letter topic (of an input topic)
  6  dlq replay: some records were refused or held back
an expected failure is one line; add --debug for its traceback."""


class OpsError(Exception):
    """An expected failure of an ops command, said in one line with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def console() -> Console:
    """Rich output for people: the terminal's width, or wide enough not to wrap when piped."""
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


@dataclass(frozen=True)
class Servers:
    """The settings an ops command runs with, and where their servers came from."""

    settings: Settings
    origin: str  # "settings" or the path of a running dev's servers file


def with_dev_servers(settings: Settings) -> Servers:
    """Use the servers of a running ``creditnotes dev`` for what the settings leave unset.

    Without the dev tooling (the production image) there is no ``dev`` to find.
    """
    try:
        from service.devtools import dev_state
    except ModuleNotFoundError:
        return Servers(settings, "settings")
    running = dev_state.running_dev()
    unset = {"database_url", "kafka_bootstrap_servers"} - settings.model_fields_set
    if running is None or not unset:
        return Servers(settings, "settings")
    found = {"database_url": running.database_url,
             "kafka_bootstrap_servers": running.kafka_bootstrap_servers}
    return Servers(settings.model_copy(update={name: found[name] for name in unset}),
                   f"creditnotes dev ({running.file})")


def database_address(url: str) -> str:
    """``host:port/database`` of a PostgreSQL URL, never its user or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    return f"{host}:{port}{parts.path or '/'}"


def describe(servers: Servers, database: bool, broker: bool) -> str:
    """One line naming the servers a command talks to (no credentials)."""
    named = []
    if database:
        named.append(f"PostgreSQL {database_address(servers.settings.database_url)}")
    if broker:
        named.append(f"Kafka {servers.settings.kafka_bootstrap_servers}")
    return f"using {', '.join(named)} (from {servers.origin})"


def expected_failure(error: BaseException, settings: Settings) -> OpsError | None:
    """The one-line form of a failure an operator can meet without any bug; None otherwise."""
    if isinstance(error, OpsError):
        return error
    database = database_address(settings.database_url)
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return OpsError(f"no database {urlsplit(settings.database_url).path.lstrip('/')!r} on "
                        f"PostgreSQL at {database.rsplit('/', 1)[0]}", NOT_THERE)
    if isinstance(error, (asyncpg.InvalidPasswordError,
                          asyncpg.InvalidAuthorizationSpecificationError)):
        return OpsError(f"PostgreSQL at {database} refused the login", UNREACHABLE)
    if isinstance(error, asyncpg.CannotConnectNowError):
        return OpsError(f"PostgreSQL at {database} is starting or shutting down", UNREACHABLE)
    if isinstance(error, (KafkaConnectionError, NoBrokersAvailable, KafkaTimeoutError)):
        return OpsError(f"cannot reach the broker at {settings.kafka_bootstrap_servers}",
                        UNREACHABLE)
    if _connection_failure(error):  # aiokafka wraps its own: these come from asyncpg
        return OpsError(f"cannot reach PostgreSQL at {database}", UNREACHABLE)
    return None


def _connection_failure(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, socket.gaierror, TimeoutError)):
        return True
    # asyncpg tries every address of the host and raises one OSError for all of them
    return (isinstance(error, OSError) and type(error) is OSError
            and (error.errno in _CONNECT_ERRNOS or "Connect call failed" in str(error)))


_CONNECT_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
                   errno.EADDRNOTAVAIL}
