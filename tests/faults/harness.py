"""Fault-injection harness: real ``creditnotes run`` processes on their own servers.

The pieces a scenario is built from:

- :class:`Deployment`: one test's world on the fault stack (a fresh database,
  its own topic names and consumer group, a directory for process logs) and
  the ``CREDITNOTES_*`` environment every process of that test gets.
- :class:`ServiceProcess`: one ``creditnotes run`` subprocess: start and wait
  until ``GET /readyz`` answers 200, ``kill -9``, SIGTERM and wait, restart.
  Each incarnation logs (JSON) to its own file under the test's ``tmp_path``.
- :class:`Workload`: a deterministic mix of upstream messages (invoices, small
  credits, line credits, voids, commands that must be rejected, SLA breaches,
  payments with ids and their duplicates, refunds and their outcomes), each
  knowing the ledger outcome and the events it must cause.
- :class:`Publisher`: publishes them as upstream producers do, in a burst or
  paced over a stretch of time (so that a fault always lands mid-stream).
- :func:`collect`: every record on the output and dead-letter topics, read
  from the beginning until nothing more comes.
- :func:`check`: the "never lose, never duplicate" oracle over the database
  and the records; :func:`verify` runs ``creditnotes verify`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.devtools.devstack import free_port
from service.domain.commands import Trigger
from service.domain.credit_note import derived_id
from service.domain.refunds import PaymentCash, refund_id_for
from service.settings import Topics

CREDITNOTES = str(Path(sys.executable).with_name("creditnotes"))
SOURCE = "/tests/faults"
CLOUDEVENTS_JSON = b"application/cloudevents+json"

# ------------------------------------------------------------------ deployment


@dataclass(frozen=True)
class Deployment:
    """One test's database, topics, consumer group and log directory on the fault stack."""

    database_url: str
    bootstrap_servers: str
    prefix: str
    log_dir: Path

    @property
    def topics(self) -> Topics:
        return Topics(**{name: self.prefix + topic
                         for name, topic in Topics().model_dump().items()})

    @property
    def group(self) -> str:
        return f"{self.prefix}credit-notes"

    def dlq(self, topic: str) -> str:
        return f"{topic}.dlq"

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a ``creditnotes`` process of this test.

        No ``CREDITNOTES_*`` variable is inherited; ``overrides`` are settings
        without the prefix (``HTTP_PORT="0"``).
        """
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("CREDITNOTES_")}
        settings = {
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "CONSUMER_GROUP": self.group,
            "LOG_FORMAT": "json",
            # tansu holds each join for about half the session timeout
            "KAFKA_SESSION_TIMEOUT_MS": "2000",
            "KAFKA_FETCH_MAX_WAIT_MS": "10",
            "KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            # a command may be read before its invoice (another topic, another consumer),
            # and a kill may delay the invoice; it must wait, never be dead-lettered
            "NOT_FOUND_RETRY_SECONDS": "600",
            "RETRY_INITIAL_BACKOFF_SECONDS": "0.05",
            "RETRY_MAX_BACKOFF_SECONDS": "1",
            "OUTBOX_POLL_SECONDS": "0.2",
            "SHUTDOWN_TIMEOUT_SECONDS": "5",
            "ALLOW_ANY_SOURCE": "true",  # the workload publishes from /tests/faults
            **{f"TOPIC_{name.upper()}": topic
               for name, topic in self.topics.model_dump().items()},
            **overrides,
        }
        env.update({f"CREDITNOTES_{name}": value for name, value in settings.items()})
        return env

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self.database_url, timeout=10)
        try:
            return list(await connection.fetch(query, *args))
        finally:
            await connection.close()

    async def execute(self, query: str, *args: Any) -> None:
        connection = await asyncpg.connect(self.database_url, timeout=10)
        try:
            await connection.execute(query, *args)
        finally:
            await connection.close()


# ------------------------------------------------------------------ service processes


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def http_get(port: int, path: str, wait_s: float = 5.0) -> tuple[int, str] | None:
    """``GET path`` on the loopback ``port``: (status, body), None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), wait_s)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), wait_s)
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace").strip()
    except (OSError, TimeoutError, IndexError, ValueError):
        return None
    finally:
        writer.close()


