"""Which failures are the infrastructure's: mapped once, here, to ``errors.Unavailable``.

The consumer pipeline retries in place (holding the partition) only what
this module calls unavailable; any other exception is taken to be the
record's fault and, after a few attempts, dead-lettered. So the list is
deliberately narrow, and errs on the side of "the server's": a failure of
the server must never dead-letter good records.

- the network and timeouts: ``OSError`` (connection refused, reset, DNS,
  ``TimeoutError``);
- asyncpg's client-side connection errors (``InterfaceError``: the
  connection or pool is closed), but not its ``DataError``, a value the
  driver cannot encode (the record's fault);
- PostgreSQL SQLSTATEs that say the server, not the statement, failed:
  class 08 (connection), 53 (insufficient resources), 57 (operator
  intervention: shutting down, cannot connect now), 58 (system error),
  40001 serialization failure, 40P01 deadlock, 40003 completion unknown,
  25006 read-only transaction (a fail-over to a standby), 55P03 lock not available;
- PostgreSQL refusing the service, not the statement: class 28 (the login is
  refused: a rotated password, a role set NOLOGIN), 42 (syntax or access
  rule: a privilege revoked, a migration not applied; the service's
  statements never carry a record's values in their text, so no record can
  cause one), 3D000 (no such database), 3F000 (no such schema), and asyncpg's
  ``InvalidCachedStatementError`` (0A000 after a concurrent ``ALTER TABLE``:
  the next transaction re-prepares);
- aiokafka errors that are retriable or about the connection
  (``KafkaConnectionError``, ``KafkaTimeoutError``, ``NodeNotReadyError`` ...).

Code that only *reports* a failure of the servers, and never has a record to
blame (the health probes, the outbox relay's retry loop, ``creditnotes run``
and the ops commands), asks the wider question instead: did a driver or the
network fail at all? :data:`DRIVER_ERRORS` (and :data:`DATABASE_ERRORS` and
:data:`BROKER_ERRORS`, to say which server) answer it, and
``mapped_to_unavailable(..., any_driver_error=True)`` raises ``Unavailable`` for
every one of them. No other module names asyncpg's or aiokafka's connection
errors; they name only the refusals of one record they handle themselves.

Whoever retries the unavailable waits with :class:`Backoff`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
from aiokafka import errors as kafka_errors
from asyncpg.exceptions import _base as asyncpg_base

from service.domain import errors

#: SQLSTATE classes (first two characters) that are the server's, whatever the statement.
UNAVAILABLE_CLASSES = frozenset({"08", "28", "42", "53", "57", "58"})
#: Single SQLSTATEs that are the server's (or a race that a retry resolves).
UNAVAILABLE_STATES = frozenset({"40001", "40P01", "40003", "25006", "55P03", "3D000", "3F000"})

_KAFKA_CONNECTION_ERRORS = (
    kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError,
    kafka_errors.NodeNotReadyError, kafka_errors.KafkaUnavailableError,
    kafka_errors.BrokerNotAvailableError, kafka_errors.RequestTimedOutError,
)


#: PostgreSQL's, through asyncpg (``InternalClientError``: "another operation is in
#: progress" on a connection killed mid-query).
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
#: The broker's, through aiokafka.
BROKER_ERRORS: tuple[type[Exception], ...] = (kafka_errors.KafkaError,)
#: The network's (``TimeoutError`` is an ``OSError``; named for the reader).
NETWORK_ERRORS: tuple[type[Exception], ...] = (OSError, TimeoutError)
#: Everything talking to PostgreSQL or the broker may raise, whoever is to blame.
DRIVER_ERRORS = NETWORK_ERRORS + DATABASE_ERRORS + BROKER_ERRORS


class Backoff:
    """Capped exponential backoff: initial, 2x, 4x, ... up to the cap."""

    def __init__(self, initial_s: float, cap_s: float) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s

    def seconds_before(self, attempt: int) -> float:
        """The wait before attempt ``attempt`` (1: the first retry waits ``initial_s``)."""
        return float(min(self.cap_s, self.initial_s * 2 ** max(attempt - 1, 0)))


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says PostgreSQL or the broker failed, not the record."""
    if isinstance(error, errors.Unavailable | OSError):
        return True
    if isinstance(error, asyncpg.exceptions.InvalidCachedStatementError):
        return True  # a concurrent ALTER TABLE invalidated a prepared statement
    if isinstance(error, asyncpg.PostgresError):
        state = str(getattr(error, "sqlstate", "") or "")
        return state[:2] in UNAVAILABLE_CLASSES or state in UNAVAILABLE_STATES
    if isinstance(error, asyncpg_base.DataError):  # a value the driver cannot encode
        return False
    if isinstance(error, asyncpg.InterfaceError):
        return True
    if isinstance(error, kafka_errors.KafkaError):
        return bool(getattr(error, "retriable", False)) or isinstance(
            error, _KAFKA_CONNECTION_ERRORS)
    return False


def unavailable(error: BaseException, what: str) -> errors.Unavailable:
    """The ``Unavailable`` for ``error`` (its class name kept, never its text)."""
    if isinstance(error, errors.Unavailable):
        return error
    state = getattr(error, "sqlstate", None)
    detail = f" (SQLSTATE {state})" if isinstance(state, str) else ""
    return errors.Unavailable(f"{what} is unavailable: {type(error).__name__}{detail}",
                              cause=error)


@contextmanager
def mapped_to_unavailable(what: str, *, any_driver_error: bool = False) -> Iterator[None]:
    """Raise ``errors.Unavailable`` (from the original) for a failure of ``what``.

    By default only for what :func:`is_unavailable` calls the server's; with
    ``any_driver_error``, for every one of :data:`DRIVER_ERRORS` (a caller with
    no record to blame).
    """
    try:
        yield
    except errors.Unavailable:
        raise
    except Exception as error:
        if is_unavailable(error) or (any_driver_error and isinstance(error, DRIVER_ERRORS)):
            raise unavailable(error, what) from error
        raise
