"""The credit note: an immutable document that credits part of one invoice.

Once issued, only ``memo`` and ``metadata`` may change, and a credit note may
become ``void`` (keeping its number). Its journal is balanced by construction:
debits are the net and the tax, credits are the parts of the total.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from service.domain.commands import Trigger
from service.domain.refunds import (
    FailureSettlement,
    Refund,
    RefundState,
    RefundStatus,
    refund_status,
    uuid5_hex,
)


class CreditNoteType(StrEnum):
    PRE_PAYMENT = "pre_payment"
    POST_PAYMENT = "post_payment"
    MIXED = "mixed"


class CreditNoteStatus(StrEnum):
    ISSUED = "issued"
    VOID = "void"


class Reason(StrEnum):
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    ORDER_CHANGE = "order_change"
    PRODUCT_UNSATISFACTORY = "product_unsatisfactory"
    SERVICE_CREDIT = "service_credit"
    SUBSCRIPTION_CHANGE = "subscription_change"
    SUBSCRIPTION_CANCELLATION = "subscription_cancellation"
    OTHER = "other"


class Account(StrEnum):
    CONTRA_REVENUE = "contra_revenue"
    SALES_TAX_PAYABLE = "sales_tax_payable"
    ACCOUNTS_RECEIVABLE = "accounts_receivable"
    REFUNDS_PAYABLE = "refunds_payable"
    CUSTOMER_CREDIT_BALANCE = "customer_credit_balance"
    OUT_OF_BAND_SETTLEMENT = "out_of_band_settlement"
    CASH = "cash"


@dataclass(frozen=True)
class JournalLine:
    account: Account
    debit: int = 0
    credit: int = 0

    def reversed(self) -> JournalLine:
        return JournalLine(self.account, debit=self.credit, credit=self.debit)


@dataclass(frozen=True)
class CreditNoteLine:
    """One credited line: of an invoice line (``invoice_line_id``) or custom.

    ``covers_from`` is set on a time-based credit (downgrade, cancellation):
    it covers its invoice line's service period from that time to the end.
    """

    description: str
    net: int
    tax: int
    tax_rate_bps: int
    invoice_line_id: str | None = None
    quantity: int | None = None
    unit_amount: int | None = None
    covers_from: datetime | None = None

    @property
    def total(self) -> int:
        return self.net + self.tax


@dataclass(frozen=True)
class CreditNote:
    id: str
    number: str
    sequence: int
    invoice_id: str
    customer_id: str
    currency: str
    reason: Reason
    lines: tuple[CreditNoteLine, ...]
    pre_payment_amount: int
    refund_amount: int
    credit_amount: int
    out_of_band_amount: int
    trigger: Trigger
    refund_id: str | None = None
    policy: str | None = None
    memo: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: CreditNoteStatus = CreditNoteStatus.ISSUED
    #: the upstream event that voided it (set by :meth:`voided`, not read back from storage)
    voided_by: Trigger | None = field(default=None, compare=False)
    #: the accounting date of the note, its events and its journal (None: stored before it had one)
    effective_at: datetime | None = None
    #: its refunds: linked ones first (in the order given), then new ones newest payment first
    refunds: tuple[Refund, ...] = ()

    @property
    def refund_status(self) -> RefundStatus:
        """``none``, ``pending``, ``succeeded``, ``failed`` or ``partially_failed`` (docs/rules.md)."""
        return refund_status(refund.state for refund in self.refunds)

    def __post_init__(self) -> None:
        # the figures of the lines, summed once: every field is immutable but ``metadata``
        # (which no figure reads), and ``replace`` builds a new note (summed again). Kept
        # out of the fields, so equality, ``repr`` and ``replace`` are what they were.
        object.__setattr__(self, "_subtotal", sum(line.net for line in self.lines))
        object.__setattr__(self, "_tax", sum(line.tax for line in self.lines))

    @property
    def subtotal(self) -> int:
        return self._subtotal  # type: ignore[attr-defined, no-any-return]

    @property
    def tax(self) -> int:
        return self._tax  # type: ignore[attr-defined, no-any-return]

    @property
    def total(self) -> int:
        return self._subtotal + self._tax  # type: ignore[attr-defined, no-any-return]

    @property
    def post_payment_amount(self) -> int:
        return self.total - self.pre_payment_amount

    @property
    def type(self) -> CreditNoteType:
        if self.post_payment_amount == 0:
            return CreditNoteType.PRE_PAYMENT
        if self.pre_payment_amount == 0:
            return CreditNoteType.POST_PAYMENT
        return CreditNoteType.MIXED

    @property
    def journal(self) -> tuple[JournalLine, ...]:
        """Debit what was credited (net, tax); credit where it went.

        Built once per note (it reads only immutable fields) and kept with it.
        """
        journal: tuple[JournalLine, ...] | None = self.__dict__.get("_journal")
        if journal is None:
            journal = self._journal_lines()
            object.__setattr__(self, "_journal", journal)
        return journal

    def _journal_lines(self) -> tuple[JournalLine, ...]:
        debits = ((Account.CONTRA_REVENUE, self.subtotal), (Account.SALES_TAX_PAYABLE, self.tax))
        credits = ((Account.ACCOUNTS_RECEIVABLE, self.pre_payment_amount),
                   (Account.REFUNDS_PAYABLE, self.refund_amount),
                   (Account.CUSTOMER_CREDIT_BALANCE, self.credit_amount),
                   (Account.OUT_OF_BAND_SETTLEMENT, self.out_of_band_amount))
        # only the lines that carry an amount are built (a line of zeros is left out)
        return (*(JournalLine(account, debit=amount) for account, amount in debits if amount),
                *(JournalLine(account, credit=amount) for account, amount in credits if amount))

    @property
    def void_journal(self) -> tuple[JournalLine, ...]:
        """The exact reverse of the issue journal."""
        return tuple(entry.reversed() for entry in self.journal)

    def voided(self, by: Trigger) -> CreditNote:
        return replace(self, status=CreditNoteStatus.VOID, voided_by=by)

    def with_refund(self, settled: Refund) -> CreditNote:
        """This credit note with one of its refunds replaced by its settled self."""
        if all(refund.refund_id != settled.refund_id for refund in self.refunds):
            raise ValueError("the refund is not this credit note's")
        return replace(self, refunds=tuple(settled if refund.refund_id == settled.refund_id
                                           else refund for refund in self.refunds))


def refund_order(refund: Refund) -> tuple[bool, int, str]:
    """A credit note's refunds in order: linked first, then newest payment first, then by id."""
    return (not refund.linked, -refund.payment_sequence, refund.refund_id)


