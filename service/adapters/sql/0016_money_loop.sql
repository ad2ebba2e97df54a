-- The money loop (issue 12): payments as facts, refunds against payments with their
-- outcomes, linked refunds, credit-note edits and accounting dates.
--
-- What the database itself refuses, whatever the code does (each performed in
-- tests/integration/test_database_constraints.py and test_database_attacks.py):
--   - an invoice's amount_paid is the sum of its payments' applied parts, and a
--     payment id is recorded once per invoice (payments_match_invoice, a unique index);
--   - per payment, the refunds pending or succeeded never exceed its applied part
--     (refunds_within_payment);
--   - a refund id appears once, ever, linked or requested (the primary key of refunds);
--   - per credit note, its refunds add up to its refund_amount, all on its invoice
--     (refunds_match_credit_note), written only with the note;
--   - a refund moves only pending -> succeeded | failed, once, and nothing else of it
--     changes (refunds_settle_once); invoices.refunded and refunds_failed are what
--     its refunds say (invoice_refund_counters);
--   - each settled refund carries exactly its journal, balanced, written by the
--     transaction that settled it (refund_settled_with_journal, refund_journal_balanced).
-- Deferred constraint triggers of one event fire in name order (see 0013).

-- 1. Payments: one row per payment, in the order received (0: amount_paid given at
-- finalization, no id, all applied; backfilled below as one payment per invoice).
CREATE TABLE payments (
    invoice_id      text NOT NULL REFERENCES invoices (id),
    sequence        integer NOT NULL CHECK (sequence >= 0),
    payment_id      text,
    amount          bigint NOT NULL CHECK (amount > 0),
    applied         bigint NOT NULL,
    trigger_source  text,
    trigger_id      text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (invoice_id, sequence),
    CONSTRAINT payment_applied_within_amount CHECK (applied BETWEEN 0 AND amount),
    -- the finalization payment has no id, no upstream event of its own and is all applied
    CONSTRAINT finalization_payment CHECK (
        sequence > 0 OR (payment_id IS NULL AND applied = amount AND trigger_source IS NULL)),
    CONSTRAINT payment_trigger CHECK (
        (trigger_source IS NULL) = (trigger_id IS NULL) AND (sequence = 0 OR trigger_id IS NOT NULL))
);
-- a payment id is recorded once per invoice (the same id on two invoices is two facts)
CREATE UNIQUE INDEX payments_payment_id ON payments (invoice_id, payment_id)
    WHERE payment_id IS NOT NULL;
-- one upstream event, at most one payment (even after retention pruned its ledger row)
CREATE UNIQUE INDEX payments_trigger ON payments (trigger_source, trigger_id)
    WHERE trigger_source IS NOT NULL;

-- 2. Refunds: one row per refund, on one payment of its credit note's invoice.
-- refund_id is the primary key: an id appears once, ever, requested or linked.
CREATE TABLE refunds (
    refund_id         text PRIMARY KEY,
    invoice_id        text NOT NULL,
    payment_sequence  integer NOT NULL,
    credit_note_id    text NOT NULL REFERENCES credit_notes (id),
    amount            bigint NOT NULL CHECK (amount > 0),
    status            text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    linked            boolean NOT NULL DEFAULT false,
    failure_reason    text CHECK (char_length(failure_reason) <= 500),
    resettled_to      text CHECK (resettled_to IN ('customer_balance', 'none')),
    outcome_source    text,
    outcome_id        text,
    outcome_type      text,
    outcome_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    settled_xact      bigint,
    FOREIGN KEY (invoice_id, payment_sequence) REFERENCES payments (invoice_id, sequence),
    -- a linked refund was made already in the payment system
    CONSTRAINT linked_refund_succeeded CHECK (NOT linked OR (status = 'succeeded'
                                                             AND outcome_id IS NULL)),
    CONSTRAINT failed_refund_resettled CHECK ((status = 'failed') = (resettled_to IS NOT NULL)),
    CONSTRAINT failure_reason_of_failed CHECK (failure_reason IS NULL OR status = 'failed'),
    -- a requested refund is settled by exactly one outcome event
    CONSTRAINT refund_outcome_recorded CHECK (
        linked OR ((status = 'pending') = (outcome_id IS NULL)
                   AND (outcome_id IS NULL) = (outcome_source IS NULL)
                   AND (outcome_id IS NULL) = (outcome_at IS NULL)))
);
COMMENT ON COLUMN refunds.settled_xact IS
    'transaction that settled the refund (or inserted it linked); set by trigger';
