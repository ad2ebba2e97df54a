"""What must hold in the database at rest, checked by set-based SQL (``creditnotes verify``).

Most of these are also guarded by the code, and some by constraints and
triggers of the migration; this module checks them all again, independently,
so that a bug, a manual fix or a restore that slipped past those guards shows
up. Each check is one query (a few aggregates with ``GROUP BY`` and hash
joins, no per-row round trips, details formatted only for failing rows), so
the check stays linear on a database with millions of rows (about half a
minute for a million credit notes on a small machine). All queries run in
one read-only ``REPEATABLE READ`` transaction: they see one snapshot, so a
service writing meanwhile cannot make two figures disagree that agree in
every commit.

A violation names a stable code, its subject (an invoice, an invoice line, a
credit note, an outbox event...) and the figures; ids and amounts only, never
a memo, metadata or other personal data.

1.  ``credits_exceed_total``: per invoice, the non-void credit notes add up to
    at most the invoice total.
2.  ``credited_amount_disagrees``: per invoice, those non-void credit notes add
    up to ``pre_payment_credited + post_payment_credited``, their pre-payment
    parts to ``pre_payment_credited`` and their post-payment parts
    (``total - pre_payment_amount``) to ``post_payment_credited``.
3.  ``amount_remaining_negative``: ``total - customer_balance_applied -
    amount_paid - pre_payment_credited`` is never negative.
4.  ``refunds_exceed_cash``: ``refunded - refunds_failed`` (the cash given
    back or promised) never exceeds ``amount_paid`` (the cash collected);
    ``refunded`` equals the refunds of all the invoice's credit notes, void ones
    included (a void note never had a refund), and ``refunds_failed`` the
    amount of its failed refunds.
    Payments and refunds (migration 0016):
    ``payments_disagree``: ``amount_paid`` is the sum of the applied parts of
    the invoice's payments, each applied part lies within ``[0, amount]``, and
    the payment recorded at finalization (sequence 0) has no id and is applied
    whole; ``refunds_exceed_payment``: per payment, its pending and succeeded
    refunds add up to at most its applied part (and every refund points at a
    payment of its invoice); ``refund_id_reused``: a refund id appears once
    (the primary key says so too), and a credit note's legacy ``refund_id``
    names a refund of that note; ``refunds_disagree``: per credit note, its
    refunds add up to its ``refund_amount`` and belong to its invoice;
    ``refunds_payable_open``: per invoice, what the journals leave open in
    ``refunds_payable`` (credits of the credit-note journals minus debits of
    the refund journals) is exactly its pending refunds plus its failed ones
    settled as ``none``.
5.  ``line_over_credited``: per invoice line, the credited net, tax and
    quantity lie within ``[0, net]``, ``[0, tax]`` and ``[0, quantity]``;
    ``line_credits_disagree``: they equal the sums of the non-void credit-note
    lines pointing at that invoice line (and no credit-note line points at a
    line the invoice does not have).
6.  ``journal_unbalanced``: per credit note, an ``issue`` entry exists, each
    entry balances (debits = credits), the issue entry debits the note's total,
    a void note has a ``void`` entry that is the exact reverse of its issue
    entry (same accounts, debit and credit swapped), and an issued note has none.
    ``refund_journal_unbalanced``: per refund, its journal lines are exactly
    what its state posts: succeeded (linked ones too), ``refunds_payable``
    debit / ``cash`` credit of its amount; failed and settled to the customer
    balance, ``refunds_payable`` debit / ``customer_credit_balance`` credit;
    pending, or failed and settled as ``none``, no lines.
7.  ``note_parts_disagree``: a credit note's subtotal and tax are the sums of
    its lines, ``total = subtotal + tax``, the pre-payment part lies within
    ``[0, total]`` and ``refund + credit + out_of_band = total - pre_payment``.
8.  Outbox events of credit notes (the outbox rows are the effects the world
    hears of): every credit note has exactly one published
    ``credit_note.issued`` row whose ``data.id`` is the note's id
    (``issued_event_missing``, ``issued_event_duplicated``,
    ``issued_event_unpublished``); every void note likewise one
    ``credit_note.voided`` row (``voided_event_*``); every refund that is not
    linked exactly one ``refund.requested`` row whose ``data.id`` is the refund
    id (``refund_event_*``), asking for its amount, on its payment, for its
    credit note (``refund_event_mismatched``); linked refunds have none. No
    such row points at a credit note that does not exist, is not void (for
    ``credit_note.voided``) or at a refund that is not a requested one (for
    ``refund.requested``): ``event_orphaned``.
    Every settled refund that is not linked has exactly one
    ``credit_note.refund_succeeded`` or ``credit_note.refund_failed`` row
    (``data.refund_id``) of its outcome, amount and settlement
    (``refund_outcome_event_missing``, ``_duplicated``, ``_mismatched``; one
    for a refund that is pending, linked or unknown is ``event_orphaned``).
    Every amount sent to a customer's credit balance (a credit note's
    ``credit_amount``, a failed refund settled to the balance, a payment's
    overpayment) has exactly one ``customer_balance.credited`` row with its
    reason, amount, customer, currency and invoice, and every such row
    announces one of them (``balance_event_missing``, ``_duplicated``,
    ``_mismatched``, ``_orphaned``). Overpayments of payments without an id
    are matched per invoice in the order of the payments.
    A row still waiting for the relay counts as unpublished: verify a quiet
    service, or expect the events of the last moment to show here. An event
    written before the outbox's retention horizon (``retention_horizons``:
    retention deleted published rows older than it) may be missing.
9.  ``numbers_not_gapless``: per invoice, the credit-note sequences are
    exactly ``1..n`` with ``n = credit_note_count``, and each number is
    ``<invoice number>-CN-<sequence, at least two digits>``.
10. ``duplicate_processed_message``: an upstream event ``(source, id)`` is in
    the processed-message ledger once (the primary key says so too);
    ``duplicate_trigger``: no two credit notes share an upstream event
    ``(trigger_source, trigger_id)``.
11. ``outbox_event_id_reused``: no two outbox rows share an event id (UNIQUE
    says so too); downstream deduplicates by it.
12. ``status_disagrees_with_amounts``: ``amount_paid`` never exceeds the
    amount due; a ``paid`` invoice has nothing left to pay and an ``open``
    one has something (docs/rules.md: status and amounts agree).
13. ``line_coverage_disagrees``: an invoice line's ``time_credits`` (the
    coverage of time-based credits, ``[min, period end)``) list exactly the
    ``covers_from`` of the non-void credit-note lines on it.
14. ``policy_cap_exceeded``: for each non-void credit note issued under a
    policy (``<type>:max_credit_bps=<bps>``), the non-void credit notes of its
    trigger type on its invoice up to it add up to at most ``bps`` of the
    invoice total (caps are cumulative per invoice and trigger type; a void
    only lowers the sum, so what held at issue still holds).
15. Edits and dates (migration 0016): ``note_edit_unrecorded``: a credit
    note's memo and metadata are those of its latest ``credit_note_updates``
    row (of the last transaction that wrote one), or, without any, those of
    its ``credit_note.issued`` event and no ``updated_at``;
    ``updated_event_missing`` / ``updated_event_duplicated``: each
    ``credit_note_updates`` row has exactly one ``credit_note.updated`` event
    of its note and trigger with its memo and metadata (before the outbox's
    retention horizon it may be missing); ``journal_dated_otherwise``: a
    note's issue journal is dated by its ``effective_at``, a refund's journal
    by its outcome's ``outcome_at`` (a linked refund's by its note's
    ``effective_at``).
16. ``totals_disagree`` (migration 0018): the totals the database keeps for its deferred
    checks (``invoice_totals``, ``invoice_trigger_credit_totals``,
    ``invoice_line_credit_totals``, ``payment_refund_totals``) equal the sums of the
    history they stand for. Only triggers write them; a drift means someone with DDL
    rights (the tables' owner, a superuser) turned triggers off or wrote them by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Violation:
    invariant: str  # a stable code from INVARIANTS
    subject: str  # what breaks it: "invoice in_1001", "credit note ACME-1001-CN-02", ...
    detail: str  # the figures: ids and amounts only


@dataclass(frozen=True)
class Invariant:
    code: str
    description: str


INVARIANTS: tuple[Invariant, ...] = (
    Invariant("credits_exceed_total",
              "the non-void credit notes of an invoice add up to at most its total"),
    Invariant("credited_amount_disagrees",
              "an invoice's pre- and post-payment credited amounts equal those of its "
              "non-void credit notes"),
    Invariant("amount_remaining_negative", "no invoice has a negative amount remaining"),
    Invariant("refunds_exceed_cash",
              "an invoice's refunds not failed are at most the cash paid; its refunded and "
              "failed amounts equal those of its credit notes' refunds"),
    Invariant("payments_disagree",
              "an invoice's amount paid is the sum of its payments' applied parts; the "
              "payment at finalization has no id"),
    Invariant("refunds_exceed_payment",
              "a payment's pending and succeeded refunds add up to at most its applied part"),
    Invariant("refund_id_reused", "a refund id appears once"),
    Invariant("refunds_disagree",
              "a credit note's refunds add up to its refund amount and belong to its invoice"),
    Invariant("refunds_payable_open",
              "an invoice's open refunds payable equal its pending refunds plus its failed "
              "ones settled as none"),
    Invariant("line_over_credited",
              "an invoice line's credited net, tax and quantity lie within the line"),
    Invariant("line_credits_disagree",
              "an invoice line's credited net, tax and quantity equal those of the non-void "
              "credit-note lines on it"),
    Invariant("journal_unbalanced",
              "each credit note has a balanced issue journal debiting its total, and a void "
              "note its exact reverse"),
    Invariant("refund_journal_unbalanced",
              "each refund's journal lines balance and are what its outcome posts"),
    Invariant("note_parts_disagree",
              "a credit note's subtotal, tax and settlement parts agree with its lines and "
              "its total"),
    Invariant("issued_event_missing", "every credit note has a credit_note.issued event"),
    Invariant("issued_event_duplicated",
              "every credit note has at most one credit_note.issued event"),
    Invariant("issued_event_unpublished", "every credit_note.issued event was published"),
    Invariant("voided_event_missing", "every void credit note has a credit_note.voided event"),
    Invariant("voided_event_duplicated",
              "every void credit note has at most one credit_note.voided event"),
    Invariant("voided_event_unpublished", "every credit_note.voided event was published"),
    Invariant("refund_event_missing",
              "every refund that is not linked has a refund.requested event"),
    Invariant("refund_event_duplicated",
              "every refund that is not linked has at most one refund.requested event"),
    Invariant("refund_event_unpublished", "every refund.requested event was published"),
    Invariant("refund_event_mismatched",
              "a refund.requested event asks for its refund's amount, payment and credit note"),
    Invariant("refund_outcome_event_missing",
              "every settled refund that is not linked has a credit_note.refund_succeeded or "
              "_failed event"),
    Invariant("refund_outcome_event_duplicated",
              "every settled refund has at most one refund outcome event"),
    Invariant("refund_outcome_event_mismatched",
              "a refund outcome event states its refund's outcome, amount and settlement"),
    Invariant("balance_event_missing",
              "every amount sent to a customer's balance has a customer_balance.credited event"),
    Invariant("balance_event_duplicated",
              "every amount sent to a customer's balance has at most one "
              "customer_balance.credited event"),
    Invariant("balance_event_mismatched",
              "a customer_balance.credited event states the amount, customer, currency and "
              "invoice of what went to the balance"),
    Invariant("balance_event_orphaned",
              "every customer_balance.credited event announces an amount that went to the "
              "balance"),
    Invariant("event_orphaned",
              "every credit-note or refund event belongs to a credit note or refund in the "
              "state it announces"),
    Invariant("numbers_not_gapless",
              "an invoice's credit notes are numbered 1..n, gapless, as <invoice number>-CN-NN"),
    Invariant("duplicate_processed_message",
              "each upstream event is in the processed-message ledger once"),
    Invariant("duplicate_trigger", "each upstream event caused at most one credit note"),
    Invariant("outbox_event_id_reused", "no two outbox rows share an event id"),
    Invariant("status_disagrees_with_amounts",
              "a paid invoice has nothing left to pay, an open one has, and none was paid more "
              "than its amount due"),
    Invariant("line_coverage_disagrees",
              "an invoice line's time-based coverage lists exactly the times of the non-void "
              "time-based credits on it"),
    Invariant("policy_cap_exceeded",
              "the non-void credit notes of a trigger type on an invoice stay within the "
              "policy cap each of them was issued under"),
    Invariant("note_edit_unrecorded",
              "a credit note's memo and metadata are those of its latest recorded update, "
              "or as issued"),
    Invariant("updated_event_missing",
              "every recorded credit-note update has a credit_note.updated event of its "
              "memo and metadata"),
    Invariant("updated_event_duplicated",
              "every recorded credit-note update has at most one credit_note.updated event"),
    Invariant("journal_dated_otherwise",
              "an issue journal is dated by its credit note's effective_at, a refund's by "
              "its outcome (a linked one's by its credit note)"),
    Invariant("totals_disagree",
              "the running totals the database keeps for its checks (migration 0018) equal "
              "the sums of the credit notes, lines, payments and refunds they stand for"),
)

# Every query returns (invariant, subject, detail); the values come only from the database.

_CREDITS_EXCEED_TOTAL = """
SELECT 'credits_exceed_total' AS invariant, format('invoice %s', i.id) AS subject,
       format('non-void credit notes total %s, more than the invoice total %s',
              c.credited, i.total) AS detail
