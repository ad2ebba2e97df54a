"""Bounded memory (issue 15, finding 9): a backlog of near-1 MiB records on the topics of
both consumers, read by a real ``creditnotes run``, never takes its resident memory near
the container's limit (deploy/k8s/base/deployment.yaml).

Before the byte limits, each consumer fetched up to 50 MiB and batched up to 200 records:
two consumers x 200 x 1 MiB, decoded and copied to the dead-letter topics, passed the
512 MiB limit and the pod crash-looped. Now a batch holds at most one fetch
(``CREDITNOTES_KAFKA_FETCH_MAX_BYTES``, 8 MiB by default).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from service.devtools.devstack import create_topics
from tests.faults.harness import CLOUDEVENTS_JSON, SOURCE, Deployment, ServiceProcess

pytestmark = pytest.mark.faults

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "deployment.yaml"
#: Records per consumer, on topics of PARTITIONS partitions. ``CREDITNOTES_FLOOD_RECORDS``
#: and ``CREDITNOTES_FLOOD_PARTITIONS`` change them for a longer run, and
#: ``CREDITNOTES_FLOOD_ENV`` (a JSON object of settings without the prefix, e.g.
#: ``{"KAFKA_FETCH_MAX_BYTES": "52428800"}``) runs the service with other limits.
RECORDS_PER_CONSUMER = int(os.environ.get("CREDITNOTES_FLOOD_RECORDS", "160"))
PARTITIONS = int(os.environ.get("CREDITNOTES_FLOOD_PARTITIONS", "24"))
EXTRA_ENV = json.loads(os.environ.get("CREDITNOTES_FLOOD_ENV", "{}"))
RECORD_BYTES = 1_000_000  # under max_message_bytes (1 MiB): read, decoded, dead-lettered


def memory_limit_bytes() -> int:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    [container] = [container for container in deployment["spec"]["template"]["spec"]["containers"]
                   if container["name"] == "creditnotes"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 2**20


def large_record(type_: str, number: int) -> bytes:
    """A valid CloudEvent of about RECORD_BYTES that the topic does not carry."""
    event = {"specversion": "1.0", "id": f"flood-{type_}-{number}", "source": SOURCE,
             "type": type_, "datacontenttype": "application/json",
             "data": {"invoice_id": f"in_{number % 7}", "padding": ""}}
    padding = RECORD_BYTES - len(json.dumps(event))
    event["data"]["padding"] = "x" * padding  # type: ignore[index]
    value = json.dumps(event).encode()
    assert len(value) == RECORD_BYTES
    return value


async def flood(deployment: Deployment) -> int:
    topics = deployment.topics
    producer = AIOKafkaProducer(bootstrap_servers=deployment.bootstrap_servers, acks="all",
                                enable_idempotence=False, max_request_size=2 * RECORD_BYTES,
                                linger_ms=5)
    await producer.start()
    try:
        sent = []
        for number in range(RECORDS_PER_CONSUMER):
            for topic, type_ in ((topics.invoices, "flood.invoices"),
                                 (topics.returns, "flood.returns")):
                sent.append(await producer.send(topic, value=large_record(type_, number),
                                                key=f"in_{number % 7}".encode(),
                                                headers=[("content-type", CLOUDEVENTS_JSON)]))
        await asyncio.gather(*sent)
        return len(sent)
    finally:
        await producer.stop()


async def test_a_flood_of_large_records_stays_under_the_memory_limit(
        deployment: Deployment, replicas: Callable[..., ServiceProcess]) -> None:
    limit = memory_limit_bytes()
    # topics of many partitions: each partition may bring 1 MiB per fetch, so only the
    # per-fetch limit bounds what one consumer holds
    wide = dataclasses.replace(deployment, prefix=f"{deployment.prefix}w-")
    await create_topics(wide.bootstrap_servers, wide.topics.all(), partitions=PARTITIONS)
    published = await flood(wide)  # a backlog, all there before the service starts

    service = ServiceProcess(wide, "flooded", **EXTRA_ENV)
    try:
        await watch(service, published, limit)
    finally:
        service.stop_quietly()


async def watch(service: ServiceProcess, published: int, limit: int) -> None:
    service.start()
    assert service.process is not None
    process = psutil.Process(service.process.pid)
    peak, idle = 0, None
    deadline = time.monotonic() + 300
    while len(service.log_lines("message dead-lettered")) < published:
        assert service.alive, service.describe()
        assert time.monotonic() < deadline, (
            f"{len(service.log_lines('message dead-lettered'))} of {published} dead-lettered\n"
            + service.describe())
        rss = process.memory_info().rss
        idle = rss if idle is None else min(idle, rss)
        peak = max(peak, rss)
        assert peak < limit, f"RSS {peak / 2**20:.0f} MiB passed the limit {limit / 2**20:.0f} MiB"
        await asyncio.sleep(0.05)

    reasons = {line["reason"] for line in service.log_lines("message dead-lettered")}
    assert reasons == {"unsupported_type"}
    print(f"\n{published} records of {RECORD_BYTES} bytes: peak RSS {peak / 2**20:.0f} MiB "
          f"(limit {limit / 2**20:.0f} MiB)")
    # well under, not just under: the rest of the limit is the margin for real work
    assert peak < 0.6 * limit, f"peak RSS {peak / 2**20:.0f} MiB"
    assert service.terminate() == 0