def refund_outcome_journal(amount: int, outcome: RefundState,
                           resettled_to: FailureSettlement | None) -> tuple[JournalLine, ...]:
    """The lines a refund's outcome posts (docs/rules.md, Refunds), balanced.

    Succeeded: debit ``refunds_payable``, credit ``cash``. Failed and settled to
    the balance: debit ``refunds_payable``, credit ``customer_credit_balance``.
    Failed and settled as none (it stays in ``refunds_payable``), or pending: none.
    """
    if outcome is RefundState.SUCCEEDED:
        return (JournalLine(Account.REFUNDS_PAYABLE, debit=amount),
                JournalLine(Account.CASH, credit=amount))
    if outcome is RefundState.FAILED and resettled_to is FailureSettlement.CUSTOMER_BALANCE:
        return (JournalLine(Account.REFUNDS_PAYABLE, debit=amount),
                JournalLine(Account.CUSTOMER_CREDIT_BALANCE, credit=amount))
    return ()


def refund_journal(refund: Refund) -> tuple[JournalLine, ...]:
    """The lines of one refund as it stands (a linked one's are posted at issue)."""
    return refund_outcome_journal(refund.amount, refund.state, refund.resettled_to)


#: Limits of a credit note's metadata (as on issue): keys, key length, value length.
METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_LENGTH = 40
METADATA_MAX_VALUE_LENGTH = 500


def merged_metadata(current: Mapping[str, Any], patch: Mapping[str, str | None]) -> dict[str, Any]:
    """``current`` with ``patch`` merged key by key; a key set to None is removed."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def credit_note_number(invoice_number: str, sequence: int) -> str:
    """``ACME-0042-CN-01``: per invoice, gapless, at least two digits."""
    return f"{invoice_number}-CN-{sequence:02d}"


_NAMESPACE = uuid.UUID("6c1f3a52-8d0e-4b7c-9f51-2f1d6a0c7e11").bytes


def derived_id(prefix: str, trigger: Trigger, purpose: str = "") -> str:
    """A stable id for an effect of ``trigger``: the same trigger always yields the same id.

    Ids derived from the upstream ``source`` + ``id`` make a redelivered event
    collide with its first effect instead of creating a second one.
    """
    name = f"{trigger.source}\n{trigger.id}\n{purpose}"
    return f"{prefix}_{uuid5_hex(_NAMESPACE, name)[:24]}"