FROM invoices AS i
JOIN (SELECT invoice_id, sum(total) AS credited
      FROM credit_notes WHERE status <> 'void' GROUP BY invoice_id) AS c
  ON c.invoice_id = i.id
WHERE c.credited > i.total
"""

_CREDITED_AMOUNT_DISAGREES = """
SELECT 'credited_amount_disagrees' AS invariant, format('invoice %s', i.id) AS subject,
       format('non-void credit notes total %s (pre-payment %s + post-payment %s); the invoice '
              'records pre-payment %s + post-payment %s',
              coalesce(c.credited, 0), coalesce(c.pre_payment, 0), coalesce(c.post_payment, 0),
              i.pre_payment_credited, i.post_payment_credited) AS detail
FROM invoices AS i
LEFT JOIN (SELECT invoice_id, sum(total) AS credited, sum(pre_payment_amount) AS pre_payment,
                  sum(total - pre_payment_amount) AS post_payment
           FROM credit_notes WHERE status <> 'void' GROUP BY invoice_id) AS c
  ON c.invoice_id = i.id
WHERE coalesce(c.credited, 0) <> i.pre_payment_credited + i.post_payment_credited
   OR coalesce(c.pre_payment, 0) <> i.pre_payment_credited
   OR coalesce(c.post_payment, 0) <> i.post_payment_credited
"""

_AMOUNT_REMAINING_NEGATIVE = """
SELECT 'amount_remaining_negative' AS invariant, format('invoice %s', id) AS subject,
       format('amount remaining %s = total %s - customer balance applied %s - paid %s '
              '- pre-payment credits %s',
              total - customer_balance_applied - amount_paid - pre_payment_credited, total,
              customer_balance_applied, amount_paid, pre_payment_credited) AS detail
FROM invoices
WHERE total - customer_balance_applied - amount_paid - pre_payment_credited < 0
"""

_REFUNDS_EXCEED_CASH = """
SELECT 'refunds_exceed_cash' AS invariant, format('invoice %s', i.id) AS subject,
       format('refunded %s, failed %s, of cash paid %s; its credit notes refund %s, its '
              'failed refunds add up to %s', i.refunded, i.refunds_failed, i.amount_paid,
              coalesce(n.refunds, 0), coalesce(r.failed, 0)) AS detail
