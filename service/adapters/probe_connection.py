"""One PostgreSQL connection of its own for ``/readyz`` and ``/metrics``.

The health endpoints never take a connection from the consumers' pool: a flood
of probes, or a pool busy with long batches, cannot starve one from the other.
The connection is opened on first use, used by one check at a time, and
dropped after any error so that the next check reconnects: a failure of
PostgreSQL or of the network is raised as ``errors.Unavailable``. It names
itself ``creditnotes-health`` (``application_name``) in ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from service.adapters.unavailable import mapped_to_unavailable

APPLICATION_NAME = "creditnotes-health"


class ProbeConnection:
    def __init__(self, database_url: str, timeout: float = 2.0) -> None:
        self._url = database_url
        self._timeout = timeout
        self._connection: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        with mapped_to_unavailable("PostgreSQL", any_driver_error=True):
            async with self._lock:
                if self._connection is None or self._connection.is_closed():
                    self._connection = await asyncpg.connect(
                        self._url, timeout=self._timeout,
                        server_settings={"application_name": APPLICATION_NAME})
                try:
                    yield self._connection
                except BaseException:
                    await self._drop()
                    raise

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()
