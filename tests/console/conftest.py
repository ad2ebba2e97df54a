"""The console on real servers: fixtures for tests/console (API and auth tests).

``console``: the running service (``tests/conftest.py``'s ``service``) plus the
console app served by uvicorn on a free loopback port, in the test's own event
loop, on the same PostgreSQL and tansu topics. Its users: ``vera`` (viewer) and
``otto`` (operator), each with an API token. ``bare_console``: the same without
the service (nothing consumes the commands: for what the console alone decides).
``console_factory(**settings)`` starts more (other settings: trusted proxies, rates).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.entrypoints.console.auth import hash_token, new_token
from service.entrypoints.console.deps import ConsoleDeps
from service.entrypoints.console.server import Console
from service.settings import ConsoleToken, Settings
from tests.support import RunningService

VIEWER, OPERATOR = "vera", "otto"


@dataclass
class RunningConsole:
    """A console being served: where, as whom, and its parts."""

    console: Console
    settings: Settings
    viewer_token: str
    operator_token: str
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.console.port}"

    @property
    def deps(self) -> ConsoleDeps:
        assert self.console.deps is not None
        return self.console.deps

    def client(self, token: str | None = None, **options: Any) -> httpx.AsyncClient:
        """An HTTP client of the console: with ``Authorization: Bearer <token>`` if given
        (closed with the fixture). Redirects are not followed unless asked."""
        headers = dict(options.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                   timeout=options.pop("timeout", 30.0), **options)
        self._clients.append(client)
        return client

    def viewer(self, **options: Any) -> httpx.AsyncClient:
        return self.client(self.viewer_token, **options)

    def operator(self, **options: Any) -> httpx.AsyncClient:
        return self.client(self.operator_token, **options)

    async def session(self, token: str | None = None, **options: Any) -> httpx.AsyncClient:
        """A client signed in through POST /login (a browser's session cookie)."""
        client = self.client(**options)
        answer = await client.post("/login", data={"token": token or self.operator_token,
                                                   "next": "/"})
        assert answer.status_code == 303, answer.text
        return client

    def csrf_token(self, client: httpx.AsyncClient) -> str:
        """The CSRF token of a session client (what its pages carry)."""
        cookie = client.cookies.get("cn_session")
        assert cookie is not None
        user = self.deps.auth.by_session(cookie, self.deps.clock())
        assert user is not None
        return self.deps.auth.csrf_token(user)

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()


def console_settings(settings: Settings, **overrides: Any) -> tuple[Settings, str, str]:
    """``settings`` with the console on a free loopback port and the two users' tokens."""
    viewer_token, operator_token = new_token(), new_token()
    tokens = [ConsoleToken(name=VIEWER, role="viewer", sha256=hash_token(viewer_token)),
              ConsoleToken(name=OPERATOR, role="operator", sha256=hash_token(operator_token))]
    updates: dict[str, Any] = {"console_host": "127.0.0.1", "console_port": 0,
                               "console_tokens": tokens, "console_secure_cookies": False,
                               "console_wait_seconds": 10.0}
    updates.update(overrides)
    # validated as the environment would be (a secret becomes a SecretStr, a bad value fails)
    configured = Settings(**{**settings.model_dump(), **updates})
    return configured, viewer_token, operator_token


@contextlib.asynccontextmanager
async def running_console(settings: Settings, **overrides: Any) -> AsyncIterator[RunningConsole]:
    configured, viewer_token, operator_token = console_settings(settings, **overrides)
    console = Console(configured)
    stopping = asyncio.Event()
    task = asyncio.create_task(console.run(stopping))
    ready = asyncio.ensure_future(console.ready.wait())
    await asyncio.wait([task, ready], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert console.ready.is_set(), "the console did not start within 30 s"
    running = RunningConsole(console, configured, viewer_token, operator_token)
    try:
        yield running
    finally:
        await running.close()
        stopping.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def console(settings: Settings, service: RunningService) -> AsyncIterator[RunningConsole]:
    async with running_console(settings) as running:
        yield running


@pytest.fixture
async def bare_console(settings: Settings) -> AsyncIterator[RunningConsole]:
    async with running_console(settings) as running:
        yield running


@pytest.fixture
def console_factory(settings: Settings,
                    ) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningConsole]]:
    """``async with console_factory(console_trusted_proxies=["127.0.0.1/32"]) as running:``"""
    def start(**overrides: Any) -> contextlib.AbstractAsyncContextManager[RunningConsole]:
        return running_console(settings, **overrides)
    return start