class ServiceProcess:
    """One replica: ``creditnotes run`` as a subprocess, restartable, each run logged apart."""

    def __init__(self, deployment: Deployment, name: str = "service", **env: str) -> None:
        self.deployment = deployment
        self.name = name
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_files: list[Path] = []
        self.kills = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_file(self) -> Path:
        return self.log_files[-1]

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.port = free_port()
        log_file = self.deployment.log_dir / f"{self.name}.{len(self.log_files) + 1}.log"
        self.log_files.append(log_file)
        with log_file.open("wb") as output:
            self.process = subprocess.Popen(
                [CREDITNOTES, "run"], env=self.deployment.env(
                    HTTP_PORT=str(self.port), **self._env),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd=self.deployment.log_dir,  # no stray .env file is read
            )

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until ``/readyz`` answers 200 and the service logged that its consumers started."""
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode} while "
                                     f"starting; {self.log_file}:\n{_tail(self.log_file)}")
            readiness = await http_get(self.port, "/readyz")
            if (readiness is not None and readiness[0] == 200
                    and "service started" in self.log_file.read_text(errors="replace")):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout_s} s (/readyz: "
                                     f"{readiness}); {self.log_file}:\n{_tail(self.log_file)}")
            await asyncio.sleep(0.1)

    async def start_ready(self) -> ServiceProcess:
        self.start()
        await self.wait_ready()
        return self

    def kill(self) -> None:
        """``kill -9``: no shutdown, no commit, no flush."""
        assert self.process is not None and self.alive, f"{self.name} is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.kills += 1

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the graceful stop; returns the exit code."""
        assert self.process is not None
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"{self.name} did not stop within {timeout_s} s of SIGTERM; "
                                 f"{self.log_file}:\n{_tail(self.log_file)}") from None

    async def restart(self) -> None:
        if self.alive:
            self.kill()
        await self.start_ready()

    def stop_quietly(self) -> None:
        """Teardown: whatever state it is in, leave no process behind."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)

    def log_lines(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line of every run whose ``event`` starts with ``event``."""
        found = []
        for log_file in self.log_files:
            for line in log_file.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and str(entry.get("event")).startswith(event):
                        found.append(entry)
        return found

    def describe(self) -> str:
        return "\n".join(f"--- {path}\n{_tail(path, 25)}" for path in self.log_files[-2:])


# ------------------------------------------------------------------ command line


@dataclass(frozen=True)
class Completed:
    returncode: int
    output: str


async def creditnotes(deployment: Deployment, *args: str, timeout_s: float = 120.0) -> Completed:
    """Run ``creditnotes <args>`` as a separate process on this test's settings."""
    process = await asyncio.create_subprocess_exec(
        CREDITNOTES, *args, env=deployment.env(LOG_FORMAT="console", HTTP_PORT="0"),
        cwd=deployment.log_dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"creditnotes {' '.join(args)} did not finish in {timeout_s} s") \
            from None
    assert process.returncode is not None
    return Completed(process.returncode, output.decode(errors="replace"))


async def verify(deployment: Deployment) -> Completed:
    """``creditnotes verify``: exit 0 when every invariant of the database holds."""
    return await creditnotes(deployment, "verify")


# ------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class Upstream:
    """One upstream message and what it must do, exactly once."""

    topic: str
    key: str
    event: dict[str, Any]
    #: The processed-message ledger's outcome: ``applied`` or ``rejected:<reason>``.
    outcome: str
    #: The ``credit-note-events`` type it must cause (None: no event).
    emits: str | None = None
    #: The credit note it creates (issue, line credit, SLA) or voids (void).
    credit_note: str | None = None
    partition: int | None = None
    #: The refund it requests (a refund credit note: one ``refund.requested``) or settles (an
    #: outcome: its ``credit_note.refund_*`` event, when ``emits`` names one).
    refund_id: str | None = None
    #: The ``customer_balance.credited`` events it must cause (0 or 1).
    balance: int = 0
    #: The payment id it records (a payment or its duplicate).
    payment_id: str | None = None

    @property
    def id(self) -> str:
        return str(self.event["id"])

    @property
    def source(self) -> str:
        return str(self.event["source"])


def cloudevent(type_: str, data: dict[str, Any], id_: str, subject: str | None = None,
               source: str = SOURCE) -> dict[str, Any]:
    event = {"specversion": "1.0", "id": id_, "source": source, "type": type_,
             "time": "2026-11-21T10:00:00Z", "datacontenttype": "application/json",
             "data": data}
    if subject is not None:
        event["subject"] = subject
    return event


