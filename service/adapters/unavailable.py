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
def mapped_to_unavailable(what: str) -> Iterator[None]:
    """Raise ``errors.Unavailable`` (from the original) for a failure of ``what``."""
    try:
        yield
    except errors.Unavailable:
        raise
    except Exception as error:
        if is_unavailable(error):
            raise unavailable(error, what) from error
        raise
