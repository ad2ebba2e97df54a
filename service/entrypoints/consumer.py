"""What every input topic does with a record: decode, translate, apply, or dead-letter.

One pipeline for all topics (subscribers stay one line each), so the failure
classes of CONTRACT.md are handled in one place:

- invalid message, unsupported type, too large: dead-lettered at once;
- unknown invoice or credit note: retried with capped exponential backoff for
  ``not_found_retry_seconds``, then dead-lettered;
- infrastructure (PostgreSQL or the broker unreachable): the exception
  propagates, the subscriber's ``NACK_ON_ERROR`` policy seeks back to this
  record, so the partition is held, never skipped and never dead-lettered;
- business refusals: handled inside the transaction as ``credit_note.rejected``.

The record's offset is committed by the subscriber only after this returns,
that is after the transaction committed or the dead letter was acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import structlog

from service.domain import errors
from service.entrypoints.dead_letters import DeadLetterWriter, Failure, Record
from service.entrypoints.metrics import Metrics
from service.entrypoints.translators import Route, decode_envelope, translate
from service.handlers import Delivery, Message, Outcome, UnitOfWork, apply_batch

log = structlog.get_logger(__name__)


class Backoff:
    """Capped exponential backoff: initial, 2x, 4x, ... up to the cap."""

    def __init__(self, initial_s: float, cap_s: float) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s

    def delay(self, attempt: int) -> float:
        return float(min(self.cap_s, self.initial_s * 2 ** max(attempt - 1, 0)))


class Pipeline:
    def __init__(self, unit_of_work: Callable[[], UnitOfWork],
                 table: Mapping[str, Route],
                 dead_letters: DeadLetterWriter, backoff: Backoff,
                 not_found_retry_s: float, max_message_bytes: int,
                 metrics: Metrics | None = None) -> None:
        self._unit_of_work = unit_of_work
        self._table = table
        self._dead_letters = dead_letters
        self._backoff = backoff
        self._not_found_retry_s = not_found_retry_s
        self._max_message_bytes = max_message_bytes
        self._infrastructure_failures = 0
        self._metrics = metrics or Metrics()

    async def process(self, record: Record) -> Outcome | None:
        """Apply one record exactly once, or dead-letter it; None when dead-lettered."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(topic=record.topic, partition=record.partition,
                                               offset=record.offset)
        self._metrics.consumed.labels(record.topic).inc()
        started = time.monotonic()
        try:
            outcome = await self._process(record)
        except Exception as error:
            self._metrics.retries.labels(record.topic).inc()
            self._infrastructure_failures += 1
            delay = self._backoff.delay(self._infrastructure_failures)
            log.warning("processing failed, will retry the same record", retry_in_s=delay,
                        error=type(error).__name__)
            await asyncio.sleep(delay)
            raise
        self._infrastructure_failures = 0
        self._metrics.latency.labels(record.topic).observe(time.monotonic() - started)
        return outcome

    async def _process(self, record: Record) -> Outcome | None:
        first_failed_at = datetime.now(UTC)
        try:
            if record.value is not None and len(record.value) > self._max_message_bytes:
                raise errors.MessageTooLarge(
                    f"the record is larger than {self._max_message_bytes} bytes")
            event = decode_envelope(record.value, list(record.headers))
            structlog.contextvars.bind_contextvars(event_id=event.id, event_type=event.type)
            command = translate(event, record.topic, self._table)
        except errors.Undeliverable as error:
            await self._dead_letter(record, Failure(error, 1, first_failed_at))
            return None
        message = Message(command, Delivery(record.topic, record.partition, record.offset))
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            [result] = await apply_batch([message], self._unit_of_work())
            if result.error is None:
                assert result.outcome is not None
                log.info("message processed", outcome=result.outcome, reason=result.reason or None,
                         invoice_id=getattr(command, "invoice_id", None))
                self._metrics.outcomes.labels(record.topic, result.outcome.value,
                                              result.reason).inc()
                return result.outcome
            waited = time.monotonic() - started
            if result.error.retryable and waited < self._not_found_retry_s:
                delay = min(self._backoff.delay(attempt), self._not_found_retry_s - waited)
                log.info("waiting for what the message refers to", reason=result.error.code,
                         retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            await self._dead_letter(record, Failure(result.error, attempt, first_failed_at))
            return None

    async def _dead_letter(self, record: Record, failure: Failure) -> None:
        await self._dead_letters.write(record, failure)
        self._metrics.outcomes.labels(record.topic, "dead_lettered", failure.error.code).inc()
        log.warning("message dead-lettered", reason=failure.error.code,
                    error_message=failure.error.message, attempts=failure.attempts)