FROM invoices AS i
LEFT JOIN (SELECT invoice_id, sum(refund_amount) AS refunds
           FROM credit_notes GROUP BY invoice_id) AS n
  ON n.invoice_id = i.id
LEFT JOIN (SELECT invoice_id, sum(amount) FILTER (WHERE status = 'failed') AS failed
           FROM refunds GROUP BY invoice_id) AS r
  ON r.invoice_id = i.id
WHERE i.refunded - i.refunds_failed > i.amount_paid OR i.refunded <> coalesce(n.refunds, 0)
   OR i.refunds_failed <> coalesce(r.failed, 0)
"""

_PAYMENTS_DISAGREE = """
WITH per_invoice AS (
    SELECT invoice_id, count(*) AS payments, sum(applied) AS applied,
           count(*) FILTER (WHERE sequence = 0 AND (payment_id IS NOT NULL
                                                    OR applied <> amount)) AS odd_first,
           count(*) FILTER (WHERE applied NOT BETWEEN 0 AND amount OR amount <= 0)
               AS odd_applied
    FROM payments GROUP BY invoice_id
)
SELECT 'payments_disagree' AS invariant,
       format('invoice %s', coalesce(i.id, p.invoice_id)) AS subject,
       concat_ws('; ',
           CASE WHEN i.id IS NULL
                THEN format('%s payment(s) of an invoice that does not exist', p.payments) END,
           CASE WHEN i.id IS NOT NULL AND coalesce(p.applied, 0) <> i.amount_paid
                THEN format('amount paid %s; its %s payment(s) applied %s', i.amount_paid,
                            coalesce(p.payments, 0), coalesce(p.applied, 0)) END,
           CASE WHEN p.odd_first > 0
                THEN 'the payment at finalization has an id or is not applied whole' END,
           CASE WHEN p.odd_applied > 0
                THEN format('%s payment(s) applied outside [0, amount]', p.odd_applied) END
       ) AS detail
FROM invoices AS i
FULL JOIN per_invoice AS p ON p.invoice_id = i.id
WHERE i.id IS NULL OR coalesce(p.applied, 0) <> i.amount_paid OR p.odd_first > 0
   OR p.odd_applied > 0
"""

_REFUNDS_EXCEED_PAYMENT = """
WITH held AS (
    SELECT invoice_id, payment_sequence, count(*) AS refunds,
           coalesce(sum(amount) FILTER (WHERE status <> 'failed'), 0) AS held
    FROM refunds GROUP BY invoice_id, payment_sequence
)
SELECT 'refunds_exceed_payment' AS invariant,
       format('payment %s#%s', h.invoice_id, h.payment_sequence) AS subject,
       CASE WHEN p.invoice_id IS NULL
            THEN format('%s refund(s) point at a payment the invoice does not have', h.refunds)
            ELSE format('pending and succeeded refunds %s of payment %s, which applied %s',
                        h.held, coalesce(p.payment_id, '(no id)'), p.applied) END AS detail
FROM held AS h
LEFT JOIN payments AS p ON p.invoice_id = h.invoice_id AND p.sequence = h.payment_sequence
WHERE p.invoice_id IS NULL OR h.held > p.applied
"""

_REFUND_ID_REUSED = """
SELECT 'refund_id_reused' AS invariant, format('refund %s', refund_id) AS subject,
       format('%s refund rows share this id (credit notes %s)', count(*),
              string_agg(credit_note_id, ', ' ORDER BY credit_note_id)) AS detail
FROM refunds
GROUP BY refund_id
HAVING count(*) > 1
UNION ALL
SELECT 'refund_id_reused', format('refund %s', n.refund_id),
       format('credit note %s names refund %s, a refund of credit note %s', n.id, n.refund_id,
              r.credit_note_id)
FROM credit_notes AS n
JOIN refunds AS r ON r.refund_id = n.refund_id
WHERE r.credit_note_id <> n.id
"""

_REFUNDS_DISAGREE = """
WITH per_note AS (
    SELECT r.credit_note_id, count(*) AS refunds, sum(r.amount) AS amount,
           count(*) FILTER (WHERE r.invoice_id IS DISTINCT FROM n.invoice_id) AS elsewhere
    FROM refunds AS r
    LEFT JOIN credit_notes AS n ON n.id = r.credit_note_id
    GROUP BY r.credit_note_id
)
SELECT 'refunds_disagree' AS invariant,
       format('credit note %s', coalesce(n.number, p.credit_note_id)) AS subject,
       CASE WHEN n.id IS NULL
            THEN format('%s refund(s) of %s belong to a credit note that does not exist',
                        p.refunds, p.amount)
            ELSE format('credit note %s refunds %s; its %s refund(s) add up to %s, %s of them '
                        'on another invoice', n.id, n.refund_amount, coalesce(p.refunds, 0),
                        coalesce(p.amount, 0), coalesce(p.elsewhere, 0)) END AS detail
FROM credit_notes AS n
FULL JOIN per_note AS p ON p.credit_note_id = n.id
WHERE n.id IS NULL OR coalesce(p.amount, 0) <> n.refund_amount OR p.elsewhere > 0
"""

_REFUNDS_PAYABLE_OPEN = """
WITH booked AS (
    SELECT n.invoice_id, j.credit - j.debit AS open
    FROM journal_lines AS j
    JOIN credit_notes AS n ON n.id = j.credit_note_id
    WHERE j.account = 'refunds_payable'
    UNION ALL
    SELECT r.invoice_id, l.credit - l.debit
    FROM refund_journal_lines AS l
    JOIN refunds AS r ON r.refund_id = l.refund_id
    WHERE l.account = 'refunds_payable'
), journals AS (
    SELECT invoice_id, sum(open) AS open FROM booked GROUP BY invoice_id
), owed AS (
    SELECT invoice_id,
           coalesce(sum(amount) FILTER (WHERE status = 'pending'), 0) AS pending,
           coalesce(sum(amount) FILTER (WHERE status = 'failed' AND resettled_to = 'none'), 0)
               AS unsettled
    FROM refunds GROUP BY invoice_id
)
SELECT 'refunds_payable_open' AS invariant,
       format('invoice %s', coalesce(j.invoice_id, o.invoice_id)) AS subject,
       format('the journals leave %s open in refunds_payable; pending refunds %s + failed '
              'refunds settled as none %s', coalesce(j.open, 0), coalesce(o.pending, 0),
              coalesce(o.unsettled, 0)) AS detail