CREATE INDEX refunds_of_invoice ON refunds (invoice_id, payment_sequence);
CREATE INDEX refunds_of_credit_note ON refunds (credit_note_id);
-- one outcome event settles at most one refund (and is an effect claim() sees)
CREATE UNIQUE INDEX refunds_outcome ON refunds (outcome_source, outcome_id)
    WHERE outcome_id IS NOT NULL;
CREATE INDEX refunds_pending ON refunds (created_at) WHERE status = 'pending';

-- The journal of a refund's outcome (a linked refund's: at issue).
CREATE TABLE refund_journal_lines (
    refund_id     text NOT NULL REFERENCES refunds (refund_id),
    position      integer NOT NULL CHECK (position >= 0),
    account       text NOT NULL CHECK (account IN ('refunds_payable', 'cash',
                                                   'customer_credit_balance')),
    debit         bigint NOT NULL CHECK (debit >= 0),
    credit        bigint NOT NULL CHECK (credit >= 0),
    effective_at  timestamptz NOT NULL,
    CHECK ((debit = 0) <> (credit = 0)),
    PRIMARY KEY (refund_id, position)
);

-- 3. Edits of a credit note (credit_note.update): one row per command applied, with
-- memo and metadata as they stand after it.
CREATE TABLE credit_note_updates (
    credit_note_id  text NOT NULL REFERENCES credit_notes (id),
    trigger_source  text NOT NULL,
    trigger_id      text NOT NULL,
    memo            text,
    metadata        jsonb NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    written_xact    bigint,
    PRIMARY KEY (trigger_source, trigger_id)
);
COMMENT ON COLUMN credit_note_updates.written_xact IS
    'transaction that wrote the row (set by trigger)';
CREATE INDEX credit_note_updates_of_note ON credit_note_updates (credit_note_id);

