"""The service's errors, each with a stable machine code (the ``reason`` on the wire).

::

    CreditNoteError
    ├── Rejection               a business rule says no: published as credit_note.rejected
    │   ├── InvoiceVoid                   invoice_void
    │   ├── CurrencyMismatch              currency_mismatch
    │   ├── ExceedsCreditableAmount       exceeds_creditable_amount
    │   ├── NothingLeftToCredit           nothing_left_to_credit
    │   ├── ExceedsRefundableAmount       exceeds_refundable_amount
    │   ├── SettlementMismatch            settlement_mismatch
    │   ├── UnknownInvoiceLine            unknown_invoice_line
    │   ├── CreditMethodConflict          credit_method_conflict
    │   ├── OutsideServicePeriod          outside_service_period
    │   ├── NoServicePeriod               no_service_period
    │   ├── NotVoidable                   not_voidable
    │   ├── AlreadyVoid                   already_void
    │   ├── SettlementNotAllowed          settlement_not_allowed
    │   ├── RefundAlreadyLinked           refund_already_linked
    │   └── InvalidEffectiveAt            invalid_effective_at
    ├── Undeliverable           the message cannot be processed: dead-lettered with its reason
    │   ├── InvalidMessage                invalid_message
    │   ├── MessageTooLarge               message_too_large
    │   ├── UnsupportedType               unsupported_type
    │   ├── UnauthorizedSource            unauthorized_source
    │   ├── InvoiceNotFound               invoice_not_found  (retried for a while first)
    │   ├── CreditNoteNotFound            credit_note_not_found  (retried for a while first)
    │   ├── InvoiceTotalMismatch          invoice_total_mismatch
    │   ├── InvoiceInconsistent           invoice_inconsistent
    │   ├── InvoiceConflict               invoice_conflict
    │   ├── InvalidInvoiceTransition      invalid_invoice_transition
    │   ├── RefusedByDatabase             refused_by_database
    │   ├── ProcessingFailed              processing_failed  (any other exception)
    │   ├── RefundNotFound                refund_not_found  (retried for a while first)
    │   ├── RefundStateConflict           refund_state_conflict
    │   ├── PaymentCurrencyMismatch       currency_mismatch
    │   ├── PaymentConflict               payment_conflict
    │   └── PaymentRefused                payment_refused  (retired: old dead letters only)
    └── Unavailable             PostgreSQL or the broker failed: retried in place

Messages say what is wrong in words an operator can act on; they never carry
payload data or personal data (they end up in dead-letter headers and logs).
"""

from __future__ import annotations

import traceback
from typing import ClassVar


class CreditNoteError(Exception):
    """Base of every error the service raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the class of the exception behind it (``dlq.error.class``), else its own
        self.error_class = type(cause).__name__ if cause is not None else type(self).__name__


class Rejection(CreditNoteError):
    """A business rule refuses the request; nothing changes but a rejection event."""

    code = "rejected"


class InvoiceVoid(Rejection):
    code = "invoice_void"


class CurrencyMismatch(Rejection):
    code = "currency_mismatch"


class ExceedsCreditableAmount(Rejection):
    code = "exceeds_creditable_amount"


class NothingLeftToCredit(Rejection):
    code = "nothing_left_to_credit"


class ExceedsRefundableAmount(Rejection):
    code = "exceeds_refundable_amount"


class SettlementMismatch(Rejection):
    code = "settlement_mismatch"


class UnknownInvoiceLine(Rejection):
    code = "unknown_invoice_line"


class CreditMethodConflict(Rejection):
    code = "credit_method_conflict"


class OutsideServicePeriod(Rejection):
    code = "outside_service_period"


class NoServicePeriod(Rejection):
    code = "no_service_period"


class NotVoidable(Rejection):
    code = "not_voidable"


class AlreadyVoid(Rejection):
    code = "already_void"


class SettlementNotAllowed(Rejection):
    """A trigger asked for a settlement its topic may not ask for (settings)."""

    code = "settlement_not_allowed"


class RefundAlreadyLinked(Rejection):
    """A linked refund's id is already a refund's, on any credit note (an id appears once, ever)."""

    code = "refund_already_linked"


class InvalidEffectiveAt(Rejection):
    """An ``effective_at`` more than 5 minutes ahead of the service's clock."""

    code = "invalid_effective_at"


class Undeliverable(CreditNoteError):
    """The message itself cannot be processed; it goes to its dead-letter topic."""

    code = "undeliverable"
    #: Whether waiting may cure it (the invoice may simply not have arrived yet).
    retryable: ClassVar[bool] = False


class InvalidMessage(Undeliverable):
    code = "invalid_message"


class MessageTooLarge(Undeliverable):
    code = "message_too_large"


class UnsupportedType(Undeliverable):
    code = "unsupported_type"


class UnauthorizedSource(Undeliverable):
    code = "unauthorized_source"


class InvoiceNotFound(Undeliverable):
    code = "invoice_not_found"
    retryable = True


class CreditNoteNotFound(Undeliverable):
    code = "credit_note_not_found"
    retryable = True


class InvoiceTotalMismatch(Undeliverable):
    code = "invoice_total_mismatch"


class InvoiceInconsistent(Undeliverable):
    """An invoice's status and amounts disagree (paid but not in full, or paid more than due)."""

    code = "invoice_inconsistent"


class InvoiceConflict(Undeliverable):
    code = "invoice_conflict"


class InvalidInvoiceTransition(Undeliverable):
    code = "invalid_invoice_transition"


class RefusedByDatabase(Undeliverable):
    """PostgreSQL refused the message's effect (a value or a constraint).

    Raised for a whole batch, which is then applied one message at a time so
    that only the message at fault is dead-lettered.
    """

    code = "refused_by_database"


class PaymentRefused(Undeliverable):
    """Retired: payments are no longer refused; kept so old dead letters still read."""

    code = "payment_refused"


class RefundNotFound(Undeliverable):
    """An outcome for a refund the invoice does not have (yet): waited for, then dead-lettered."""

    code = "refund_not_found"
    retryable = True


class RefundStateConflict(Undeliverable):
    """The opposite outcome after a final one: nothing changes, a person looks at it."""

    code = "refund_state_conflict"


class PaymentCurrencyMismatch(Undeliverable):
    """A payment in another currency than its invoice's (same code as the rejection)."""

    code = "currency_mismatch"


class PaymentConflict(Undeliverable):
    """The same ``payment_id`` on the invoice again, with another amount."""

    code = "payment_conflict"


class ProcessingFailed(Undeliverable):
    """Any other exception while translating or applying the message, alone, a few times.

    Not the infrastructure's (that is :class:`Unavailable`), so the message is
    taken to be at fault and dead-lettered with the exception's class name.
    """

    code = "processing_failed"


class Unavailable(CreditNoteError):
    """PostgreSQL or the broker failed (connection lost, shutting down, deadlock ...).

    Raised once, at the adapter boundary (``service.adapters.unavailable``);
    the pipeline retries the same records in place, holding the partition.
    """

    code = "unavailable"


def raised_in(error: BaseException) -> str:
    """`` in module.function``: the service's code where ``error`` was raised ("" if none).

    Names code, never data, so a dead letter says where to look.
    """
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "/service/" in frame.filename.replace("\\", "/")]
    if not frames:
        return ""
    frame = frames[-1]
    module = frame.filename.replace("\\", "/").rsplit("/service/", 1)[1].removesuffix(".py")
    return f" in {module.replace('/', '.')}.{frame.name}"