FROM journals AS j
FULL JOIN owed AS o ON o.invoice_id = j.invoice_id
WHERE coalesce(j.open, 0) <> coalesce(o.pending, 0) + coalesce(o.unsettled, 0)
"""

_LINES = """
WITH credited AS (
    SELECT n.invoice_id, l.invoice_line_id AS line_id, sum(l.net) AS net, sum(l.tax) AS tax,
           coalesce(sum(l.quantity), 0) AS quantity
    FROM credit_note_lines AS l
    JOIN credit_notes AS n ON n.id = l.credit_note_id
    WHERE n.status <> 'void' AND l.invoice_line_id IS NOT NULL
    GROUP BY n.invoice_id, l.invoice_line_id
), lines AS (
    SELECT coalesce(il.invoice_id, c.invoice_id) AS invoice_id,
           coalesce(il.line_id, c.line_id) AS line_id,
           il.line_id IS NOT NULL AS known,
           il.quantity * il.unit_amount - il.discount AS net, il.tax, il.quantity,
           il.credited_net, il.credited_tax, il.credited_quantity,
           coalesce(c.net, 0) AS notes_net, coalesce(c.tax, 0) AS notes_tax,
           coalesce(c.quantity, 0) AS notes_quantity
    FROM invoice_lines AS il
    FULL JOIN credited AS c ON c.invoice_id = il.invoice_id AND c.line_id = il.line_id
), checked AS (
    SELECT lines.*,
           coalesce(credited_net NOT BETWEEN 0 AND net OR credited_tax NOT BETWEEN 0 AND tax
                    OR credited_quantity NOT BETWEEN 0 AND quantity, false) AS over_credited,
           coalesce(NOT known OR credited_net <> notes_net OR credited_tax <> notes_tax
                    OR credited_quantity <> notes_quantity, false) AS disagrees
    FROM lines
)
SELECT v.invariant, format('invoice line %s/%s', c.invoice_id, c.line_id) AS subject, v.detail
FROM checked AS c
CROSS JOIN LATERAL (VALUES
    ('line_over_credited', c.over_credited,
     format('credited net %s of %s, tax %s of %s, quantity %s of %s',
            c.credited_net, c.net, c.credited_tax, c.tax, c.credited_quantity, c.quantity)),
    ('line_credits_disagree', c.disagrees,
     CASE WHEN c.known
          THEN format('the line records credited net %s, tax %s, quantity %s; its non-void '
                      'credit-note lines add up to net %s, tax %s, quantity %s',
                      c.credited_net, c.credited_tax, c.credited_quantity,
                      c.notes_net, c.notes_tax, c.notes_quantity)
          ELSE format('non-void credit-note lines credit net %s, tax %s of a line the invoice '
                      'does not have', c.notes_net, c.notes_tax)
     END)
) AS v (invariant, failed, detail)
WHERE (c.over_credited OR c.disagrees) AND v.failed  -- details are formatted for failures only
"""

_JOURNAL_UNBALANCED = """
WITH per_account AS (
    SELECT credit_note_id, account,
           count(*) FILTER (WHERE entry = 'issue') AS issue_lines,
           count(*) FILTER (WHERE entry = 'void') AS void_lines,
           coalesce(sum(debit) FILTER (WHERE entry = 'issue'), 0) AS issue_debit,
           coalesce(sum(credit) FILTER (WHERE entry = 'issue'), 0) AS issue_credit,
           coalesce(sum(debit) FILTER (WHERE entry = 'void'), 0) AS void_debit,
           coalesce(sum(credit) FILTER (WHERE entry = 'void'), 0) AS void_credit
    FROM journal_lines GROUP BY credit_note_id, account
), journals AS (
    SELECT credit_note_id, sum(issue_lines) > 0 AS has_issue, sum(void_lines) > 0 AS has_void,
           sum(issue_debit) AS issue_debit, sum(issue_credit) AS issue_credit,
           sum(void_debit) AS void_debit, sum(void_credit) AS void_credit,
           count(*) FILTER (WHERE issue_debit <> void_credit OR issue_credit <> void_debit)
               AS unreversed
    FROM per_account GROUP BY credit_note_id
)
SELECT 'journal_unbalanced' AS invariant, format('credit note %s', number) AS subject,
       format('credit note %s: %s', id, problems) AS detail
FROM (SELECT n.id, n.number, concat_ws('; ',
          CASE WHEN NOT coalesce(j.has_issue, false) THEN 'no issue journal entry' END,
          CASE WHEN j.has_issue AND j.issue_debit <> j.issue_credit
               THEN format('the issue entry debits %s and credits %s', j.issue_debit,
                           j.issue_credit) END,
          CASE WHEN j.has_issue AND j.issue_debit <> n.total
               THEN format('the issue entry debits %s, the credit note total is %s',
                           j.issue_debit, n.total) END,
          CASE WHEN j.has_void AND j.void_debit <> j.void_credit
               THEN format('the void entry debits %s and credits %s', j.void_debit,
                           j.void_credit) END,
          CASE WHEN n.status = 'void' AND NOT coalesce(j.has_void, false)
               THEN 'void, but no void journal entry' END,
          CASE WHEN n.status = 'void' AND j.has_void AND j.unreversed > 0
               THEN format('the void entry is not the exact reverse of the issue entry on %s '
                           'account(s)', j.unreversed) END,
          CASE WHEN n.status <> 'void' AND j.has_void
               THEN 'not void, but it has a void journal entry' END) AS problems
      FROM credit_notes AS n
      LEFT JOIN journals AS j ON j.credit_note_id = n.id) AS checked
WHERE problems <> ''
"""

_REFUND_JOURNAL_UNBALANCED = """
WITH lines AS (
    SELECT refund_id, count(*) AS lines, sum(debit) AS debit, sum(credit) AS credit,
           coalesce(sum(debit) FILTER (WHERE account = 'refunds_payable'), 0) AS payable,
           coalesce(sum(credit) FILTER (WHERE account = 'cash'), 0) AS cash,
           coalesce(sum(credit) FILTER (WHERE account = 'customer_credit_balance'), 0)
               AS balance
    FROM refund_journal_lines GROUP BY refund_id
), expected AS (
    SELECT refund_id, amount, status, resettled_to,
           CASE WHEN status = 'succeeded' THEN 'cash'
                WHEN status = 'failed' AND resettled_to = 'customer_balance'
                THEN 'customer_credit_balance' END AS credited
    FROM refunds
)
SELECT 'refund_journal_unbalanced' AS invariant,
       format('refund %s', coalesce(x.refund_id, l.refund_id)) AS subject,
       CASE WHEN x.refund_id IS NULL
            THEN format('%s journal line(s) of a refund that does not exist', l.lines)
            ELSE format('%s refund of %s%s: its %s journal line(s) debit %s (refunds_payable '
                        '%s) and credit %s (cash %s, customer_credit_balance %s)', x.status,
                        x.amount, coalesce(' settled to ' || x.resettled_to, ''),
                        coalesce(l.lines, 0), coalesce(l.debit, 0), coalesce(l.payable, 0),
                        coalesce(l.credit, 0), coalesce(l.cash, 0), coalesce(l.balance, 0))
       END AS detail
FROM expected AS x
FULL JOIN lines AS l ON l.refund_id = x.refund_id
WHERE x.refund_id IS NULL
   OR (x.credited IS NULL AND l.refund_id IS NOT NULL)
   OR (x.credited IS NOT NULL
       AND (l.refund_id IS NULL OR l.debit <> x.amount OR l.credit <> x.amount
            OR l.payable <> x.amount
            OR (CASE x.credited WHEN 'cash' THEN l.cash ELSE l.balance END) <> x.amount))
"""

_NOTE_PARTS_DISAGREE = """
SELECT 'note_parts_disagree' AS invariant, format('credit note %s', n.number) AS subject,
       format('credit note %s: subtotal %s, tax %s, total %s; its lines add up to net %s, '
              'tax %s; refund %s + credit %s + out of band %s against total %s - pre-payment %s',
              n.id, n.subtotal, n.tax, n.total, coalesce(l.net, 0), coalesce(l.tax, 0),
              n.refund_amount, n.credit_amount, n.out_of_band_amount, n.total,
              n.pre_payment_amount) AS detail
FROM credit_notes AS n
LEFT JOIN (SELECT credit_note_id, sum(net) AS net, sum(tax) AS tax
           FROM credit_note_lines GROUP BY credit_note_id) AS l
  ON l.credit_note_id = n.id
WHERE coalesce(l.net, 0) <> n.subtotal OR coalesce(l.tax, 0) <> n.tax
   OR n.total <> n.subtotal + n.tax
   OR n.pre_payment_amount NOT BETWEEN 0 AND n.total
   OR n.refund_amount + n.credit_amount + n.out_of_band_amount <> n.total - n.pre_payment_amount