-- 4. Dates: a credit note's accounting date (effective_at) is on it and on its journal
-- lines (the void's lines: when it was voided). Backfilled from issued_at / voided_at.
ALTER TABLE credit_notes ADD COLUMN effective_at timestamptz, ADD COLUMN updated_at timestamptz;
UPDATE credit_notes SET effective_at = issued_at;
-- (the backfill fired 0001's deferred checks of the notes it touched: run them now,
-- as ALTER TABLE refuses a table with pending trigger events)
SET CONSTRAINTS ALL IMMEDIATE;
ALTER TABLE credit_notes ALTER COLUMN effective_at SET DEFAULT now(),
                         ALTER COLUMN effective_at SET NOT NULL;
ALTER TABLE journal_lines ADD COLUMN effective_at timestamptz;
ALTER TABLE journal_lines DISABLE TRIGGER journal_lines_append_only;  -- the backfill only
UPDATE journal_lines AS j SET effective_at = CASE WHEN j.entry = 'void'
                                                  THEN coalesce(n.voided_at, n.issued_at)
                                                  ELSE n.issued_at END
  FROM credit_notes AS n WHERE n.id = j.credit_note_id;
ALTER TABLE journal_lines ENABLE TRIGGER journal_lines_append_only;
ALTER TABLE journal_lines ALTER COLUMN effective_at SET DEFAULT now(),
                          ALTER COLUMN effective_at SET NOT NULL;

-- 5. Refund ids live in refunds now: a new credit note writes refund_id NULL; a note
-- issued before keeps its single one (and gets its refunds row below).
ALTER TABLE credit_notes DROP CONSTRAINT credit_notes_check2;
ALTER TABLE credit_notes ADD CONSTRAINT legacy_refund_id CHECK (refund_id IS NULL OR refund_amount > 0);

-- 6. Invoices: refunded counts every refund ever (as before); refunds_failed the failed
-- ones, whose cash is refundable again. Cash refunded and not failed is within amount_paid.
ALTER TABLE invoices ADD COLUMN refunds_failed bigint NOT NULL DEFAULT 0;
ALTER TABLE invoices DROP CONSTRAINT invoices_check3;
ALTER TABLE invoices ADD CONSTRAINT refunds_within_cash CHECK (
    refunded >= 0 AND refunds_failed BETWEEN 0 AND refunded
    AND refunded - refunds_failed <= amount_paid);

-- 7. Backfill: all cash received so far as one payment 0 per invoice (earlier payments
-- were not kept apart), and each earlier credit note's refund, pending, on it.
INSERT INTO payments (invoice_id, sequence, payment_id, amount, applied, received_at)
SELECT id, 0, NULL, amount_paid, amount_paid, created_at FROM invoices WHERE amount_paid > 0;
INSERT INTO refunds (refund_id, invoice_id, payment_sequence, credit_note_id, amount, status,
                     linked, created_at)
SELECT refund_id, invoice_id, 0, id, refund_amount, 'pending', false, issued_at
  FROM credit_notes WHERE refund_id IS NOT NULL;

-- 8. Immutability, extended: a credit note's accounting date never changes (0001's
-- function with effective_at; updated_at may, with memo and metadata).
CREATE OR REPLACE FUNCTION credit_notes_immutable() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'credit notes are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.id, NEW.invoice_id, NEW.sequence, NEW.number, NEW.customer_id, NEW.currency,
        NEW.reason, NEW.subtotal, NEW.tax, NEW.total, NEW.pre_payment_amount,
        NEW.refund_amount, NEW.credit_amount, NEW.out_of_band_amount, NEW.refund_id,
        NEW.trigger_source, NEW.trigger_id, NEW.trigger_type, NEW.policy, NEW.issued_at,
        NEW.effective_at)
       IS DISTINCT FROM
       (OLD.id, OLD.invoice_id, OLD.sequence, OLD.number, OLD.customer_id, OLD.currency,
        OLD.reason, OLD.subtotal, OLD.tax, OLD.total, OLD.pre_payment_amount,
        OLD.refund_amount, OLD.credit_amount, OLD.out_of_band_amount, OLD.refund_id,
        OLD.trigger_source, OLD.trigger_id, OLD.trigger_type, OLD.policy, OLD.issued_at,
        OLD.effective_at) THEN
        RAISE EXCEPTION 'an issued credit note cannot change' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status = 'void' AND NEW.status <> 'void' THEN
        RAISE EXCEPTION 'a void credit note stays void' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

-- A credit note with refunds is never voided (a void needs no post-payment part, so
-- an outcome on a voided note cannot happen).
CREATE FUNCTION credit_notes_void_without_refunds() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM refunds WHERE credit_note_id = NEW.id) THEN
        RAISE EXCEPTION 'credit note % has refunds: it cannot be voided', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_notes_void_without_refunds BEFORE UPDATE OF status ON credit_notes
    FOR EACH ROW WHEN (OLD.status = 'issued' AND NEW.status = 'void')
    EXECUTE FUNCTION credit_notes_void_without_refunds();