#: The test invoice: 10 x 10.00 at 20% tax (12,000 gross) and one 500.00 line: 62,000 in all.
INVOICE_LINES = [
    {"id": "il_1", "description": "Widget", "quantity": 10, "unit_amount": 1_000,
     "tax_rate_bps": 2_000},
    {"id": "il_2", "description": "Support plan", "quantity": 1, "unit_amount": 50_000},
]
INVOICE_TOTAL = 62_000
#: One unit of il_1: 10.00 net + 2.00 tax.
UNIT_CREDIT = 1_200


def invoice_event(invoice_id: str, id_: str, *, lines: list[dict[str, Any]] | None = None,
                  total: int | None = INVOICE_TOTAL, paid: bool = False) -> dict[str, Any]:
    """``invoice.finalized``: open, or (``paid``) paid in full at finalization (a payment
    without id, the only refundable cash of the invoice)."""
    invoice: dict[str, Any] = {
        "id": invoice_id, "number": f"FLT-{invoice_id}", "customer_id": f"cus_{invoice_id}",
        "currency": "usd", "status": "open", "lines": lines or INVOICE_LINES}
    if total is not None:
        invoice["total"] = total
    if paid:
        invoice.update(status="paid", amount_paid=total or INVOICE_TOTAL)
    return cloudevent("invoice.finalized", {"invoice": invoice}, id_, subject=invoice_id)


def credit_note_id(source: str, event_id: str) -> str:
    """The id the service gives the credit note of an upstream event (stable by design)."""
    return derived_id("cn", Trigger(source, event_id, "credit_note.issue"))


def refund_id(note_id: str) -> str:
    """The id of a credit note's refund on the payment recorded at finalization (stable)."""
    return refund_id_for(note_id, PaymentCash(0, None, 0))


@dataclass
class _InvoicePlan:
    id: str
    #: paid in full at finalization: credits are post-payment (refunds, the balance)
    paid: bool = False
    voidable: list[str] = field(default_factory=list)  # credit notes of plain amount credits
    voided: list[str] = field(default_factory=list)
    unit_credits: int = 0
    credited: int = 0
    count: int = 0
    paid_later: int = 0  # payments received on an open invoice (all applied)
    payments: list[tuple[str, int]] = field(default_factory=list)  # (payment id, amount)
    refunds: list[str] = field(default_factory=list)  # requested, no outcome sent yet
    settled: dict[str, str] = field(default_factory=dict)  # refund id -> its outcome type


