"""Test helpers that talk to the real service, broker and database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.devtools.stack import EMBEDDED_BROKER_GROUP_TIMEOUTS
from service.main import Service
from service.settings import Settings

SOURCE = "/tests"


def consumer_shards(request: pytest.FixtureRequest) -> int | None:
    """The crediting shards of a test's service: production's unless a test asks.

    ``@pytest.mark.consumer_shards(n)`` asks for ``n``; otherwise None, the production
    default (``CREDITNOTES_CONSUMER_SHARDS``, else 4). One shard for the tests not about
    the shards was measured: a service start took 3.05 s with 1 shard and 3.09 s with 4
    (the time is tansu holding each group join), so the tests keep what production runs.
    """
    marker = request.node.get_closest_marker("consumer_shards")
    if marker is not None and marker.args:
        return int(marker.args[0])
    return None


def cloudevent(type_: str, data: Any, *, id_: str | None = None, source: str = SOURCE,
               subject: str | None = None) -> dict[str, Any]:
    event = {"specversion": "1.0", "id": id_ or f"ev-{uuid.uuid4().hex[:12]}", "source": source,
             "type": type_, "datacontenttype": "application/json", "data": data}
    if subject:
        event["subject"] = subject
    return event


def invoice_data(invoice_id: str = "in_1001", *, lines: list[dict[str, Any]] | None = None,
                 **extra: Any) -> dict[str, Any]:
    return {"invoice": {
        "id": invoice_id, "number": f"ACME-{invoice_id[-4:]}", "customer_id": "cus_42",
        "currency": "usd", "status": "open",
        "lines": lines or [{"id": "il_1", "description": "Widget", "quantity": 1,
                            "unit_amount": 100_000}],
        **extra,
    }}


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp: int

    @property
    def event(self) -> dict[str, Any]:
        assert self.value is not None
        parsed: dict[str, Any] = json.loads(self.value)
        return parsed


class RunningService:
    """The real service, in this process, on the test's database and topics."""

    def __init__(self, settings: Settings, tracer_provider: Any = None) -> None:
        self.settings = settings
        self.service = Service(settings, tracer_provider=tracer_provider)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunningService:
        self._task = asyncio.create_task(self.service.run(self._stopping))
        ready = asyncio.ensure_future(self.service.ready.wait())
        await asyncio.wait([self._task, ready], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()
        assert self.service.ready.is_set(), "the service did not start within 60 s"
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)


class Kafka:
    """Publishes to the service's input topics and reads every output and dead-letter topic."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                          enable_idempotence=False, acks="all")
        # fetches held no longer than the service's own: tansu holds each one that long
        # (aiokafka's default is 500 ms), and every poll waits for the held fetch
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                          enable_auto_commit=False,
                                          fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
        self.records: list[Record] = []

    async def __aenter__(self) -> Kafka:
        await self._producer.start()
        await self._consumer.start()
        topics = self.settings.topics
        watched = topics.outputs() + [f"{topic}.dlq" for topic in topics.inputs()]
        partitions = [TopicPartition(topic, partition) for topic in watched
                      for partition in (self._consumer.partitions_for_topic(topic) or {0})]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()
        await self._consumer.stop()

    async def publish(self, topic: str, event: dict[str, Any] | bytes, *, key: str | None = None,
                      headers: list[tuple[str, bytes]] | None = None) -> None:
        value = event if isinstance(event, bytes) else json.dumps(event).encode()
        if key is None and isinstance(event, dict):
            data = event.get("data") or {}
            key = data.get("invoice_id") or (data.get("invoice") or {}).get("id")
        await self._producer.send_and_wait(
            topic, value=value, key=key.encode() if key else None,
            headers=headers if headers is not None else [
                ("content-type", b"application/cloudevents+json")])

    async def poll(self) -> None:
        batches = await self._consumer.getmany(timeout_ms=100)
        for records in batches.values():
            self.records.extend(
                Record(r.topic, r.partition, r.offset, r.key, r.value, dict(r.headers),
                       r.timestamp) for r in records)

    def on(self, topic: str, type_: str | None = None) -> list[Record]:
        return [record for record in self.records if record.topic == topic and (
            type_ is None or record.event.get("type") == type_)]

    async def wait_for(self, condition: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                seen = [(r.topic, r.value[:200] if r.value else None) for r in self.records]
                raise AssertionError(f"timed out after {timeout_s} s; records seen: {seen}")
            await self.poll()

    async def expect(self, topic: str, type_: str | None = None, count: int = 1,
                     timeout_s: float = 30.0) -> list[Record]:
        found: list[Record] = await self.wait_for(
            lambda: (lambda got: got if len(got) >= count else None)(self.on(topic, type_)),
            timeout_s)
        return found

    async def settle(self, seconds: float = 1.5) -> None:
        """Keep reading for a while, to see anything that should NOT have come."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.poll()


CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))


async def creditnotes(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``creditnotes`` command line on the test's servers and topics.

    Asynchronously, so the service running in this process keeps its heartbeats.
    """
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CREDITNOTES_")}
    for name, value in settings.model_dump().items():
        if name.startswith("topic_") or name in {"database_url", "kafka_bootstrap_servers",
                                                 "consumer_group", *EMBEDDED_BROKER_GROUP_TIMEOUTS}:
            env[f"CREDITNOTES_{name.upper()}"] = str(value)
    env["COLUMNS"] = "200"
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def fetchrow(settings: Settings, query: str, *args: Any) -> asyncpg.Record | None:
    connection = await asyncpg.connect(settings.database_url)
    try:
        return await connection.fetchrow(query, *args)
    finally:
        await connection.close()


async def fetch(settings: Settings, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(settings.database_url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()
