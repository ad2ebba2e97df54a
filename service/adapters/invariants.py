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
4.  ``refunds_exceed_cash``: ``refunded`` never exceeds ``amount_paid`` (the
    cash collected) and equals the refunds of all the invoice's credit notes,
    void ones included (a void note never had a refund).
5.  ``line_over_credited``: per invoice line, the credited net, tax and
    quantity lie within ``[0, net]``, ``[0, tax]`` and ``[0, quantity]``;
    ``line_credits_disagree``: they equal the sums of the non-void credit-note
    lines pointing at that invoice line (and no credit-note line points at a
    line the invoice does not have).
6.  ``journal_unbalanced``: per credit note, an ``issue`` entry exists, each
    entry balances (debits = credits), the issue entry debits the note's total,
    a void note has a ``void`` entry that is the exact reverse of its issue
    entry (same accounts, debit and credit swapped), and an issued note has none.
7.  ``note_parts_disagree``: a credit note's subtotal and tax are the sums of
    its lines, ``total = subtotal + tax``, the pre-payment part lies within
    ``[0, total]`` and ``refund + credit + out_of_band = total - pre_payment``.
8.  Outbox events of credit notes (the outbox rows are the effects the world
    hears of): every credit note has exactly one published
    ``credit_note.issued`` row whose ``data.id`` is the note's id
    (``issued_event_missing``, ``issued_event_duplicated``,
    ``issued_event_unpublished``); every void note likewise one
    ``credit_note.voided`` row (``voided_event_*``); every note with a refund
    exactly one ``refund.requested`` row whose ``data.credit_note_id`` is the
    note's id (``refund_event_*``), asking for the note's refund amount under
    its refund id (``refund_event_mismatched``); and no such row points at a
    credit note that does not exist, is not void (for ``credit_note.voided``)
    or has no refund (for ``refund.requested``): ``event_orphaned``.
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
              "an invoice's refunded amount is at most the cash paid and equals its credit "
              "notes' refunds"),
    Invariant("line_over_credited",
              "an invoice line's credited net, tax and quantity lie within the line"),
    Invariant("line_credits_disagree",
              "an invoice line's credited net, tax and quantity equal those of the non-void "
              "credit-note lines on it"),
    Invariant("journal_unbalanced",
              "each credit note has a balanced issue journal debiting its total, and a void "
              "note its exact reverse"),
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
              "every credit note with a refund has a refund.requested event"),
    Invariant("refund_event_duplicated",
              "every credit note with a refund has at most one refund.requested event"),
    Invariant("refund_event_unpublished", "every refund.requested event was published"),
    Invariant("refund_event_mismatched",
              "a refund.requested event asks for its credit note's refund amount and refund id"),
    Invariant("event_orphaned",
              "every credit-note event belongs to a credit note in the state it announces"),
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
       format('refunded %s of cash paid %s; the refunds of its credit notes add up to %s',
              i.refunded, i.amount_paid, coalesce(r.refunds, 0)) AS detail
FROM invoices AS i
LEFT JOIN (SELECT invoice_id, sum(refund_amount) AS refunds
           FROM credit_notes GROUP BY invoice_id) AS r
  ON r.invoice_id = i.id