"""

_EVENTS = """
WITH expected AS (
    SELECT 'credit_note.issued' AS type, n.id AS key, format('credit note %s', n.number) AS subject,
           n.issued_at AS written_at, NULL::text AS amount, NULL::text AS payment_id,
           NULL::text AS credit_note_id
    FROM credit_notes AS n
    UNION ALL
    SELECT 'credit_note.voided', n.id, format('credit note %s', n.number), n.voided_at, NULL,
           NULL, NULL
    FROM credit_notes AS n WHERE n.status = 'void'
    UNION ALL
    SELECT 'refund.requested', r.refund_id, format('refund %s', r.refund_id), r.created_at,
           r.amount::text, p.payment_id, r.credit_note_id
    FROM refunds AS r
    LEFT JOIN payments AS p ON p.invoice_id = r.invoice_id AND p.sequence = r.payment_sequence
    WHERE NOT r.linked
), horizon AS (
    -- retention deleted published rows older than this: their events may be gone
    SELECT coalesce(max(pruned_before), '-infinity') AS pruned_before
    FROM retention_horizons WHERE table_name = 'outbox'
), outbox_rows AS (
    SELECT type, event_id, published_at, json_extract_path_text(payload, 'data', 'id') AS key,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'amount') END AS amount,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'payment_id') END AS payment_id,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'credit_note_id') END
               AS credit_note_id
    FROM outbox
    WHERE type IN ('credit_note.issued', 'credit_note.voided', 'refund.requested')
), events AS (
    -- min and max rather than DISTINCT lists: they aggregate by hash, and differ when copies do
    SELECT type, key, count(*) AS copies,
           count(*) FILTER (WHERE published_at IS NULL) AS unpublished,
           min(event_id) AS first_event_id,
           min(amount) AS amount, max(amount) AS other_amount,
           min(payment_id) AS payment_id, max(payment_id) AS other_payment_id,
           count(payment_id) AS with_payment_id,
           min(credit_note_id) AS credit_note_id, max(credit_note_id) AS other_credit_note_id
    FROM outbox_rows GROUP BY type, key
), matched AS (
    SELECT coalesce(x.type, e.type) AS type,
           CASE coalesce(x.type, e.type) WHEN 'credit_note.issued' THEN 'issued'
                WHEN 'credit_note.voided' THEN 'voided' ELSE 'refund' END AS kind,
           x.subject, coalesce(x.key, e.key) AS key, x.amount AS expected_amount,
           x.payment_id AS expected_payment_id, x.credit_note_id AS expected_credit_note_id,
           e.copies, e.unpublished, e.first_event_id, e.amount, e.payment_id, e.credit_note_id,
           x.key IS NOT NULL AND e.key IS NULL
               AND x.written_at >= (SELECT pruned_before FROM horizon) AS missing,
           x.key IS NOT NULL AND coalesce(e.copies > 1, false) AS duplicated,
           x.key IS NOT NULL AND coalesce(e.unpublished > 0, false) AS not_published,
           coalesce(x.type = 'refund.requested' AND e.key IS NOT NULL
                    AND (e.amount IS DISTINCT FROM x.amount OR e.other_amount <> e.amount
                         OR e.payment_id IS DISTINCT FROM x.payment_id
                         OR e.other_payment_id <> e.payment_id
                         OR e.with_payment_id NOT IN (0, e.copies)
                         OR e.credit_note_id IS DISTINCT FROM x.credit_note_id
                         OR e.other_credit_note_id <> e.credit_note_id), false) AS mismatched,
           x.key IS NULL AS orphaned
    FROM expected AS x
    FULL JOIN events AS e ON e.type = x.type AND e.key = x.key
)
SELECT v.invariant, v.subject, v.detail
FROM matched AS m
CROSS JOIN LATERAL (VALUES
    (m.missing, m.kind || '_event_missing', m.subject,
     format('%s %s has no %s row in the outbox',
            CASE m.kind WHEN 'refund' THEN 'refund' ELSE 'credit note' END, m.key, m.type)),
    (m.duplicated, m.kind || '_event_duplicated', m.subject,
     format('%s has %s %s rows in the outbox', m.key, m.copies, m.type)),
    (m.not_published, m.kind || '_event_unpublished', m.subject,
     format('%s of %s %s row(s) of %s have no published_at',
            m.unpublished, m.copies, m.type, m.key)),
    (m.mismatched, 'refund_event_mismatched', m.subject,
     format('refund.requested asks for %s on payment %s for credit note %s%s; the refund is %s '
            'on payment %s for credit note %s', m.amount, coalesce(m.payment_id, '(no id)'),
            m.credit_note_id, CASE WHEN m.copies > 1 THEN ' (its copies differ)' ELSE '' END,
            m.expected_amount, coalesce(m.expected_payment_id, '(no id)'),
            m.expected_credit_note_id)),
    (m.orphaned, 'event_orphaned', format('outbox event %s', m.first_event_id),
     format('%s %s row(s) name %s, but %s', m.copies, m.type, m.key,
            CASE m.type WHEN 'credit_note.issued' THEN 'there is no such credit note'
                        WHEN 'credit_note.voided' THEN 'no void credit note has this id'
                        ELSE 'no requested (not linked) refund has this id' END))
) AS v (failed, invariant, subject, detail)
-- details are formatted for failures only
WHERE (m.missing OR m.duplicated OR m.not_published OR m.mismatched OR m.orphaned) AND v.failed
"""

_REFUND_OUTCOME_EVENTS = """
WITH expected AS (
    SELECT refund_id, 'credit_note.refund_' || status AS type, amount::text AS amount,
           resettled_to, coalesce(outcome_at, created_at) AS written_at
    FROM refunds
    WHERE NOT linked AND status <> 'pending'
), horizon AS (
    SELECT coalesce(max(pruned_before), '-infinity') AS pruned_before
    FROM retention_horizons WHERE table_name = 'outbox'
), outbox_rows AS (
    SELECT event_id, type, json_extract_path_text(payload, 'data', 'refund_id') AS refund_id,
           json_extract_path_text(payload, 'data', 'amount') AS amount,
           json_extract_path_text(payload, 'data', 'resettled_to') AS resettled_to
    FROM outbox
    WHERE type IN ('credit_note.refund_succeeded', 'credit_note.refund_failed')
), events AS (
    SELECT refund_id, count(*) AS copies, min(event_id) AS first_event_id,
           min(type) AS type, max(type) AS other_type,
           min(amount) AS amount, max(amount) AS other_amount,
           min(resettled_to) AS resettled_to, max(resettled_to) AS other_resettled_to,
           count(resettled_to) AS with_resettled_to
    FROM outbox_rows GROUP BY refund_id
), matched AS (
    SELECT coalesce(x.refund_id, e.refund_id) AS refund_id, x.type AS expected_type,
           x.amount AS expected_amount, x.resettled_to AS expected_resettled_to,
           e.copies, e.first_event_id, e.type, e.amount, e.resettled_to,
           x.refund_id IS NOT NULL AND e.refund_id IS NULL
               AND x.written_at >= (SELECT pruned_before FROM horizon) AS missing,
           x.refund_id IS NOT NULL AND coalesce(e.copies > 1, false) AS duplicated,
           coalesce(x.refund_id IS NOT NULL AND e.refund_id IS NOT NULL
                    AND (e.type <> x.type OR e.other_type <> e.type
                         OR e.amount IS DISTINCT FROM x.amount OR e.other_amount <> e.amount
                         OR e.resettled_to IS DISTINCT FROM x.resettled_to
                         OR e.other_resettled_to <> e.resettled_to
                         OR e.with_resettled_to NOT IN (0, e.copies)), false) AS mismatched,
           x.refund_id IS NULL AS orphaned
    FROM expected AS x
    FULL JOIN events AS e ON e.refund_id = x.refund_id
)
SELECT v.invariant, v.subject, v.detail
FROM matched AS m
CROSS JOIN LATERAL (VALUES
    (m.missing, 'refund_outcome_event_missing', format('refund %s', m.refund_id),
     format('refund %s is %s but has no %s row in the outbox', m.refund_id,
            substr(m.expected_type, 20), m.expected_type)),
    (m.duplicated, 'refund_outcome_event_duplicated', format('refund %s', m.refund_id),
     format('refund %s has %s outcome rows in the outbox', m.refund_id, m.copies)),
    (m.mismatched, 'refund_outcome_event_mismatched', format('refund %s', m.refund_id),
     format('%s of %s%s%s; the refund is %s of %s%s', m.type, m.amount,
            coalesce(' settled to ' || m.resettled_to, ''),
            CASE WHEN m.copies > 1 THEN ' (its copies differ)' ELSE '' END,
            m.expected_type, m.expected_amount,
            coalesce(' settled to ' || m.expected_resettled_to, ''))),
    (m.orphaned, 'event_orphaned', format('outbox event %s', m.first_event_id),
     format('%s %s row(s) name refund %s, but no settled refund that is not linked has '
            'this id', m.copies, m.type, m.refund_id))
) AS v (failed, invariant, subject, detail)
WHERE (m.missing OR m.duplicated OR m.mismatched OR m.orphaned) AND v.failed
"""

_BALANCE_EVENTS = """
WITH expected AS (
    SELECT 'credit_note:' || n.id AS key, format('credit note %s', n.number) AS subject,
           'credit_note' AS reason, n.credit_amount::text AS amount, n.customer_id, n.currency,
           n.invoice_id, n.issued_at AS written_at
    FROM credit_notes AS n WHERE n.credit_amount > 0
    UNION ALL
    SELECT 'refund_failed:' || r.refund_id, format('refund %s', r.refund_id), 'refund_failed',
           r.amount::text, i.customer_id, i.currency, r.invoice_id,
           coalesce(r.outcome_at, r.created_at)
    FROM refunds AS r
    JOIN invoices AS i ON i.id = r.invoice_id
    WHERE r.status = 'failed' AND r.resettled_to = 'customer_balance'
    UNION ALL
    -- a payment without an id is matched by its rank among those of its invoice
    SELECT 'overpayment:' || p.invoice_id
               || CASE WHEN p.payment_id IS NOT NULL THEN '+' || p.payment_id
                       ELSE '#' || row_number() OVER (PARTITION BY p.invoice_id,
                                                          p.payment_id IS NULL
                                                      ORDER BY p.sequence) END,
           format('payment %s#%s', p.invoice_id, p.sequence), 'overpayment',
           (p.amount - p.applied)::text, i.customer_id, i.currency, p.invoice_id, p.received_at
    FROM payments AS p
    JOIN invoices AS i ON i.id = p.invoice_id
    WHERE p.amount > p.applied
), horizon AS (
    SELECT coalesce(max(pruned_before), '-infinity') AS pruned_before
    FROM retention_horizons WHERE table_name = 'outbox'
), outbox_rows AS (
    SELECT seq, event_id,
           json_extract_path_text(payload, 'data', 'reason') AS reason,
           json_extract_path_text(payload, 'data', 'amount') AS amount,
           json_extract_path_text(payload, 'data', 'customer_id') AS customer_id,
           json_extract_path_text(payload, 'data', 'currency') AS currency,
           json_extract_path_text(payload, 'data', 'invoice_id') AS invoice_id,
           json_extract_path_text(payload, 'data', 'credit_note_id') AS credit_note_id,
           json_extract_path_text(payload, 'data', 'refund_id') AS refund_id,
           json_extract_path_text(payload, 'data', 'payment_id') AS payment_id
    FROM outbox WHERE type = 'customer_balance.credited'
), keyed AS (
    SELECT o.*, coalesce(CASE o.reason
               WHEN 'credit_note' THEN 'credit_note:' || o.credit_note_id
               WHEN 'refund_failed' THEN 'refund_failed:' || o.refund_id
               WHEN 'overpayment' THEN 'overpayment:' || o.invoice_id
                   || CASE WHEN o.payment_id IS NOT NULL THEN '+' || o.payment_id
                           ELSE '#' || row_number() OVER (PARTITION BY o.reason, o.invoice_id,
                                                              o.payment_id IS NULL
                                                          ORDER BY o.seq) END
           END, 'event:' || o.event_id) AS key
    FROM outbox_rows AS o
), events AS (
    SELECT key, count(*) AS copies, min(event_id) AS first_event_id, min(reason) AS reason,
           min(amount) AS amount, max(amount) AS other_amount,
           min(customer_id) AS customer_id, max(customer_id) AS other_customer_id,
           min(currency) AS currency, max(currency) AS other_currency,
           min(invoice_id) AS invoice_id, max(invoice_id) AS other_invoice_id
    FROM keyed GROUP BY key
), matched AS (
    SELECT coalesce(x.key, e.key) AS key, x.subject, x.reason AS expected_reason,
           x.amount AS expected_amount, x.customer_id AS expected_customer_id,
           x.currency AS expected_currency, x.invoice_id AS expected_invoice_id,
           e.copies, e.first_event_id, e.reason, e.amount, e.customer_id, e.currency,
           e.invoice_id,
           x.key IS NOT NULL AND e.key IS NULL
               AND x.written_at >= (SELECT pruned_before FROM horizon) AS missing,
           x.key IS NOT NULL AND coalesce(e.copies > 1, false) AS duplicated,
           coalesce(x.key IS NOT NULL AND e.key IS NOT NULL
                    AND (e.amount IS DISTINCT FROM x.amount OR e.other_amount <> e.amount
                         OR e.customer_id IS DISTINCT FROM x.customer_id
                         OR e.other_customer_id <> e.customer_id
                         OR e.currency IS DISTINCT FROM x.currency
                         OR e.other_currency <> e.currency
                         OR e.invoice_id IS DISTINCT FROM x.invoice_id
                         OR e.other_invoice_id <> e.invoice_id), false) AS mismatched,
           x.key IS NULL AS orphaned
    FROM expected AS x
    FULL JOIN events AS e ON e.key = x.key
)
SELECT v.invariant, v.subject, v.detail
FROM matched AS m
CROSS JOIN LATERAL (VALUES
    (m.missing, 'balance_event_missing', m.subject,
     format('%s of %s (%s) to customer %s has no customer_balance.credited row in the outbox',
            m.expected_amount, m.expected_reason, m.key, m.expected_customer_id)),
    (m.duplicated, 'balance_event_duplicated', m.subject,
     format('%s (%s) has %s customer_balance.credited rows in the outbox', m.expected_reason,
            m.key, m.copies)),
    (m.mismatched, 'balance_event_mismatched', m.subject,
     format('customer_balance.credited says %s %s to customer %s for invoice %s%s; %s went '
            '%s %s to customer %s for invoice %s', m.amount, m.currency, m.customer_id,
            m.invoice_id, CASE WHEN m.copies > 1 THEN ' (its copies differ)' ELSE '' END,
            m.key, m.expected_amount, m.expected_currency, m.expected_customer_id,
            m.expected_invoice_id)),
    (m.orphaned, 'balance_event_orphaned', format('outbox event %s', m.first_event_id),
     format('%s customer_balance.credited row(s) with reason %s (%s): nothing of that went to '
            'the balance', m.copies, coalesce(m.reason, '(none)'), m.key))
) AS v (failed, invariant, subject, detail)
WHERE (m.missing OR m.duplicated OR m.mismatched OR m.orphaned) AND v.failed
"""

_NUMBERS_NOT_GAPLESS = """
WITH numbered AS (
    SELECT n.invoice_id, n.sequence, n.number,
           i.number || '-CN-' || CASE WHEN n.sequence >= 100 THEN n.sequence::text
                                      ELSE lpad(n.sequence::text, 2, '0') END AS expected
    FROM credit_notes AS n
    JOIN invoices AS i ON i.id = n.invoice_id
), per_invoice AS (
    SELECT invoice_id, count(*) AS notes, count(DISTINCT sequence) AS sequences,
           min(sequence) AS first, max(sequence) AS last,
           count(*) FILTER (WHERE number <> expected) AS misnumbered,
           min(format('%s where %s was expected', number, expected))
               FILTER (WHERE number <> expected) AS example
    FROM numbered GROUP BY invoice_id
)
SELECT 'numbers_not_gapless' AS invariant, format('invoice %s', i.id) AS subject,
       format('%s credit note(s), %s distinct sequence(s) from %s to %s; the invoice counts %s; '
              '%s misnumbered%s',
              coalesce(c.notes, 0), coalesce(c.sequences, 0), coalesce(c.first, 0),
              coalesce(c.last, 0), i.credit_note_count, coalesce(c.misnumbered, 0),
              coalesce(' (' || c.example || ')', '')) AS detail