-- Invoices (0011's function): refunds_failed never decreases either.
CREATE OR REPLACE FUNCTION invoices_legal_transition() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (NEW.id, NEW.number, NEW.customer_id, NEW.currency, NEW.subtotal, NEW.discount, NEW.tax,
        NEW.total, NEW.customer_balance_applied, NEW.created_at)
       IS DISTINCT FROM
       (OLD.id, OLD.number, OLD.customer_id, OLD.currency, OLD.subtotal, OLD.discount, OLD.tax,
        OLD.total, OLD.customer_balance_applied, OLD.created_at) THEN
        RAISE EXCEPTION 'the figures of invoice % never change', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.created_xact := OLD.created_xact;
    IF NEW.amount_paid < OLD.amount_paid OR NEW.refunded < OLD.refunded
       OR NEW.refunds_failed < OLD.refunds_failed
       OR NEW.credit_note_count < OLD.credit_note_count THEN
        RAISE EXCEPTION 'amount_paid, refunded, refunds_failed and credit_note_count of invoice % '
            'never decrease', OLD.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status <> OLD.status AND (OLD.status, NEW.status) NOT IN (
           ('open', 'paid'), ('open', 'uncollectible'), ('open', 'void'),
           ('uncollectible', 'void'), ('uncollectible', 'paid')) THEN
        RAISE EXCEPTION 'invoice % cannot go from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

-- A credit note's memo and metadata change only with their credit_note_updates row:
-- written by the same transaction, with the values the note takes; updated_at is that
-- transaction's time, set here (the application cannot write it).
CREATE FUNCTION credit_note_updates_stamped() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.written_xact := pg_current_xact_id()::text::bigint;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER credit_note_updates_stamped BEFORE INSERT ON credit_note_updates
    FOR EACH ROW EXECUTE FUNCTION credit_note_updates_stamped();

CREATE FUNCTION credit_notes_edited_with_update() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (NEW.memo, NEW.metadata) IS NOT DISTINCT FROM (OLD.memo, OLD.metadata) THEN
        NEW.updated_at := OLD.updated_at;
        RETURN NEW;
    END IF;
    IF NOT EXISTS (SELECT FROM credit_note_updates AS u
                    WHERE u.credit_note_id = NEW.id
                      AND u.written_xact = pg_current_xact_id()::text::bigint
                      AND u.memo IS NOT DISTINCT FROM NEW.memo AND u.metadata = NEW.metadata) THEN
        RAISE EXCEPTION 'memo and metadata of credit note % change only with a credit_note_updates '
            'row of this transaction holding them', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER credit_notes_edited_with_update BEFORE UPDATE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION credit_notes_edited_with_update();

-- Journals are dated by the note: the issue entry by its effective_at (the void entry
-- is checked by verify only: its date is the void event's).
CREATE FUNCTION journal_lines_dated_by_note() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.entry = 'issue' AND NEW.effective_at IS DISTINCT FROM
           (SELECT effective_at FROM credit_notes WHERE id = NEW.credit_note_id) THEN
        RAISE EXCEPTION 'the issue journal of credit note % is dated by its effective_at',
            NEW.credit_note_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
-- (named to fire after 0011's journal_lines_with_their_note: a line added to a posted
-- note is refused as that first)
CREATE TRIGGER journal_lines_with_their_note_dated BEFORE INSERT ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION journal_lines_dated_by_note();

-- The payment at finalization (sequence 0) is written only with its invoice: by the
-- transaction that inserted the invoice (created_xact, set by trigger; NULL for
-- invoices created before this migration, whose payment 0 the backfill above wrote).
ALTER TABLE invoices ADD COLUMN created_xact bigint;
COMMENT ON COLUMN invoices.created_xact IS 'transaction that inserted the invoice (set by trigger)';
CREATE FUNCTION invoices_created_xact() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.created_xact := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END $$;
CREATE TRIGGER invoices_created_xact BEFORE INSERT ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_created_xact();
CREATE FUNCTION payments_finalization_with_invoice() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.sequence = 0 AND (SELECT created_xact FROM invoices WHERE id = NEW.invoice_id)
                            IS DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        RAISE EXCEPTION 'the payment at finalization of invoice % is written with the invoice',
            NEW.invoice_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER payments_finalization_with_invoice BEFORE INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION payments_finalization_with_invoice();

-- 9. Refunds are written with their credit note: in the transaction that issued it,
-- pending (or linked, succeeded), on its invoice. Linked ones are settled as inserted.
CREATE FUNCTION refunds_written_with_their_note() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    note credit_notes%ROWTYPE;
BEGIN
    SELECT * INTO note FROM credit_notes WHERE id = NEW.credit_note_id;
    IF NOT FOUND THEN
        RETURN NEW;  -- the foreign key refuses it
    END IF;
    IF note.issued_xact IS DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        RAISE EXCEPTION 'credit note % is posted: no refund can be added to it', note.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.invoice_id IS DISTINCT FROM note.invoice_id THEN
        RAISE EXCEPTION 'refund % is not on the invoice of its credit note %', NEW.refund_id, note.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NOT (NEW.status = 'pending' OR (NEW.linked AND NEW.status = 'succeeded'))
       OR NEW.failure_reason IS NOT NULL OR NEW.resettled_to IS NOT NULL
       OR NEW.outcome_id IS NOT NULL OR NEW.outcome_source IS NOT NULL
       OR NEW.outcome_type IS NOT NULL OR NEW.outcome_at IS NOT NULL THEN
        RAISE EXCEPTION 'refund % is requested pending (or linked, succeeded); its outcome comes later',
            NEW.refund_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.settled_xact := CASE WHEN NEW.linked THEN pg_current_xact_id()::text::bigint END;
    RETURN NEW;
END $$;
CREATE TRIGGER refunds_written_with_their_note BEFORE INSERT ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_written_with_their_note();

-- A refund moves only pending -> succeeded | failed, once; only its outcome columns
-- change, together with its status; nothing else of it ever changes.
CREATE FUNCTION refunds_settle_once() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (NEW.refund_id, NEW.invoice_id, NEW.payment_sequence, NEW.credit_note_id, NEW.amount,
        NEW.linked, NEW.created_at)
       IS DISTINCT FROM
       (OLD.refund_id, OLD.invoice_id, OLD.payment_sequence, OLD.credit_note_id, OLD.amount,
        OLD.linked, OLD.created_at) THEN
        RAISE EXCEPTION 'the figures of refund % never change', OLD.refund_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF OLD.status <> 'pending' OR NEW.status NOT IN ('succeeded', 'failed') THEN
            RAISE EXCEPTION 'refund % is % : an outcome is final (pending -> succeeded | failed, once)',
                OLD.refund_id, OLD.status USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        NEW.settled_xact := pg_current_xact_id()::text::bigint;
        RETURN NEW;
    END IF;
    IF (NEW.failure_reason, NEW.resettled_to, NEW.outcome_source, NEW.outcome_id,
        NEW.outcome_type, NEW.outcome_at)
       IS DISTINCT FROM
       (OLD.failure_reason, OLD.resettled_to, OLD.outcome_source, OLD.outcome_id,
        OLD.outcome_type, OLD.outcome_at) THEN
        RAISE EXCEPTION 'the outcome of refund % is written once, with its status', OLD.refund_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.settled_xact := OLD.settled_xact;
    RETURN NEW;
END $$;
CREATE TRIGGER refunds_settle_once BEFORE UPDATE ON refunds
    FOR EACH ROW EXECUTE FUNCTION refunds_settle_once();

-- A refund's journal is written only by the transaction that settled it, dated by its
-- outcome (a linked refund's: by its credit note's effective_at).
CREATE FUNCTION refund_lines_written_with_their_outcome() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    refund refunds%ROWTYPE;
BEGIN
    SELECT * INTO refund FROM refunds WHERE refund_id = NEW.refund_id;
    IF refund.settled_xact IS DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        RAISE EXCEPTION 'a refund journal is written only by the outcome of refund %', NEW.refund_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.effective_at IS DISTINCT FROM (CASE
           WHEN refund.linked THEN (SELECT effective_at FROM credit_notes
                                     WHERE id = refund.credit_note_id)
           ELSE refund.outcome_at END) THEN
        RAISE EXCEPTION 'the journal of refund % is dated by its outcome (linked: its credit note)',
            NEW.refund_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refund_lines_written_with_their_outcome BEFORE INSERT ON refund_journal_lines
    FOR EACH ROW EXECUTE FUNCTION refund_lines_written_with_their_outcome();

-- 10. At commit: amount_paid is the sum of the payments' applied parts.
CREATE FUNCTION check_payments_match_invoice() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    invoice text;
    paid bigint;
    applied bigint;
BEGIN
    IF TG_TABLE_NAME = 'invoices' THEN
        invoice := NEW.id;
    ELSE
        invoice := NEW.invoice_id;
    END IF;
    SELECT amount_paid INTO paid FROM invoices WHERE id = invoice;
    SELECT coalesce(sum(p.applied), 0) INTO applied FROM payments AS p WHERE p.invoice_id = invoice;
    IF paid IS DISTINCT FROM applied THEN
        RAISE EXCEPTION 'amount_paid of invoice % disagrees with its payments', invoice
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER payments_match_invoice AFTER INSERT ON payments
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_payments_match_invoice();
CREATE CONSTRAINT TRIGGER invoice_paid_by_payments AFTER UPDATE OF amount_paid ON invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (OLD.amount_paid IS DISTINCT FROM NEW.amount_paid)
    EXECUTE FUNCTION check_payments_match_invoice();
CREATE CONSTRAINT TRIGGER invoice_inserted_paid AFTER INSERT ON invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.amount_paid <> 0)
    EXECUTE FUNCTION check_payments_match_invoice();

-- Per payment, its refunds pending or succeeded never exceed its applied part.
CREATE FUNCTION check_refunds_within_payment() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (SELECT coalesce(sum(amount), 0) FROM refunds
         WHERE invoice_id = NEW.invoice_id AND payment_sequence = NEW.payment_sequence
           AND status <> 'failed')
       > (SELECT applied FROM payments
           WHERE invoice_id = NEW.invoice_id AND sequence = NEW.payment_sequence) THEN
        RAISE EXCEPTION 'refunds of payment %/% exceed what of it was applied', NEW.invoice_id,
            NEW.payment_sequence USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refunds_within_payment AFTER INSERT OR UPDATE OF status ON refunds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_refunds_within_payment();

-- Per credit note, its refunds add up to its refund_amount (a note issued with a
-- refund part has its refunds; a refund belongs to a note that says so).
CREATE FUNCTION check_refunds_match_credit_note() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    note text;
BEGIN
    IF TG_TABLE_NAME = 'credit_notes' THEN
        note := NEW.id;
    ELSE
        note := NEW.credit_note_id;
    END IF;
    IF (SELECT refund_amount FROM credit_notes WHERE id = note)
       IS DISTINCT FROM (SELECT coalesce(sum(amount), 0) FROM refunds WHERE credit_note_id = note)
    THEN
        RAISE EXCEPTION 'the refunds of credit note % disagree with its refund_amount', note
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refunds_match_credit_note AFTER INSERT ON refunds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_refunds_match_credit_note();
CREATE CONSTRAINT TRIGGER credit_notes_refunds_match AFTER INSERT ON credit_notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.refund_amount <> 0)
    EXECUTE FUNCTION check_refunds_match_credit_note();

