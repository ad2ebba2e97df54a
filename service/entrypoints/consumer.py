"""What every input topic does with a record: decode, translate, apply, or dead-letter.

One pipeline for all topics (subscribers stay one line each), so the failure
classes of docs/contract.md are handled in one place. The default is that a
failure is the record's; only the infrastructure's is waited out:

- invalid message, unsupported type, too large: dead-lettered at once (so is
  any exception while decoding: ``invalid_message``, or translating:
  ``processing_failed``; both are pure, a second attempt cannot differ);
- unknown invoice or credit note: retried with capped exponential backoff for
  ``not_found_retry_seconds``, then dead-lettered;
- any other exception while applying: the batch is applied one message at a
  time, in order, so the others are applied, and the message at fault is
  tried alone (up to :data:`ATTEMPTS` times in all, before the messages after
  it, within the batch's :func:`retry_budget_seconds`; once for SQLSTATE
  classes 22 and 54), then dead-lettered (``refused_by_database`` for SQLSTATE
  classes 22, 23 and 54, ``processing_failed`` for the rest, the exception's
  class in ``dlq.error.class``);
- infrastructure (``errors.Unavailable``: PostgreSQL or the broker unreachable,
  shutting down, a deadlock or serialization failure, mapped once in
  ``service.adapters.unavailable``): the exception propagates after a backoff,
  the subscriber's ``NACK_ON_ERROR`` policy seeks back to this record, so the
  partition is held, never skipped and never dead-lettered;
- business refusals: handled inside the transaction as ``credit_note.rejected``.

The record's offset is committed by the subscriber only after this returns,
that is after the transaction committed or the dead letter was acknowledged.
A dead letter is decided in the ledger before it is sent (``handlers``), so a
redelivery (a NACKed batch, a crash before the offset commit, another replica
after a rebalance) sends it again and never applies the record.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context

from service.adapters.unavailable import Backoff
from service.domain import errors
from service.domain.commands import (
    Command,
    IssueCreditNote,
    RecordRefundOutcome,
    UpdateCreditNote,
    VoidCreditNote,
)
from service.domain.credit_note import derived_id
from service.domain.events import (
    CreditNoteIssued,
    CreditNoteRefundFailed,
    CreditNoteRefundSucceeded,
    CustomerBalanceCredited,
    RefundRequested,
)
from service.entrypoints.dead_letters import DeadLetterWriter, Failure, Record
from service.entrypoints.metrics import Metrics
from service.entrypoints.translators import Route, decode_envelope, translate
from service.handlers import Outcome, Result, apply_batch, decide_dead_letter, invoice_of
from service.ports import Delivery, Message, UnitOfWork
from service.tracing import context_from_headers, messaging_attributes, traceparent_of

log = structlog.get_logger(__name__)

#: How many times in all a message that failed (not for the infrastructure) is applied,
#: alone, before it is dead-lettered.
ATTEMPTS = 3
#: The least time a batch may spend sleeping before messages retried alone (seconds).
MIN_RETRY_BUDGET_S = 10.0


def retry_budget_seconds(backoff: Backoff, attempts: int) -> float:
    """How long one batch may sleep between attempts of messages tried alone, in all.

    Enough for one message's every attempt, at least :data:`MIN_RETRY_BUDGET_S`;
    once spent, a failing message is dead-lettered after one attempt, so a
    stream of bad records cannot make a batch outlast ``max_poll_interval_ms``.
    """
    return max(MIN_RETRY_BUDGET_S,
               sum(backoff.seconds_before(attempt) for attempt in range(1, attempts)))


#: Per record, what a batch's transactions and dead letters may take (seconds): measured
#: 0.53 s for a record dead-lettered after three attempts and two sleeps, and 0.01 s
#: per record once the sleeps are spent; 0.5 s is the bound used, with the margin below.
PER_RECORD_S = 0.5
#: Margin on top of the worst case (seconds): a slow broker or database, a GC pause.
POLL_MARGIN_S = 60.0
#: The least ``max_poll_interval_ms`` (seconds), the value before it was derived.
MIN_POLL_INTERVAL_S = 600.0


def max_poll_interval_ms(backoff: Backoff, attempts: int, not_found_retry_s: float,
                         batch_max_records: int) -> int:
    """The consumer's ``max_poll_interval_ms``: above the longest a batch may take.

    A batch sleeps at most the retry budget (messages tried alone) plus
    ``not_found_retry_s`` (waiting messages share one deadline) plus one
    infrastructure backoff (before it is NACKed); its transactions and dead
    letters take up to ``PER_RECORD_S`` a record. Twice the sleeps, plus that,
    plus :data:`POLL_MARGIN_S`, and never under :data:`MIN_POLL_INTERVAL_S`
    (a connection attempt that hangs). Defaults (200 records, 0.2/5 s backoff,
    30 s wait): 2 x (10 + 30 + 5) + 200 x 0.5 + 60 = 250 s, so 600 s; 10,000
    records: 5,150 s. Past it the member is dropped from the group mid-batch
    and the batch would be redone for ever.
    """
    sleeps = retry_budget_seconds(backoff, attempts) + not_found_retry_s + backoff.cap_s
    worst = 2 * sleeps + batch_max_records * PER_RECORD_S + POLL_MARGIN_S
    return int(max(MIN_POLL_INTERVAL_S, worst) * 1000)


async def parse_records(records: tuple[Any, ...],
                        original: Callable[[tuple[Any, ...]], Awaitable[Any]]) -> Any:
    """FastStream's batch parser, shown only the first and last records (a custom ``parser``).

    FastStream decodes every header of every record as UTF-8 and collects every
    value, for its own use: the batch's message id (first and last offsets,
    first timestamp), its headers (the first record's) and a body the no-op
    :func:`decode_records` never reads. So it is given the two records that
    make those (no per-record work for the rest), each shown only the headers it
    can decode: one that is not UTF-8 would raise before the pipeline sees the
    batch, and the batch would be redelivered for ever. The pipeline gets the
    records untouched (``raw_message``, which is also what a NACK seeks back by)
    and judges them itself.
    """
    ends = (records[0], records[-1]) if len(records) > 1 else records
    message = await original(tuple(_decodable(record) for record in ends))
    message.raw_message = records
    return message


def _decodable(record: Any) -> Any:
    """The record, or a copy of it without the headers that are not UTF-8."""
    if all(_decodes(value) for _, value in record.headers):
        return record
    return dataclasses.replace(record, headers=[
        (name, value) for name, value in record.headers if _decodes(value)])


async def decode_records(message: Any) -> None:
    """No decoding by FastStream (a custom ``decoder``): the pipeline decodes each record.

    FastStream's decoder parses a whole batch as JSON when the first record
    says ``content-type: application/json``; one record that is not JSON
    would raise before the pipeline sees the batch.
    """


def _decodes(value: object) -> bool:
    if not isinstance(value, bytes):
        return False
    if value.isascii():
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _info_enabled() -> bool:
    """Whether the service logs at INFO (structlog's filtering loggers know; others: yes)."""
    try:
        return bool(log.is_enabled_for(logging.INFO))
    except AttributeError:
        return True


_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})