WHERE i.refunded > i.amount_paid OR i.refunded <> coalesce(r.refunds, 0)
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
    SELECT n.id, n.number, n.refund_amount, n.refund_id, k.type, k.written_at
    FROM credit_notes AS n
    CROSS JOIN LATERAL (VALUES ('credit_note.issued', true, n.issued_at),
                               ('credit_note.voided', n.status = 'void', n.voided_at),
                               ('refund.requested', n.refund_amount > 0, n.issued_at))
        AS k (type, wanted, written_at)
    WHERE k.wanted
), horizon AS (
    -- retention deleted published rows older than this: their events may be gone
    SELECT coalesce(max(pruned_before), '-infinity') AS pruned_before
    FROM retention_horizons WHERE table_name = 'outbox'
), outbox_rows AS (
    SELECT type, event_id, published_at,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'credit_note_id')
                ELSE json_extract_path_text(payload, 'data', 'id') END AS note_id,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'amount') END AS amount,
           CASE WHEN type = 'refund.requested'
                THEN json_extract_path_text(payload, 'data', 'id') END AS refund_id
    FROM outbox
    WHERE type IN ('credit_note.issued', 'credit_note.voided', 'refund.requested')
), events AS (
    -- min and max rather than DISTINCT lists: they aggregate by hash, and differ when copies do
    SELECT type, note_id, count(*) AS copies,
           count(*) FILTER (WHERE published_at IS NULL) AS unpublished,
           min(event_id) AS first_event_id,
           min(amount) AS amount, max(amount) AS other_amount,
           min(refund_id) AS refund_id, max(refund_id) AS other_refund_id
    FROM outbox_rows GROUP BY type, note_id
), matched AS (
    SELECT coalesce(x.type, e.type) AS type,
           CASE coalesce(x.type, e.type) WHEN 'credit_note.issued' THEN 'issued'
                WHEN 'credit_note.voided' THEN 'voided' ELSE 'refund' END AS kind,
           x.number, coalesce(x.id, e.note_id) AS note_id, x.refund_amount, x.refund_id,
           e.copies, e.unpublished, e.first_event_id, e.amount, e.other_amount,
           e.refund_id AS event_refund_id, e.other_refund_id,
           x.id IS NOT NULL AND e.note_id IS NULL
               AND x.written_at >= (SELECT pruned_before FROM horizon) AS missing,
           x.id IS NOT NULL AND coalesce(e.copies > 1, false) AS duplicated,
           x.id IS NOT NULL AND coalesce(e.unpublished > 0, false) AS not_published,
           coalesce(x.type = 'refund.requested' AND e.note_id IS NOT NULL
                    AND (e.amount IS DISTINCT FROM x.refund_amount::text
                         OR e.other_amount <> e.amount
                         OR e.refund_id IS DISTINCT FROM x.refund_id
                         OR e.other_refund_id <> e.refund_id), false) AS mismatched,
           x.id IS NULL AS orphaned
    FROM expected AS x
    FULL JOIN events AS e ON e.type = x.type AND e.note_id = x.id
)
SELECT v.invariant, v.subject, v.detail
FROM matched AS m
CROSS JOIN LATERAL (VALUES
    (m.missing, m.kind || '_event_missing', format('credit note %s', m.number),
     format('credit note %s has no %s row in the outbox', m.note_id, m.type)),
    (m.duplicated, m.kind || '_event_duplicated', format('credit note %s', m.number),
     format('credit note %s has %s %s rows in the outbox', m.note_id, m.copies, m.type)),
    (m.not_published, m.kind || '_event_unpublished', format('credit note %s', m.number),
     format('%s of %s %s row(s) of credit note %s have no published_at',
            m.unpublished, m.copies, m.type, m.note_id)),
    (m.mismatched, 'refund_event_mismatched', format('credit note %s', m.number),
     format('refund.requested asks for %s under refund id %s; credit note %s refunds %s under '
            'refund id %s',
            CASE WHEN m.other_amount = m.amount THEN m.amount
                 ELSE m.amount || ' to ' || m.other_amount END,
            CASE WHEN m.other_refund_id = m.event_refund_id THEN m.event_refund_id
                 ELSE m.event_refund_id || ' to ' || m.other_refund_id END,
            m.note_id, m.refund_amount, m.refund_id)),
    (m.orphaned, 'event_orphaned', format('outbox event %s', m.first_event_id),
     format('%s %s row(s) name credit note id %s, but %s', m.copies, m.type, m.note_id,
            CASE m.type WHEN 'credit_note.issued' THEN 'there is no such credit note'
                        WHEN 'credit_note.voided' THEN 'no void credit note has this id'
                        ELSE 'no credit note with a refund has this id' END))
) AS v (failed, invariant, subject, detail)
-- details are formatted for failures only
WHERE (m.missing OR m.duplicated OR m.not_published OR m.mismatched OR m.orphaned) AND v.failed
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

_QUERIES: tuple[str, ...] = (
    _CREDITS_EXCEED_TOTAL,
    _CREDITED_AMOUNT_DISAGREES,
    _AMOUNT_REMAINING_NEGATIVE,
    _REFUNDS_EXCEED_CASH,
    _LINES,
    _JOURNAL_UNBALANCED,
    _NOTE_PARTS_DISAGREE,
    _EVENTS,
    _NUMBERS_NOT_GAPLESS,
    _DUPLICATE_PROCESSED_MESSAGE,
    _DUPLICATE_TRIGGER,
    _OUTBOX_EVENT_ID_REUSED,
    _STATUS_DISAGREES_WITH_AMOUNTS,
    _LINE_COVERAGE_DISAGREES,
    _POLICY_CAP_EXCEEDED,
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