-- invoices.refunded is every refund ever, refunds_failed the failed ones.
CREATE FUNCTION check_invoice_refund_counters() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    invoice text;
    inv invoices%ROWTYPE;
    total bigint;
    failed bigint;
BEGIN
    IF TG_TABLE_NAME = 'invoices' THEN
        invoice := NEW.id;
    ELSE
        invoice := NEW.invoice_id;
    END IF;
    SELECT * INTO inv FROM invoices WHERE id = invoice;
    SELECT coalesce(sum(amount), 0), coalesce(sum(amount) FILTER (WHERE status = 'failed'), 0)
      INTO total, failed FROM refunds WHERE invoice_id = invoice;
    IF (inv.refunded, inv.refunds_failed) IS DISTINCT FROM (total, failed) THEN
        RAISE EXCEPTION 'refunded amounts of invoice % disagree with its refunds', invoice
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER invoice_refund_counters AFTER INSERT OR UPDATE OF status ON refunds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_invoice_refund_counters();
CREATE CONSTRAINT TRIGGER invoice_refund_counters_match AFTER UPDATE OF refunded, refunds_failed
    ON invoices DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.refunded, OLD.refunds_failed) IS DISTINCT FROM (NEW.refunded, NEW.refunds_failed))
    EXECUTE FUNCTION check_invoice_refund_counters();
