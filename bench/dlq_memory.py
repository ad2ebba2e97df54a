"""Memory and time of ``creditnotes dlq list`` and ``dlq replay --dry-run`` on a big topic.

Fills ``<returns>.dlq`` with N small dead letters (default 1,000,000; the headers
the service writes, a small CloudEvent value), then runs each command as its own
process with its output counted and reports its peak RSS (``ru_maxrss``)
and wall time. A flat peak RSS means the tools stream.

    .venv/bin/python -m bench.dlq_memory [--records 1000000] [--partitions 1]

Servers: see :class:`bench.stack.BenchStack` (embedded PostgreSQL and tansu in a
temporary directory unless ``CREDITNOTES_DATABASE_URL`` /
``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS`` are set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.stack import BenchStack
from service.adapters.migrations import migrate
from service.settings import MIGRATIONS_DIR

CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))


def dead_letter(topic: str, number: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    event = {"specversion": "1.0", "id": f"ret-{number}", "source": "/bench/returns",
             "type": "return.received", "datacontenttype": "application/json",
             "data": {"invoice_id": f"in_{number % 5000}", "return_id": f"r{number}",
                      "lines": [{"invoice_line_id": "il_1", "quantity": 1}]}}
    failed_at = f"2026-11-29T12:{number // 60_000 % 60:02d}:{number // 1000 % 60:02d}." \
                f"{number % 1000:03d}000Z"
    headers = {
        "dlq.original.topic": topic, "dlq.original.partition": "0",
        "dlq.original.offset": str(number), "dlq.original.timestamp": "1796000000000",
        "dlq.consumer.group": "credit-notes", "dlq.error.reason": "invoice_not_found",
        "dlq.error.class": "InvoiceNotFound", "dlq.error.message": "no invoice with this id",
        "dlq.attempts": "12", "dlq.first_failed_at": failed_at, "dlq.failed_at": failed_at,
        "dlq.service.version": "0.1.0"}
    return (f"in_{number % 5000}".encode(), json.dumps(event).encode(),
            [("content-type", b"application/cloudevents+json")]
            + [(name, value.encode()) for name, value in headers.items()])


async def fill(bootstrap_servers: str, dlq_topic: str, topic: str, records: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, enable_idempotence=False,
                                acks=1, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    started = time.monotonic()
    try:
        window = []
        for number in range(records):
            key, value, headers = dead_letter(topic, number)
            window.append(await producer.send(dlq_topic, value=value, key=key,
                                              headers=headers))
            if len(window) >= 20_000:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)
    finally:
        await producer.stop()
    return time.monotonic() - started


@dataclass(frozen=True)
class Run:
    seconds: float  # wall time
    cpu_seconds: float  # user + system: what a shared, busy machine does not inflate
    peak_rss_mib: float
    exit_code: int
    lines: int
    last_line: str

    def __str__(self) -> str:
        return (f"{self.seconds:.1f} s wall, {self.cpu_seconds:.1f} s CPU, peak RSS "
                f"{self.peak_rss_mib:.0f} MiB, exit {self.exit_code}, {self.lines:,} lines; "
                f"last: {self.last_line}")


def measure(env: dict[str, str], *args: str) -> Run:
    """One ``creditnotes`` run (its output is read and counted, not kept)."""
    started = time.monotonic()
    process = subprocess.Popen([CREDITNOTES, *args], env=env,  # noqa: S603
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    lines, tail = 0, b""
    while chunk := process.stdout.read(1 << 20):
        lines += chunk.count(b"\n")
        tail = (tail + chunk)[-4096:]
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    last = tail.decode(errors="replace").rstrip("\n").rsplit("\n", 1)[-1]
    return Run(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
               process.returncode, lines, last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=1)
    options = parser.parse_args()
    stack = BenchStack(partitions=options.partitions)
    stack.start()
    try:
        settings = stack.settings
        asyncio.run(migrate(settings.database_url, MIGRATIONS_DIR))
        topic = settings.topics.returns
        dlq_topic = f"{topic}.dlq"
        filled = asyncio.run(fill(settings.kafka_bootstrap_servers, dlq_topic, topic,
                                  options.records))
        print(f"produced {options.records:,} dead letters to {dlq_topic} in {filled:.1f} s")
        env = stack.env()
        print(f"baseline (start, fail at once): {measure(env, 'dlq', 'list', 'no-such.dlq')}")
        for args in (("dlq", "list", dlq_topic), ("dlq", "replay", dlq_topic, "--dry-run")):
            run = measure(env, *args)
            print(f"{' '.join(args)}: {run}; {options.records / run.cpu_seconds:,.0f} "
                  f"records per CPU second")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
