"""A start that fails: what it leaves open, and which server ``creditnotes run`` blames.

No servers: the pool and the failing part are stand-ins.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import asyncpg
import pytest

from service import main
from service.entrypoints import cli
from service.settings import Settings


def settings() -> Settings:
    return Settings(database_url="postgresql://app:secret@db.invalid:5432/credits",
                    allow_any_source=True)


class Pool:
    closed = False

    async def close(self) -> None:
        self.closed = True


async def test_a_part_that_fails_to_build_leaves_no_pool_open(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = Pool()

    async def create_pool(*args: Any, **kwargs: Any) -> Pool:
        return pool

    def build(*args: Any) -> Any:
        raise ssl.SSLError(9, "[SSL] PEM lib")  # a Kafka CA file that is not PEM
    monkeypatch.setattr(asyncpg, "create_pool", create_pool)
    monkeypatch.setattr(main, "build", build)
    with pytest.raises(ssl.SSLError):
        await main.Service(settings()).run(asyncio.Event())
    assert pool.closed


async def test_a_pool_that_cannot_connect_is_noted_as_postgresqls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def create_pool(*args: Any, **kwargs: Any) -> Pool:
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(asyncpg, "create_pool", create_pool)
    with pytest.raises(ConnectionRefusedError) as refused:
        await main.Service(settings()).run(asyncio.Event())
    assert main.CREATING_THE_POOL in getattr(refused.value, "__notes__", ())


@pytest.mark.parametrize(("error", "blamed"), [
    (ssl.SSLError(9, "[SSL] PEM lib"), None),
    (FileNotFoundError(2, "No such file or directory"), None),
    (asyncpg.InvalidPasswordError("password authentication failed"), "PostgreSQL"),
    (ConnectionRefusedError(111, "Connection refused"), "PostgreSQL (noted)"),
])
def test_run_names_postgresql_only_for_its_errors(
        error: Exception, blamed: str | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    if blamed == "PostgreSQL (noted)":
        error.add_note(main.CREATING_THE_POOL)

    async def serve(_: Settings) -> None:
        raise error
    monkeypatch.setattr(cli, "serve", serve)
    assert cli.run(None, settings()) == 3  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("creditnotes: cannot start: ")
    assert ("PostgreSQL at postgresql://app:***@db.invalid" in err) == (blamed is not None), err
    assert "secret" not in err