FROM invoices AS i
LEFT JOIN per_invoice AS c ON c.invoice_id = i.id
WHERE coalesce(c.notes, 0) <> i.credit_note_count
   OR c.first <> 1 OR c.last <> c.notes OR c.sequences <> c.notes OR c.misnumbered > 0
"""

_DUPLICATE_PROCESSED_MESSAGE = """
SELECT 'duplicate_processed_message' AS invariant,
       format('processed message %s %s', source, id) AS subject,
       format('%s ledger rows for one upstream event', count(*)) AS detail
FROM processed_messages
GROUP BY source, id
HAVING count(*) > 1
"""

_DUPLICATE_TRIGGER = """
SELECT 'duplicate_trigger' AS invariant,
       format('trigger %s %s', trigger_source, trigger_id) AS subject,
       format('%s credit notes for one upstream event: %s', count(*),
              string_agg(number, ', ' ORDER BY number)) AS detail
FROM credit_notes
GROUP BY trigger_source, trigger_id
HAVING count(*) > 1
"""

_OUTBOX_EVENT_ID_REUSED = """
SELECT 'outbox_event_id_reused' AS invariant, format('outbox event %s', event_id) AS subject,
       format('%s outbox rows share this event id (seq %s)', count(*),
              string_agg(seq::text, ', ' ORDER BY seq)) AS detail