CREATE CONSTRAINT TRIGGER invoice_inserted_refunded AFTER INSERT ON invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.refunded <> 0 OR NEW.refunds_failed <> 0)
    EXECUTE FUNCTION check_invoice_refund_counters();

-- A settled refund carries exactly its journal (docs/rules.md, Refunds): succeeded (or
-- linked) debit refunds_payable / credit cash; failed and resettled to the customer
-- balance debit refunds_payable / credit customer_credit_balance; failed and left
-- (resettled_to none) no lines.
CREATE FUNCTION check_refund_settled_with_journal() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    expected text;
BEGIN
    expected := CASE
        WHEN NEW.status = 'succeeded' THEN 'cash'
        WHEN NEW.status = 'failed' AND NEW.resettled_to = 'customer_balance'
            THEN 'customer_credit_balance'
    END;
    IF EXISTS (
           (SELECT account, debit, credit FROM refund_journal_lines WHERE refund_id = NEW.refund_id
            EXCEPT ALL
            SELECT e.account, e.debit, e.credit
              FROM (VALUES ('refunds_payable', NEW.amount, 0::bigint),
                           (expected, 0::bigint, NEW.amount)) AS e(account, debit, credit)
             WHERE expected IS NOT NULL)
           UNION ALL
           (SELECT e.account, e.debit, e.credit
              FROM (VALUES ('refunds_payable', NEW.amount, 0::bigint),
                           (expected, 0::bigint, NEW.amount)) AS e(account, debit, credit)
             WHERE expected IS NOT NULL
            EXCEPT ALL
            SELECT account, debit, credit FROM refund_journal_lines WHERE refund_id = NEW.refund_id))
    THEN
        RAISE EXCEPTION 'refund % is % without exactly its journal', NEW.refund_id, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refund_settled_with_journal AFTER UPDATE OF status ON refunds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status = 'pending' AND NEW.status <> 'pending')
    EXECUTE FUNCTION check_refund_settled_with_journal();