class Workload:
    """A deterministic mix of upstream messages and the exact outcome of each.

    ``invoice.finalized`` for every invoice first (a third of them paid in full
    at finalization), then, shuffled across invoices: small credits, line
    credits (by quantity), voids of earlier credits (open invoices), over-credits
    (``exceeds_creditable_amount``), wrong currencies (``currency_mismatch``),
    SLA breaches on ``sla-breaches``, payments with an id (applied on open
    invoices, overpayments to the customer balance on paid ones) and the same
    payment again (a duplicate), refund credit notes on paid invoices (one
    ``refund.requested`` on the finalization payment) and the outcomes of their
    refunds on ``refund-results`` (succeeded, or failed and settled to the
    balance), some sent twice, and with ``refused_voids`` second voids
    (``already_void``). Credits and payments stay far below each invoice's
    total, so every outcome is the same whatever order the topics are consumed
    in (the messages of one invoice on one topic share a key, hence a partition
    and an order; an outcome read before its credit note waits for it).
    """

    def __init__(self, topics: Topics, *, messages: int, invoices: int, seed: int,
                 tag: str = "w", refused_voids: bool = False) -> None:
        self.topics = topics
        self.refused_voids = refused_voids
        self.seed = seed
        rng = random.Random(seed)
        self._amounts: dict[str, int] = {}  # credit note -> its total, while voidable
        self.plans = [_InvoicePlan(f"{tag}_in_{n:04d}", paid=n % 3 == 2)
                      for n in range(invoices)]
        self.messages: list[Upstream] = [
            Upstream(topics.invoices, plan.id,
                     invoice_event(plan.id, f"{tag}-fin-{n:04d}", paid=plan.paid), "applied")
            for n, plan in enumerate(self.plans)]
        counter = 0
        while len(self.messages) < messages:
            counter += 1
            plan = rng.choice(self.plans)
            self.messages.append(self._next(rng, plan, f"{tag}-{counter:05d}"))
        # the credits and payments must stay far from each invoice's total (see the docstring)
        assert max(plan.credited for plan in self.plans) < INVOICE_TOTAL // 2
        assert max(plan.paid_later for plan in self.plans) < INVOICE_TOTAL // 4

    def _next(self, rng: random.Random, plan: _InvoicePlan, id_: str) -> Upstream:
        topics = self.topics
        roll = rng.random()
        if roll < 0.10 and plan.voidable:
            note = plan.voidable.pop(rng.randrange(len(plan.voidable)))
            plan.voided.append(note)
            plan.credited -= self._amounts.pop(note)
            return self._command("credit_note.void", {"credit_note_id": note}, plan, id_,
                                 "applied", "credit_note.voided", note)
        if roll < 0.15 and plan.voided and self.refused_voids:
            note = rng.choice(plan.voided)
            return self._command("credit_note.void", {"credit_note_id": note}, plan, id_,
                                 "rejected:already_void", "credit_note.rejected")
        if roll < 0.21:
            return self._command("credit_note.issue",
                                 {"invoice_id": plan.id, "amount": INVOICE_TOTAL + 1}, plan, id_,
                                 "rejected:exceeds_creditable_amount", "credit_note.rejected")
        if roll < 0.25:
            return self._command("credit_note.issue",
                                 {"invoice_id": plan.id, "amount": 100, "currency": "eur"},
                                 plan, id_, "rejected:currency_mismatch", "credit_note.rejected")
        if roll < 0.33 and plan.unit_credits < 3:
            plan.unit_credits += 1
            return self._issued(plan, id_, UNIT_CREDIT, {
                "invoice_id": plan.id, "reason": "product_unsatisfactory",
                "lines": [{"type": "invoice_line_item", "invoice_line_id": "il_1",
                           "quantity": 1}]})
        if roll < 0.41:
            amount = rng.randrange(50, 200)
            plan.credited += amount
            plan.count += 1
            event = cloudevent("sla.breached", {"invoice_id": plan.id, "sla_id": f"sla-{id_}",
                                                "credit_amount": amount}, id_, subject=plan.id)
            # settled to the customer balance (the default) when the invoice is paid
            return Upstream(topics.sla_breaches, plan.id, event, "applied", "credit_note.issued",
                            credit_note_id(SOURCE, id_), balance=int(plan.paid))
        if roll < 0.51:
            return self._payment(rng, plan, id_)
        if roll < 0.61 and plan.paid:
            amount = rng.randrange(100, 300)
            upstream = self._issued(plan, id_, amount, {
                "invoice_id": plan.id, "amount": amount, "refund_amount": amount,
                "reason": "order_change"})
            assert upstream.credit_note is not None
            refund = refund_id(upstream.credit_note)
            plan.refunds.append(refund)
            return Upstream(upstream.topic, upstream.key, upstream.event, upstream.outcome,
                            upstream.emits, upstream.credit_note, refund_id=refund)
        if roll < 0.70 and (plan.refunds or plan.settled):
            return self._outcome(rng, plan, id_)
        amount = rng.randrange(100, 300)
        upstream = self._issued(plan, id_, amount, {"invoice_id": plan.id, "amount": amount,
                                                    "reason": "order_change"})
        assert upstream.credit_note is not None
        if plan.paid:  # post-payment (to the customer balance): not voidable
            return upstream
        plan.voidable.append(upstream.credit_note)
        self._amounts[upstream.credit_note] = amount
        return upstream

    def _payment(self, rng: random.Random, plan: _InvoicePlan, id_: str) -> Upstream:
        """A new payment (applied on an open invoice, an overpayment on a paid one), or one of
        the invoice's payments again under another event id: a duplicate, no effect."""
        if plan.payments and rng.random() < 0.3:
            payment_id, amount = rng.choice(plan.payments)
            outcome, balance = "duplicate:payment", 0
        else:
            payment_id, amount = f"pay-{id_}", rng.randrange(100, 300)
            if not plan.paid and plan.paid_later + amount >= INVOICE_TOTAL // 4:
                amount = 1  # open invoices stay far from paid off
            plan.payments.append((payment_id, amount))
            plan.paid_later += 0 if plan.paid else amount
            outcome, balance = "applied", int(plan.paid)
        event = cloudevent("invoice.payment_succeeded", {
            "invoice_id": plan.id, "amount": amount, "currency": "usd",
            "payment_id": payment_id}, id_, subject=plan.id)
        return Upstream(self.topics.invoices, plan.id, event, outcome, None,
                        balance=balance, payment_id=payment_id)

    def _outcome(self, rng: random.Random, plan: _InvoicePlan, id_: str) -> Upstream:
        """The outcome of a requested refund (a failure goes to the customer balance), or an
        outcome already sent, again under another event id: a duplicate, no effect."""
        if plan.settled and (not plan.refunds or rng.random() < 0.25):
            refund = rng.choice(sorted(plan.settled))
            type_ = plan.settled[refund]
            upstream_outcome, emits, balance = f"duplicate:{type_.replace('.', '_')}", None, 0
        else:
            refund = plan.refunds.pop(rng.randrange(len(plan.refunds)))
            type_ = "refund.failed" if rng.random() < 0.4 else "refund.succeeded"
            plan.settled[refund] = type_
            upstream_outcome = "applied"
            emits = f"credit_note.{type_.replace('.', '_')}"
            balance = int(type_ == "refund.failed")
        data: dict[str, Any] = {"refund_id": refund, "invoice_id": plan.id}
        if type_ == "refund.failed":
            data["failure_reason"] = "card expired"
        return Upstream(self.topics.refund_results, plan.id,
                        cloudevent(type_, data, id_, subject=plan.id), upstream_outcome, emits,
                        refund_id=refund, balance=balance)

    def _issued(self, plan: _InvoicePlan, id_: str, total: int,
                data: dict[str, Any]) -> Upstream:
        """A credit note; on a paid invoice it is post-payment: to the customer balance (the
        default settlement), unless it asks for a refund."""
        plan.credited += total
        plan.count += 1
        upstream = self._command("credit_note.issue", data, plan, id_, "applied",
                                 "credit_note.issued", credit_note_id(SOURCE, id_))
        if not plan.paid or "refund_amount" in data:
            return upstream
        return Upstream(upstream.topic, upstream.key, upstream.event, upstream.outcome,
                        upstream.emits, upstream.credit_note, balance=1)

    def _command(self, type_: str, data: dict[str, Any], plan: _InvoicePlan, id_: str,
                 outcome: str, emits: str, note: str | None = None) -> Upstream:
        return Upstream(self.topics.credit_note_commands, plan.id,
                        cloudevent(type_, data, id_, subject=plan.id), outcome, emits, note)

    @property
    def invoices(self) -> list[Upstream]:
        """The ``invoice.finalized`` messages (they come first)."""
        return self.messages[:len(self.plans)]

    @property
    def commands(self) -> list[Upstream]:
        """Everything after the invoices: commands, SLA breaches, payments and outcomes."""
        return self.messages[len(self.plans):]

    def expected_invoices(self) -> dict[str, tuple[int, int]]:
        """Per invoice: (credited total of non-void credit notes, credit notes issued)."""
        return {plan.id: (plan.credited, plan.count) for plan in self.plans}