FROM outbox
GROUP BY event_id
HAVING count(*) > 1
"""

_STATUS_DISAGREES_WITH_AMOUNTS = """
SELECT 'status_disagrees_with_amounts' AS invariant, format('invoice %s', id) AS subject,
       format('status %s with amount due %s, paid %s, pre-payment credits %s, amount '
              'remaining %s', status, total - customer_balance_applied, amount_paid,
              pre_payment_credited,
              total - customer_balance_applied - amount_paid - pre_payment_credited) AS detail
FROM invoices
WHERE amount_paid > total - customer_balance_applied
   OR (status = 'paid') <> (total - customer_balance_applied - amount_paid
                            - pre_payment_credited = 0) AND status IN ('open', 'paid')
"""

_LINE_COVERAGE_DISAGREES = """
WITH credited AS (
    SELECT n.invoice_id, l.invoice_line_id AS line_id,
           array_agg(l.covers_from ORDER BY l.covers_from) AS times
    FROM credit_note_lines AS l
    JOIN credit_notes AS n ON n.id = l.credit_note_id
    WHERE n.status <> 'void' AND l.covers_from IS NOT NULL
    GROUP BY n.invoice_id, l.invoice_line_id
), lines AS (
    SELECT il.invoice_id, il.line_id, il.period_start, il.period_end,
           ARRAY(SELECT t FROM unnest(il.time_credits) AS t ORDER BY t) AS recorded
    FROM invoice_lines AS il
    WHERE cardinality(il.time_credits) > 0
)
SELECT 'line_coverage_disagrees' AS invariant,
       format('invoice line %s/%s', coalesce(l.invoice_id, c.invoice_id),
              coalesce(l.line_id, c.line_id)) AS subject,
       format('the line records time-based credits from %s; its non-void credit-note lines '
              'cover from %s', coalesce(l.recorded::text, '{}'),
              coalesce(c.times::text, '{}')) AS detail
FROM lines AS l
FULL JOIN credited AS c ON c.invoice_id = l.invoice_id AND c.line_id = l.line_id
WHERE l.recorded IS DISTINCT FROM c.times
"""

_POLICY_CAP_EXCEEDED = """
WITH capped AS (
    SELECT n.invoice_id, n.trigger_type, n.sequence, n.number,
           substring(n.policy FROM ':max_credit_bps=([0-9]{1,5})$')::integer AS bps,
           sum(n.total) OVER (PARTITION BY n.invoice_id, n.trigger_type
                              ORDER BY n.sequence) AS credited
    FROM credit_notes AS n
    WHERE n.status <> 'void'
)
SELECT 'policy_cap_exceeded' AS invariant, format('credit note %s', c.number) AS subject,
       format('the non-void %s credit notes of invoice %s up to sequence %s total %s, more than '
              '%s bps of the invoice total %s', c.trigger_type, c.invoice_id, c.sequence,
              c.credited, c.bps, i.total) AS detail
FROM capped AS c
JOIN invoices AS i ON i.id = c.invoice_id
WHERE c.bps IS NOT NULL AND c.credited > round(i.total::numeric * c.bps / 10000)
"""

_NOTE_EDIT_UNRECORDED = """
WITH latest AS (
    SELECT credit_note_id, max(written_xact) AS written_xact
    FROM credit_note_updates GROUP BY credit_note_id
), issued AS (
    SELECT json_extract_path_text(payload, 'data', 'id') AS id,
           json_extract_path_text(payload, 'data', 'memo') AS memo,
           (payload -> 'data' -> 'metadata')::jsonb AS metadata
    FROM outbox WHERE type = 'credit_note.issued'
), issued_otherwise AS (
    -- the notes whose issued event says another memo or metadata: one join, each event's
    -- JSON read once (a correlated EXISTS read every event again for every note)
    SELECT DISTINCT i.id FROM issued AS i JOIN credit_notes AS n ON n.id = i.id
    WHERE i.memo IS DISTINCT FROM n.memo OR i.metadata IS DISTINCT FROM n.metadata
)
SELECT 'note_edit_unrecorded' AS invariant, format('credit note %s', n.number) AS subject,
       CASE WHEN l.credit_note_id IS NULL
            THEN 'memo, metadata or updated_at differ from the note as issued, with no '
                 'recorded update'
            ELSE 'memo or metadata differ from its latest recorded update' END AS detail
FROM credit_notes AS n
LEFT JOIN latest AS l ON l.credit_note_id = n.id
LEFT JOIN issued_otherwise AS o ON o.id = n.id
WHERE (l.credit_note_id IS NOT NULL
       AND NOT EXISTS (SELECT FROM credit_note_updates AS u
                        WHERE u.credit_note_id = n.id
                          AND u.written_xact IS NOT DISTINCT FROM l.written_xact
                          AND u.memo IS NOT DISTINCT FROM n.memo AND u.metadata = n.metadata))
   OR (l.credit_note_id IS NULL AND (n.updated_at IS NOT NULL OR o.id IS NOT NULL))
"""

_UPDATED_EVENTS = """
WITH horizon AS (
    SELECT coalesce(max(pruned_before), '-infinity') AS pruned_before
    FROM retention_horizons WHERE table_name = 'outbox'
), events AS (
    SELECT json_extract_path_text(payload, 'data', 'id') AS id,
           json_extract_path_text(payload, 'data', 'trigger', 'source') AS source,
           json_extract_path_text(payload, 'data', 'trigger', 'id') AS trigger_id,
           json_extract_path_text(payload, 'data', 'memo') AS memo,
           (payload -> 'data' -> 'metadata')::jsonb AS metadata
    FROM outbox WHERE type = 'credit_note.updated'
), matched AS (
    SELECT u.credit_note_id, u.trigger_source, u.trigger_id, u.updated_at,
           count(e.id) FILTER (WHERE e.memo IS NOT DISTINCT FROM u.memo
                                 AND e.metadata = u.metadata) AS copies
    FROM credit_note_updates AS u
    LEFT JOIN events AS e ON e.id = u.credit_note_id AND e.source = u.trigger_source
                         AND e.trigger_id = u.trigger_id
    GROUP BY u.credit_note_id, u.trigger_source, u.trigger_id, u.updated_at
)
SELECT CASE WHEN m.copies = 0 THEN 'updated_event_missing'
            ELSE 'updated_event_duplicated' END AS invariant,
       format('credit note %s', n.number) AS subject,
       format('update %s/%s has %s credit_note.updated event(s) of its memo and metadata',
              m.trigger_source, m.trigger_id, m.copies) AS detail