CREATE CONSTRAINT TRIGGER refund_linked_with_journal AFTER INSERT ON refunds
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.linked)
    EXECUTE FUNCTION check_refund_settled_with_journal();

-- Each refund's journal balances (checked at commit, once all its lines exist).
CREATE FUNCTION check_refund_journal_balanced() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (SELECT sum(debit) - sum(credit) FROM refund_journal_lines
         WHERE refund_id = NEW.refund_id) <> 0 THEN
        RAISE EXCEPTION 'journal of refund % does not balance', NEW.refund_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER refund_journal_balanced AFTER INSERT ON refund_journal_lines
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_refund_journal_balanced();

-- 11. History is kept: payments, refund journals and edits are append-only; refunds
-- change only as above; nothing here is deleted or truncated.
CREATE TRIGGER payments_append_only BEFORE UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER refund_journal_lines_append_only BEFORE UPDATE OR DELETE ON refund_journal_lines
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER credit_note_updates_append_only BEFORE UPDATE OR DELETE ON credit_note_updates
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER refunds_never_deleted BEFORE DELETE ON refunds
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['payments', 'refunds', 'refund_journal_lines',
                                'credit_note_updates'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION history_is_kept()', name || '_never_truncated', name);
    END LOOP;
END $$;

-- 12. Grants (0003's model): the application inserts and reads; of a refund it
-- updates only the outcome; of an invoice refunds_failed (a credit note's updated_at is
-- set by credit_notes_edited_with_update).
GRANT SELECT, INSERT ON payments, refunds, refund_journal_lines, credit_note_updates
    TO creditnotes_app;
GRANT UPDATE (status, failure_reason, resettled_to, outcome_source, outcome_id, outcome_type,
              outcome_at) ON refunds TO creditnotes_app;
GRANT UPDATE (refunds_failed) ON invoices TO creditnotes_app;
GRANT ALL ON payments, refunds, refund_journal_lines, credit_note_updates TO creditnotes_migrator;