class Publisher:
    """Publishes upstream messages the way upstream producers do (key = invoice id)."""

    def __init__(self, bootstrap_servers: str) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all",
                                          enable_idempotence=False, linger_ms=5)

    async def __aenter__(self) -> Publisher:
        await self._producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()

    async def publish(self, messages: Iterable[Upstream]) -> None:
        """Send in order, pipelined; returns once the broker acknowledged every one."""
        futures = [
            await self._producer.send(
                message.topic, value=json.dumps(message.event).encode(),
                key=message.key.encode(), partition=message.partition,
                headers=[("content-type", CLOUDEVENTS_JSON)])
            for message in messages]
        await asyncio.gather(*futures)

    async def publish_paced(self, messages: Sequence[Upstream], over_s: float,
                            chunks: int = 60) -> None:
        """A stream rather than a burst: ``chunks`` equal parts, evenly over ``over_s`` seconds.

        However fast the service is, the messages keep coming for that long, so a
        fault injected meanwhile always lands mid-stream.
        """
        size = max(1, -(-len(messages) // chunks))
        started = time.monotonic()
        for number, first in enumerate(range(0, len(messages), size)):
            await asyncio.sleep(max(0.0, started + number * over_s / chunks - time.monotonic()))
            await self.publish(messages[first:first + size])

    async def partitions(self, topic: str) -> list[int]:
        return sorted(await self._producer.partitions_for(topic))


# ------------------------------------------------------------------ collector


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def event(self) -> dict[str, Any]:
        assert self.value is not None
        parsed: dict[str, Any] = json.loads(self.value)
        return parsed

    @property
    def id(self) -> str:
        return str(self.event.get("id"))


async def collect(deployment: Deployment, topics: Sequence[str] | None = None,
                  timeout_s: float = 60.0) -> list[Record]:
    """Every record now on ``topics`` (default: the outputs and the dead-letter topics).

    Read from the beginning until nothing more comes, without a consumer
    group, so it can be called at any time, as often as needed.
    """
    names = list(topics) if topics is not None else (
        deployment.topics.outputs() + [deployment.dlq(t) for t in deployment.topics.inputs()])
    consumer = AIOKafkaConsumer(bootstrap_servers=deployment.bootstrap_servers,
                                enable_auto_commit=False, request_timeout_ms=15_000)
    await consumer.start()
    try:
        await consumer.topics()  # fresh metadata of every topic
        partitions = []
        for topic in names:
            found = consumer.partitions_for_topic(topic)
            assert found, f"no topic {topic!r} on the broker"
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # The end offsets are only a lower bound: tansu answers the last record batch's first
        # offset + 1, so the rest of a multi-record batch lies beyond them. Read past them
        # until the broker has nothing more to give.
        ends = await consumer.end_offsets(partitions)
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records += [Record(r.topic, r.partition, r.offset, r.key, r.value,
                                   tuple(r.headers)) for r in batch]
            if not batches and all([await consumer.position(tp) >= ends[tp]
                                    for tp in partitions]):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {names} to their ends in {timeout_s} s")
        records.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return records
    finally:
        await consumer.stop()


# ------------------------------------------------------------------ waiting


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str,
                     describe: Callable[[], Awaitable[str]] | None = None,
                     interval_s: float = 0.25) -> None:
    """Poll ``condition`` (errors count as "not yet") until it holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            if await condition():
                return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            last_error = f" (last error: {type(error).__name__}: {error})"
        if time.monotonic() > deadline:
            detail = await describe() if describe is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                                 f"{last_error}\n{detail}")
        await asyncio.sleep(interval_s)


async def processed(deployment: Deployment, source: str = SOURCE) -> int:
    """How many upstream events of ``source`` the ledger holds as done (not those whose key
    was released while they wait, e.g. an outcome for a refund not committed yet)."""
    [row] = await deployment.fetch(
        "SELECT count(*) AS n FROM processed_messages WHERE source = $1"
        " AND outcome NOT LIKE 'released:%'", source)
    return int(row["n"])


async def backlog(deployment: Deployment) -> int:
    """Outbox rows not yet marked published."""
    [row] = await deployment.fetch("SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")
    return int(row["n"])


async def drained(deployment: Deployment, expected: int, timeout_s: float,
                  services: Sequence[ServiceProcess] = (), source: str = SOURCE) -> None:
    """Until the ledger holds ``expected`` events of ``source`` and the outbox is empty."""
    async def done() -> bool:
        return await processed(deployment, source) >= expected and await backlog(deployment) == 0

    async def describe() -> str:
        try:
            state = (f"ledger {await processed(deployment, source)}/{expected}, "
                     f"outbox backlog {await backlog(deployment)}")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            state = f"database unreachable: {error}"
        return state + "\n" + "\n".join(service.describe() for service in services)

    await eventually(done, timeout_s, "the service to drain", describe)


# ------------------------------------------------------------------ the oracle


def _ids_in_offset_order(records: Iterable[Record]) -> list[str]:
    return list(dict.fromkeys(record.id for record in sorted(records, key=lambda r: r.offset)))


async def check(deployment: Deployment, records: Sequence[Record],
                upstream: Sequence[Upstream], *,
                invoices: dict[str, tuple[int, int]] | None = None,
                allow_dead_letters: bool = False) -> list[str]:
    """Never lose, never duplicate: what is wrong, in words (empty when all is well).

    - every upstream event is in the ledger once, with its expected outcome;
    - every credit note it must create exists once (``credit_notes.trigger_id``);
    - every invoice's credited total and credit-note count are what the
      workload adds up to;
    - every outbox row is published, at least once, byte for byte (topic, key,
      value), and nothing is published that is not in the outbox;
    - no CloudEvents id is published with two different contents (topic, key,
      ``data``): the same event again is fine (at-least-once), two effects are not;
    - each upstream event caused exactly one event of the expected type (a refund outcome's
      event is told by its refund id);
    - each refund credit note was requested once, under its stable refund id, and each
      amount sent to a customer's balance was announced once, keyed by the customer;
    - per topic and key, events first appear in outbox order;
    - no dead letters (unless the scenario expects some).
    """
    problems: list[str] = []
    topics = deployment.topics

    ledger = {(row["source"], row["id"]): row["outcome"] for row in await deployment.fetch(
        "SELECT source, id, outcome FROM processed_messages")}
    for message in upstream:
        outcome = ledger.get((message.source, message.id))
        if outcome is None:
            problems.append(f"lost: {message.event['type']} {message.id} is not in the ledger")
        elif outcome != message.outcome:
            problems.append(f"{message.event['type']} {message.id}: ledger says {outcome!r}, "
                            f"expected {message.outcome!r}")

    notes = await deployment.fetch(
        "SELECT id, trigger_source, trigger_id, status, invoice_id FROM credit_notes")
    by_trigger = Counter((row["trigger_source"], row["trigger_id"]) for row in notes)
    status = {row["id"]: row["status"] for row in notes}
    for message in upstream:
        creates = message.emits == "credit_note.issued"
        count = by_trigger.get((message.source, message.id), 0)
        if count != int(creates):
            problems.append(f"{message.id}: {count} credit note(s), expected {int(creates)}")
        if message.emits == "credit_note.voided" and status.get(message.credit_note) != "void":
            problems.append(f"{message.id}: credit note {message.credit_note} is "
                            f"{status.get(message.credit_note)!r}, expected 'void'")

    if invoices is not None:
        rows = {row["id"]: row for row in await deployment.fetch(
            "SELECT id, pre_payment_credited + post_payment_credited AS credited, "
            "credit_note_count FROM invoices")}
        for invoice_id, (credited, count) in invoices.items():
            row = rows.get(invoice_id)
            if row is None:
                problems.append(f"lost: invoice {invoice_id} is not in the database")
            elif (row["credited"], row["credit_note_count"]) != (credited, count):
                problems.append(f"invoice {invoice_id}: credited {row['credited']} in "
                                f"{row['credit_note_count']} credit notes, expected {credited} "
                                f"in {count}")

    outbox = await deployment.fetch(
        "SELECT seq, event_id, topic, key, type, payload::text AS payload, published_at "
        "FROM outbox ORDER BY seq")
    published: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.topic in topics.outputs():
            published[record.id].append(record)
    for row in outbox:
        if row["published_at"] is None:
            problems.append(f"outbox row {row['seq']} ({row['type']} {row['event_id']}) "
                            "is not marked published")
        copies = published.get(row["event_id"], [])
        if not copies:
            problems.append(f"lost: outbox event {row['type']} {row['event_id']} was never "
                            "published")
        for copy in copies:
            if (copy.topic, copy.key, copy.value) != (
                    row["topic"], row["key"].encode() if row["key"] else None,
                    row["payload"].encode()):
                problems.append(f"event {row['event_id']} published at {copy.topic}"
                                f"[{copy.partition}]@{copy.offset} differs from its outbox row")
    in_outbox = {row["event_id"] for row in outbox}
    for event_id, copies in published.items():
        if event_id not in in_outbox:
            problems.append(f"event {event_id} on {copies[0].topic} is not in the outbox")
        contents = {(copy.topic, copy.key, json.dumps(copy.event.get("data"), sort_keys=True))
                    for copy in copies}
        if len(contents) > 1:
            problems.append(f"event id {event_id} was published with {len(contents)} different "
                            "contents (one id, two effects)")

    # a refund outcome's event names its refund, not its trigger: the outcome applied is it
    settles = {message.refund_id: (message.source, message.id) for message in upstream
               if message.topic == topics.refund_results and message.emits}
    caused: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        if record.topic == topics.credit_note_events:
            data = record.event["data"]
            if "trigger" in data:
                caused[(data["trigger"]["source"], data["trigger"]["id"])].append(record)
            elif data.get("refund_id") in settles:
                caused[settles[data["refund_id"]]].append(record)
            else:
                problems.append(f"{record.event['type']} {record.id} has no trigger and settles "
                                "no refund the workload settled")
    for message in upstream:
        copies = caused.get((message.source, message.id), [])
        effects = sorted({(copy.event["type"], copy.id) for copy in copies})
        if [type_ for type_, _ in effects] != ([message.emits] if message.emits else []):
            problems.append(f"{message.id}: caused {effects} on {topics.credit_note_events}, "
                            f"expected one {message.emits}")
        for copy in copies:
            if copy.key != message.key.encode():
                problems.append(f"{copy.event['type']} {copy.id} (of {message.id}) is keyed "
                                f"{copy.key!r}, not by its invoice {message.key!r}")

    problems += _check_refunds_and_balance(topics, records, upstream)

    outbox_order: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in outbox:
        if row["key"] is not None:
            outbox_order[(row["topic"], row["key"])].append(row["event_id"])
    by_key: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        if record.topic in topics.outputs() and record.key is not None:
            by_key[(record.topic, record.key.decode())].append(record)
    for (topic, key), copies in by_key.items():
        partitions = {copy.partition for copy in copies}
        if len(partitions) > 1:
            problems.append(f"{topic} key {key} is spread over partitions {sorted(partitions)}")
        elif _ids_in_offset_order(copies) != outbox_order.get((topic, key)):
            problems.append(f"{topic} key {key}: events out of order: "
                            f"published {_ids_in_offset_order(copies)}, "
                            f"happened {outbox_order.get((topic, key))}")

    dead = [record for record in records if record.topic.endswith(".dlq")]
    if dead and not allow_dead_letters:
        reasons = Counter((record.topic, dict(record.headers).get("dlq.error.reason", b"?")
                           .decode()) for record in dead)
        problems.append(f"{len(dead)} dead letter(s): {dict(reasons)}")
    return problems


def _check_refunds_and_balance(topics: Topics, records: Sequence[Record],
                               upstream: Sequence[Upstream]) -> list[str]:
    """One ``refund.requested`` per refund credit note, under its stable refund id; one
    ``customer_balance.credited`` per amount sent to the balance, keyed by the customer."""
    problems: list[str] = []
    requested: dict[str, set[str]] = defaultdict(set)  # refund id -> CloudEvent ids
    for record in records:
        if record.topic == topics.refund_requests:
            data = record.event["data"]
            requested[data["id"]].add(record.id)
    asked = {message.refund_id: message for message in upstream
             if message.refund_id is not None and message.emits == "credit_note.issued"}
    for refund, message in asked.items():
        if len(requested.get(refund, ())) != 1:
            problems.append(f"{message.id}: refund {refund} was requested under "
                            f"{len(requested.get(refund, ()))} event id(s), expected one")
    for refund in requested.keys() - asked.keys():
        problems.append(f"refund.requested {refund}: no refund credit note asked for it")

    by_note = {message.credit_note: message for message in upstream
               if message.emits == "credit_note.issued" and message.credit_note}
    by_refund = {message.refund_id: message for message in upstream
                 if message.topic == topics.refund_results and message.emits}
    by_payment = {message.payment_id: message for message in upstream
                  if message.payment_id is not None and message.outcome == "applied"}
    credited: dict[str, set[str]] = defaultdict(set)  # upstream id -> CloudEvent ids
    for record in records:
        if record.topic != topics.customer_balance_events:
            continue
        data = record.event["data"]
        cause = {"credit_note": by_note.get(data.get("credit_note_id")),
                 "refund_failed": by_refund.get(data.get("refund_id")),
                 "overpayment": by_payment.get(data.get("payment_id"))}.get(data.get("reason"))
        if cause is None:
            problems.append(f"customer_balance.credited {record.id} ({data.get('reason')}) "
                            "was caused by nothing the workload sent")
            continue
        credited[cause.id].add(record.id)
        if record.key != f"cus_{cause.key}".encode():
            problems.append(f"customer_balance.credited {record.id} is keyed {record.key!r}, "
                            f"not by its customer cus_{cause.key}")
    for message in upstream:
        if len(credited.get(message.id, ())) != message.balance:
            problems.append(f"{message.id}: {len(credited.get(message.id, ()))} "
                            f"customer_balance.credited event(s), expected {message.balance}")
    return problems


async def assert_never_lost_never_duplicated(
        deployment: Deployment, upstream: Sequence[Upstream], *,
        invoices: dict[str, tuple[int, int]] | None = None, allow_dead_letters: bool = False,
        services: Sequence[ServiceProcess] = ()) -> list[Record]:
    """:func:`check` and ``creditnotes verify``, with everything needed to debug a failure."""
    records = await collect(deployment)
    problems = await check(deployment, records, upstream, invoices=invoices,
                           allow_dead_letters=allow_dead_letters)
    verified = await verify(deployment)
    report = "\n".join(f"- {problem}" for problem in problems[:40])
    if len(problems) > 40:
        report += f"\n... and {len(problems) - 40} more"
    assert not problems, (f"{len(problems)} problem(s):\n{report}\n"
                          f"creditnotes verify (exit {verified.returncode}):\n{verified.output}\n"
                          + "\n".join(service.describe() for service in services))
    assert verified.returncode == 0, (f"creditnotes verify exited {verified.returncode}:\n"
                                      f"{verified.output}")
    return records