def _upstream_context(record: Record) -> Any:
    """The producer's trace context, if its headers carry a readable one."""
    if not any(name in _TRACE_HEADERS for name, _ in record.headers):
        return Context()  # what extracting from no trace header gives, without the propagator
    try:
        return context_from_headers(list(record.headers))
    except Exception:  # a malformed header only loses the link to the upstream trace
        return None


def _traceparent(span: trace.Span) -> str | None:
    """``traceparent_of(span)``; None at once for a span with no context (no upstream trace
    and tracing off), as the propagator gives it, without building a context to inject."""
    if span.get_span_context() == trace.INVALID_SPAN_CONTEXT:
        return None
    return traceparent_of(span)


#: The refund outcomes dead-lettered, by their ``creditnotes_refund_outcomes`` label.
REFUND_DEAD_LETTERS = {"refund_state_conflict": "conflict", "refund_not_found": "not_found"}


def _credit_note_of(command: Command, outcome: Outcome) -> str | None:
    """The credit note a processed message issued, voided or updated, for the log."""
    if isinstance(command, VoidCreditNote | UpdateCreditNote):
        return command.credit_note_id
    if isinstance(command, IssueCreditNote) and outcome is Outcome.APPLIED:
        return derived_id("cn", command.trigger)
    return None


class Pipeline:
    def __init__(self, unit_of_work: Callable[[], UnitOfWork],
                 table: Mapping[str, Route],
                 dead_letters: DeadLetterWriter, backoff: Backoff,
                 not_found_retry_s: float, max_message_bytes: int,
                 metrics: Metrics | None = None, tracer: trace.Tracer | None = None,
                 attempts: int = ATTEMPTS) -> None:
        self._unit_of_work = unit_of_work
        self._table = table
        self._dead_letters = dead_letters
        self._backoff = backoff
        self._not_found_retry_s = not_found_retry_s
        self._max_message_bytes = max_message_bytes
        self._infrastructure_failures = 0
        self._metrics = metrics or Metrics()
        self._tracer = tracer or trace.NoOpTracer()
        #: whether spans are recorded (tracing on): span attributes and links are built only then
        self._tracing = not isinstance(self._tracer, trace.NoOpTracer)
        self._attempts = attempts
        self._retry_budget_s = retry_budget_seconds(backoff, attempts)
        #: the batch's outcomes, (topic, outcome, reason) -> records, counted as it ends
        self._outcome_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        #: whether "message processed" is logged (INFO enabled), decided once a batch
        self._log_processed = True
        #: when the running batch's retry budget is spent (``time.monotonic``)
        self._retry_deadline = 0.0

    def for_another_consumer(self) -> Pipeline:
        """A pipeline with the same parts and its own per-batch state, for another subscriber.

        Each subscriber (each shard) runs its batches with its own pipeline, so the
        batches in flight at once never share a retry deadline, an outage's backoff
        count, outcome counts or the log decision.
        """
        return Pipeline(self._unit_of_work, self._table, self._dead_letters, self._backoff,
                        self._not_found_retry_s, self._max_message_bytes, self._metrics,
                        self._tracer, self._attempts)

    async def process_batch(self, records: Sequence[Record]) -> list[Outcome | None]:
        """Apply records in one transaction, dead-lettering any that cannot be applied.

        Returns one outcome per record (None: dead-lettered). Raises when
        PostgreSQL or the broker failed, after a backoff, so that the
        subscriber seeks back and the same records come again.
        """
        structlog.contextvars.clear_contextvars()
        started = time.monotonic()
        self._retry_deadline = started + self._retry_budget_s
        self._log_processed = _info_enabled()
        metrics = self._metrics
        metrics.batch_records.observe(len(records))
        per_topic = collections.Counter(record.topic for record in records)
        for topic, count in per_topic.items():
            metrics.consumed.labels(topic).inc(count)
        try:
            outcomes = await self._process_batch(records)
        except Exception as error:
            # errors.Unavailable, or a dead letter the broker refused: no record can be
            # given an outcome, so the same records come again (never skipped, never lost)
            self._count_outcomes()  # those committed before it failed (found duplicates next)
            for topic, count in per_topic.items():
                metrics.retries.labels(topic).inc(count)
            self._infrastructure_failures += 1
            delay = self._backoff.seconds_before(self._infrastructure_failures)
            cause = getattr(error, "error_class", type(error).__name__)
            log.warning("processing failed, will retry the same records", retry_in_s=delay,
                        error=cause, unavailable=isinstance(error, errors.Unavailable),
                        records=len(records))
            await asyncio.sleep(delay)
            raise
        finally:
            self._count_outcomes()
        self._infrastructure_failures = 0
        elapsed = time.monotonic() - started
        for topic, count in per_topic.items():
            latency = metrics.latency.labels(topic)
            for _ in range(count):  # per record (a histogram observes one value at a time)
                latency.observe(elapsed)
        return outcomes

    def _count_outcomes(self) -> None:
        """Add the batch's outcomes to ``creditnotes_messages_processed``, one ``inc`` a series."""
        for (topic, outcome, reason), count in self._outcome_counts.items():
            self._metrics.outcomes.labels(topic, outcome, reason).inc(count)
        self._outcome_counts.clear()

    async def _process_batch(self, records: Sequence[Record]) -> list[Outcome | None]:
        first_failed_at = datetime.now(UTC)
        outcomes: list[Outcome | None] = [None] * len(records)
        decoded: list[tuple[int, Message, trace.Span]] = []
        try:
            for index, record in enumerate(records):
                span = self._tracer.start_span(
                    "process", context=_upstream_context(record),
                    kind=trace.SpanKind.CONSUMER,
                    attributes=messaging_attributes(record.topic, record.partition,
                                                    record.offset) if self._tracing else None)
                try:
                    decoded.append((index, self._decode(record, span), span))
                except errors.Undeliverable as error:
                    span.set_attribute("creditnotes.outcome", f"dead_lettered:{error.code}")
                    span.end()
                    await self._dead_letter(record, Failure(error, 1, first_failed_at))
            with self._tracer.start_as_current_span(
                    "postgresql transaction", kind=trace.SpanKind.CLIENT,
                    links=[trace.Link(span.get_span_context()) for _, _, span in decoded]
                    if self._tracing else None,
                    attributes={"db.system": "postgresql", "creditnotes.messages": len(decoded)}):
                applying = time.monotonic()
                results = await self._apply([message for _, message, _ in decoded], records)
                self._metrics.transaction_seconds.observe(time.monotonic() - applying)
            pending = [(index, message, result) for (index, message, _), result
                       in zip(decoded, results, strict=True)]
            waiting = await self._settle(records, pending, outcomes, first_failed_at)
            if waiting:
                await self._wait_and_apply(records, waiting, outcomes, first_failed_at)
            for index, _, span in decoded:
                span.set_attribute("creditnotes.outcome", str(outcomes[index] or "dead_lettered"))
        finally:
            for _, _, span in decoded:
                span.end()
        return outcomes

    def _decode(self, record: Record, span: trace.Span) -> Message:
        if record.value is not None and len(record.value) > self._max_message_bytes:
            raise errors.MessageTooLarge(
                f"the record is larger than {self._max_message_bytes} bytes")
        try:
            event = decode_envelope(record.value, list(record.headers))
        except errors.Undeliverable:
            raise
        except Exception as error:  # whatever the parsers raise, the record is at fault
            raise errors.InvalidMessage(
                f"the record could not be decoded ({type(error).__name__})", cause=error) from None
        span.update_name(f"process {event.type}")
        span.set_attribute("messaging.message.id", event.id)
        try:
            command = translate(event, record.topic, self._table)
        except errors.Undeliverable:
            raise
        except Exception as error:
            raise errors.ProcessingFailed(
                f"translating the message raised {type(error).__name__}"
                f"{errors.raised_in(error)}", cause=error) from None
        return Message(command, Delivery(record.topic, record.partition, record.offset,
                                         _traceparent(span)))

    async def _apply(self, messages: Sequence[Message],
                     records: Sequence[Record]) -> list[Result]:
        """``apply_batch``, retrying a failed message alone with the batch's backoff and budget."""
        by_offset: dict[tuple[str, int | None, int | None], Record] = {
            (record.topic, record.partition, record.offset): record for record in records}

        async def pause(message: Message, error: errors.Undeliverable, attempt: int) -> bool:
            delay = self._backoff.seconds_before(attempt)
            if time.monotonic() + delay > self._retry_deadline:
                return False  # the batch's retry budget is spent: dead-lettered now
            delivery = message.delivery
            log.warning("message failed, retrying it alone", topic=delivery.topic,
                        partition=delivery.partition, offset=delivery.offset,
                        reason=error.code, error=error.error_class, attempt=attempt,
                        retry_in_s=delay)
            await asyncio.sleep(delay)
            return True

        def committed(results: Sequence[Result]) -> None:
            # applied one by one before an outage interrupted the batch: reported now,
            # since the redelivery will find them duplicates
            for result in results:
                delivery = result.message.delivery
                record = by_offset.get((delivery.topic, delivery.partition, delivery.offset))
                if result.outcome is not None and record is not None:
                    self._applied(record, result)

        return await apply_batch(messages, self._unit_of_work, attempts=self._attempts,
                                 pause=pause, committed=committed)

    async def _settle(self, records: Sequence[Record],
                      pending: list[tuple[int, Message, Result]], outcomes: list[Outcome | None],
                      first_failed_at: datetime) -> list[tuple[int, Message, errors.Undeliverable]]:
        """Give each applied message its outcome; send the dead letters decided.

        Returns the messages waiting for what they refer to (retried by the caller).
        """
        waiting: list[tuple[int, Message, errors.Undeliverable]] = []
        for index, message, result in pending:
            if result.error is None:
                outcomes[index] = self._applied(records[index], result)
            elif not result.decided:
                waiting.append((index, message, result.error))
            else:
                await self._dead_letter(records[index],
                                        Failure(result.error, result.attempts, first_failed_at))
        return waiting

    def _applied(self, record: Record, result: Result) -> Outcome:
        assert result.outcome is not None
        command = result.message.command
        if self._log_processed:  # its fields cost more than the line at WARNING otherwise
            log.info("message processed", topic=record.topic, partition=record.partition,
                     offset=record.offset, event_id=command.trigger.id,
                     event_type=command.trigger.type, outcome=result.outcome,
                     reason=result.reason or None, invoice_id=invoice_of(command) or None,
                     credit_note_id=_credit_note_of(command, result.outcome))
        self._outcome_counts[(record.topic, result.outcome.value, result.reason)] += 1
        self._count_money(result)
        return result.outcome

    def _count_money(self, result: Result) -> None:
        """The refund and customer-balance metrics of what a committed message did."""
        metrics = self._metrics
        if (isinstance(result.message.command, RecordRefundOutcome)
                and result.outcome is Outcome.DUPLICATE):
            metrics.refund_outcomes.labels("duplicate").inc()
        for event in result.events:
            if isinstance(event, CreditNoteRefundSucceeded):
                metrics.refund_outcomes.labels("succeeded").inc()
            elif isinstance(event, CreditNoteRefundFailed):
                metrics.refund_outcomes.labels("failed").inc()
            elif isinstance(event, RefundRequested):
                metrics.refunds_requested.inc()
            elif isinstance(event, CreditNoteIssued):
                metrics.refunds_linked.inc(
                    sum(1 for refund in event.credit_note.refunds if refund.linked))
            elif isinstance(event, CustomerBalanceCredited):
                metrics.customer_balance_credited.labels(event.reason.value).inc()

    async def _wait_and_apply(self, records: Sequence[Record],
                              waiting: list[tuple[int, Message, errors.Undeliverable]],
                              outcomes: list[Outcome | None],
                              first_failed_at: datetime) -> None:
        """Retry, together and in order, the messages whose invoice is not known yet.

        All of them share one deadline, so a batch never waits longer than
        ``not_found_retry_s`` in all; then the ones still waiting are dead-lettered.
        """
        started = time.monotonic()
        attempt = 1
        while waiting and (waited := time.monotonic() - started) < self._not_found_retry_s:
            delay = min(self._backoff.seconds_before(attempt), self._not_found_retry_s - waited)
            log.info("waiting for what the messages refer to", messages=len(waiting),
                     reasons=sorted({error.code for _, _, error in waiting}),
                     retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
            attempt += 1
            results = await self._apply([message for _, message, _ in waiting], records)
            still: list[tuple[int, Message, errors.Undeliverable]] = []
            for (index, message, _), result in zip(waiting, results, strict=True):
                if result.error is None:
                    outcomes[index] = self._applied(records[index], result)
                elif not result.decided:
                    still.append((index, message, result.error))
                else:
                    await self._dead_letter(records[index],
                                            Failure(result.error, attempt, first_failed_at))
            waiting = still
        for index, message, error in waiting:
            # decided only if the key is still released: another replica that took the
            # partition may have applied it meanwhile (then it is a duplicate here)
            result = await decide_dead_letter(message, error, self._unit_of_work, attempt)
            if result.decided:
                await self._dead_letter(records[index], Failure(error, attempt, first_failed_at))
            else:
                outcomes[index] = self._applied(records[index], result)

    async def _dead_letter(self, record: Record, failure: Failure) -> None:
        await self._dead_letters.write(record, failure)
        self._outcome_counts[(record.topic, "dead_lettered", failure.error.code)] += 1
        if failure.error.code in REFUND_DEAD_LETTERS:
            self._metrics.refund_outcomes.labels(REFUND_DEAD_LETTERS[failure.error.code]).inc()
        log.warning("message dead-lettered", topic=record.topic, partition=record.partition,
                    offset=record.offset, reason=failure.error.code,
                    error_class=failure.error.error_class,
                    error_message=failure.error.message, attempts=failure.attempts)