FROM matched AS m
JOIN credit_notes AS n ON n.id = m.credit_note_id
CROSS JOIN horizon AS h
WHERE m.copies > 1 OR (m.copies = 0 AND m.updated_at >= h.pruned_before)
"""

_JOURNAL_DATED_OTHERWISE = """
SELECT 'journal_dated_otherwise' AS invariant, format('credit note %s', n.number) AS subject,
       format('%s issue journal line(s) dated otherwise than its effective_at %s', count(*),
              n.effective_at) AS detail
FROM journal_lines AS j
JOIN credit_notes AS n ON n.id = j.credit_note_id
WHERE j.entry = 'issue' AND j.effective_at IS DISTINCT FROM n.effective_at
GROUP BY n.number, n.effective_at
UNION ALL
SELECT 'journal_dated_otherwise', format('refund %s', r.refund_id),
       format('%s journal line(s) dated otherwise than its %s %s', count(*),
              CASE WHEN r.linked THEN 'credit note''s effective_at' ELSE 'outcome_at' END,
              CASE WHEN r.linked THEN n.effective_at ELSE r.outcome_at END)
FROM refund_journal_lines AS l
JOIN refunds AS r ON r.refund_id = l.refund_id
JOIN credit_notes AS n ON n.id = r.credit_note_id
WHERE (r.linked OR r.outcome_at IS NOT NULL)  -- a pending one's lines: refund_journal_unbalanced
  AND l.effective_at IS DISTINCT FROM (CASE WHEN r.linked THEN n.effective_at
                                            ELSE r.outcome_at END)
GROUP BY r.refund_id, r.linked, n.effective_at, r.outcome_at
"""

# Each totals row against what its history adds up to. A row of zeros counts as no row (a
# void leaves one behind). Two full passes over credit_notes and one over credit_note_lines,
# refunds and payments: the same order of cost as _LINES.
TOTALS_DISAGREE = """
WITH kept (tbl, key, v) AS (
    SELECT 'invoice_totals', ARRAY[invoice_id],
           ARRAY[pre_payment, post_payment, paid, refunded, refunds_failed]::text[]
      FROM invoice_totals
    UNION ALL
    SELECT 'invoice_trigger_credit_totals', ARRAY[invoice_id, trigger_type], ARRAY[total]::text[]
      FROM invoice_trigger_credit_totals
    UNION ALL
    SELECT 'invoice_line_credit_totals', ARRAY[invoice_id, line_id],
           ARRAY[net, tax, quantity, quantity_lines]::text[] || time_credits::text
      FROM invoice_line_credit_totals
    UNION ALL
    SELECT 'payment_refund_totals', ARRAY[invoice_id, payment_sequence::text],
           ARRAY[open]::text[]
      FROM payment_refund_totals
), summed (tbl, key, v) AS (
    SELECT 'invoice_totals', ARRAY[i.id], ARRAY[
               coalesce(n.pre, 0), coalesce(n.post, 0), coalesce(p.applied, 0),
               coalesce(r.refunded, 0), coalesce(r.failed, 0)]::text[]
      FROM invoices AS i
      LEFT JOIN (SELECT invoice_id, sum(pre_payment_amount) AS pre,
                        sum(total - pre_payment_amount) AS post
                   FROM credit_notes WHERE status = 'issued' GROUP BY invoice_id) AS n
             ON n.invoice_id = i.id
      LEFT JOIN (SELECT invoice_id, sum(applied) AS applied FROM payments
                  GROUP BY invoice_id) AS p ON p.invoice_id = i.id
      LEFT JOIN (SELECT invoice_id, sum(amount) AS refunded,
                        sum(amount) FILTER (WHERE status = 'failed') AS failed
                   FROM refunds GROUP BY invoice_id) AS r ON r.invoice_id = i.id
    UNION ALL
    SELECT 'invoice_trigger_credit_totals', ARRAY[invoice_id, trigger_type],
           ARRAY[sum(total)]::text[]
      FROM credit_notes WHERE status = 'issued' GROUP BY invoice_id, trigger_type
    UNION ALL
    SELECT 'invoice_line_credit_totals', ARRAY[n.invoice_id, l.invoice_line_id],
           ARRAY[sum(l.net), sum(l.tax), coalesce(sum(l.quantity), 0),
                 count(l.quantity)]::text[]
           || coalesce(array_agg(l.covers_from ORDER BY l.covers_from)
                           FILTER (WHERE l.covers_from IS NOT NULL), '{}')::text
      FROM credit_notes AS n JOIN credit_note_lines AS l ON l.credit_note_id = n.id
     WHERE n.status = 'issued' AND l.invoice_line_id IS NOT NULL
     GROUP BY n.invoice_id, l.invoice_line_id
    UNION ALL
    SELECT 'payment_refund_totals', ARRAY[invoice_id, payment_sequence::text],
           ARRAY[coalesce(sum(amount) FILTER (WHERE status <> 'failed'), 0)]::text[]
      FROM refunds GROUP BY invoice_id, payment_sequence
)
SELECT 'totals_disagree' AS invariant,
       format('%s %s', coalesce(k.tbl, s.tbl), array_to_string(coalesce(k.key, s.key), '/'))
           AS subject,
       format('kept %s; its history adds up to %s', coalesce(k.v::text, 'no row'),
              coalesce(s.v::text, 'nothing')) AS detail
  FROM kept AS k FULL JOIN summed AS s ON s.tbl = k.tbl AND s.key = k.key
 WHERE k.v IS DISTINCT FROM s.v
   AND NOT (coalesce(k.v, '{}') <@ ARRAY['0', '{}'] AND coalesce(s.v, '{}') <@ ARRAY['0', '{}'])
"""

_QUERIES: tuple[str, ...] = (
    _CREDITS_EXCEED_TOTAL,
    _CREDITED_AMOUNT_DISAGREES,
    _AMOUNT_REMAINING_NEGATIVE,
    _REFUNDS_EXCEED_CASH,
    _PAYMENTS_DISAGREE,
    _REFUNDS_EXCEED_PAYMENT,
    _REFUND_ID_REUSED,
    _REFUNDS_DISAGREE,
    _REFUNDS_PAYABLE_OPEN,
    _LINES,
    _JOURNAL_UNBALANCED,
    _REFUND_JOURNAL_UNBALANCED,
    _NOTE_PARTS_DISAGREE,
    _EVENTS,
    _REFUND_OUTCOME_EVENTS,
    _BALANCE_EVENTS,
    _NUMBERS_NOT_GAPLESS,
    _DUPLICATE_PROCESSED_MESSAGE,
    _DUPLICATE_TRIGGER,
    _OUTBOX_EVENT_ID_REUSED,
    _STATUS_DISAGREES_WITH_AMOUNTS,
    _LINE_COVERAGE_DISAGREES,
    _POLICY_CAP_EXCEEDED,
    _NOTE_EDIT_UNRECORDED,
    _UPDATED_EVENTS,
    _JOURNAL_DATED_OTHERWISE,
    TOTALS_DISAGREE,
)

_ORDER = {invariant.code: position for position, invariant in enumerate(INVARIANTS)}


async def check_invariants(database_url: str) -> list[Violation]:
    """Every violation of :data:`INVARIANTS` in the database, in their order, then by subject.

    An empty list means the database is consistent. Reads only, in one snapshot.
    """
    connection = await asyncpg.connect(database_url)
    try:
        violations: list[Violation] = []
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            for query in _QUERIES:
                violations.extend(
                    Violation(invariant=row["invariant"], subject=row["subject"],
                              detail=row["detail"])
                    for row in await connection.fetch(query))
    finally:
        await connection.close()
    unknown = {violation.invariant for violation in violations} - _ORDER.keys()
    if unknown:
        raise RuntimeError(f"invariant queries returned unknown codes: {sorted(unknown)}")
    return sorted(violations, key=lambda v: (_ORDER[v.invariant], v.subject, v.detail))
