"""The one boundary: which driver failures become ``errors.Unavailable``, and for whom."""

from __future__ import annotations

import socket

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from service.adapters.probe_connection import ProbeConnection
from service.adapters.unavailable import Backoff, mapped_to_unavailable
from service.domain import errors


@pytest.mark.parametrize("error", [asyncpg.InvalidTextRepresentationError("22P02"),
                                   asyncpg.InternalServerError("XX000"),
                                   kafka_errors.MessageSizeTooLargeError()])
def test_a_record_can_cause_is_the_records_unless_the_caller_has_no_record(
        error: Exception) -> None:
    with pytest.raises(type(error)), mapped_to_unavailable("PostgreSQL"):
        raise error
    with pytest.raises(errors.Unavailable) as raised, \
            mapped_to_unavailable("PostgreSQL", any_driver_error=True):
        raise error
    assert raised.value.__cause__ is error
    assert type(error).__name__ in str(raised.value)


@pytest.mark.parametrize("error", [asyncpg.ConnectionFailureError("08006"), ConnectionResetError(),
                                   TimeoutError(), kafka_errors.KafkaConnectionError()])
def test_a_server_failure_is_unavailable_for_every_caller(error: Exception) -> None:
    for any_driver_error in (False, True):
        with pytest.raises(errors.Unavailable), \
                mapped_to_unavailable("it", any_driver_error=any_driver_error):
            raise error


def test_a_bug_is_never_unavailable() -> None:
    with pytest.raises(KeyError), mapped_to_unavailable("it", any_driver_error=True):
        raise KeyError("bug")


async def test_the_health_probe_says_unavailable_when_postgresql_is_not_there() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    probe = ProbeConnection(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=2)
    with pytest.raises(errors.Unavailable, match="PostgreSQL is unavailable"):
        async with probe.connection():
            pass
    await probe.close()


def test_backoff_doubles_from_the_first_wait_up_to_the_cap() -> None:
    backoff = Backoff(0.25, 1.0)
    assert [backoff.seconds_before(attempt) for attempt in range(1, 6)] == [
        0.25, 0.5, 1.0, 1.0, 1.0]
