"""Runs the console: its pool and producer, and uvicorn inside the caller's event loop.

``creditnotes console`` runs one :class:`Console` alone; ``creditnotes dev`` and
``demo`` run one beside the service in the same loop. uvicorn gets a socket bound
here (a port in use is an ``OSError`` here, not uvicorn's ``sys.exit``) and never
touches the signal handlers: whoever runs the loop sets ``stopping``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator

import asyncpg
import structlog
import uvicorn
from fastapi import FastAPI

from service.adapters.kafka_producer import KafkaProducer
from service.entrypoints.console.app import create_app
from service.entrypoints.console.auth import Authenticator
from service.entrypoints.console.deps import ConsoleDeps
from service.main import CREATING_THE_POOL
from service.settings import Settings

log = structlog.get_logger(__name__)

#: The console's own connections: page and API reads, audit rows, outcome polls.
CONSOLE_POOL_SIZE = 5
#: Connections and requests at once; more are answered 503 by uvicorn.
MAX_CONNECTIONS = 100


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers (the loop's owner has its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


class Console:
    """The console process's parts; :meth:`run` serves until ``stopping`` is set."""

    def __init__(self, settings: Settings, *, authenticator: Authenticator | None = None,
                 pool_size: int = CONSOLE_POOL_SIZE) -> None:
        self.settings = settings
        self.auth = authenticator or Authenticator(settings)
        self.pool_size = pool_size
        self.ready = asyncio.Event()
        self.port: int | None = None
        self.deps: ConsoleDeps | None = None
        self.app: FastAPI | None = None

    def one_time_token(self) -> str:
        """A token that opens one operator session, for ``dev`` and ``demo``."""
        return self.auth.one_time_token("dev", "operator")

    @property
    def url(self) -> str:
        host = self.settings.console_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
        return f"http://{shown}:{self.port}"

    async def run(self, stopping: asyncio.Event) -> None:
        settings = self.settings
        if settings.console_session_secret is None:
            log.warning("console sessions are signed with a random secret: they end when "
                        "this process stops and do not cross replicas",
                        setting="CREDITNOTES_CONSOLE_SESSION_SECRET")
        async with contextlib.AsyncExitStack() as stack:
            sock = bind(settings.console_host, settings.console_port)
            stack.callback(sock.close)
            try:
                pool = await asyncpg.create_pool(settings.database_url, min_size=1,
                                                 max_size=self.pool_size)
            except OSError as error:
                error.add_note(CREATING_THE_POOL)
                raise
            stack.push_async_callback(pool.close)
            producer = KafkaProducer(settings)
            stack.push_async_callback(_quietly, producer.stop)
            await producer.start()
            self.deps = ConsoleDeps(settings, pool, producer, self.auth)
            self.app = create_app(self.deps)
            config = uvicorn.Config(
                self.app, lifespan="off", log_config=None, access_log=False,
                proxy_headers=False, server_header=False, ws="none",
                limit_concurrency=MAX_CONNECTIONS,
                timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds))
            server = _InLoopServer(config)
            serving = asyncio.create_task(server.serve(sockets=[sock]), name="console")
            stack.push_async_callback(_stopped, server, serving)
            while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no event)
                await asyncio.sleep(0.01)
            if serving.done():
                serving.result()  # raises what stopped it
                return
            self.port = sock.getsockname()[1]
            log.info("console started", url=self.url, tokens=len(settings.console_tokens),
                     trusted_proxies=len(settings.console_trusted_proxies))
            self.ready.set()
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([stop, serving], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        log.info("console stopped")


async def _stopped(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    server.should_exit = True
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await serving


async def _quietly(stop: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        result = stop()
        if asyncio.iscoroutine(result):
            await result


async def serve_console(settings: Settings, stopping: asyncio.Event,
                        console: Console | None = None) -> None:
    """``creditnotes console``: serve until ``stopping`` is set."""
    await (console or Console(settings)).run(stopping)
