"""Health endpoints on ``CREDITNOTES_HTTP_PORT``: ``/healthz``, ``/readyz``, ``/metrics``.

A deliberately tiny HTTP/1.1 server on asyncio streams: three GET routes do
not justify a web framework in the service's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Check = Callable[[], Awaitable[tuple[bool, str]]]


class HealthServer:
    def __init__(self, port: int, readiness: Check, metrics: Callable[[], Awaitable[str]],
                 host: str = "0.0.0.0") -> None:  # noqa: S104  (probes come from outside the pod)
        self._port = port
        self._host = host
        self._readiness = readiness
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            status, body, content_type = await self._route(path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, path: str) -> tuple[str, bytes, str]:
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            ready, detail = await self._readiness()
            return ("200 OK" if ready else "503 Service Unavailable",
                    (detail + "\n").encode(), "text/plain")
        if path == "/metrics":
            return "200 OK", (await self._metrics()).encode(), "text/plain; version=0.0.4"
        return "404 Not Found", b"not found\n", "text/plain"
