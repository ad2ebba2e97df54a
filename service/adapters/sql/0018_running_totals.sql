-- Running totals (issue 13): the deferred checks compare rows instead of adding up history.
--
-- Until now each check re-added an invoice's whole history for every row written: all its
-- credit notes (0001, 0004, 0008), all its payments and refunds (0016), and, through 0013's
-- view invoice_line_credit_checks, every credit-note line in the database (credit_note_lines
-- has no invoice_id, and line ids like il_1 are shared by every invoice), with a generic plan
-- that could turn quadratic. A batch got slower as its invoices gathered notes.
--
-- Now the database keeps what those sums were, in tables written only by the triggers below
-- (as rows are written, in the same transaction, rolled back with it):
--   invoice_totals                 per invoice: the non-void credit notes' pre- and
--                                  post-payment parts, the payments' applied parts, every
--                                  refund and the failed ones
--   invoice_trigger_credit_totals  per invoice and trigger type: the non-void notes' totals
--   invoice_line_credit_totals     per invoice line: the non-void credit-note lines' net, tax,
--                                  quantity, how many are by quantity, their covers_from
--                                  (a sorted multiset)
--   payment_refund_totals          per payment: its refunds not failed
-- and every check keeps its trigger, its name, its message and SQLSTATE, and when it fires,
-- but reads its totals row by primary key: O(1) per row, whatever the history.
--
-- The sums themselves stay where they were (invoice_line_credit_checks, the tables): what
-- `creditnotes verify` audits, totals against history.
--
-- Who may write the totals: nobody directly. The application role reads them (SELECT); the
-- migrator has them like every table (0003) but its DML is refused, like a superuser's, by
-- <table>_written_by_triggers: a write is accepted only from inside a trigger (the
-- SECURITY DEFINER functions below, fired by writes to the history tables, which are
-- themselves append-only or move only forward). As 0011 says, whoever can run DDL (drop or
-- disable a trigger, add one) must be trusted. (A later migration that must rebuild them
-- disables <table>_written_by_triggers around it, as 0016 does journal_lines_append_only.)
--
-- The keeping triggers are named _keep_totals: they sort before every other trigger of
-- their table, so even a check made IMMEDIATE (SET CONSTRAINTS) reads totals that already
-- count the row. A check by primary key costs the same however many rows of one invoice a
-- transaction writes, so it runs for each of them, as before, with nothing remembered.

-- 1. The tables
CREATE TABLE invoice_totals (
    invoice_id      text PRIMARY KEY,
    pre_payment     bigint NOT NULL DEFAULT 0,
    post_payment    bigint NOT NULL DEFAULT 0,
    paid            bigint NOT NULL DEFAULT 0,
    refunded        bigint NOT NULL DEFAULT 0,
    refunds_failed  bigint NOT NULL DEFAULT 0
);
CREATE TABLE invoice_trigger_credit_totals (
    invoice_id    text NOT NULL,
    trigger_type  text NOT NULL,
    total         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (invoice_id, trigger_type)
);
CREATE TABLE invoice_line_credit_totals (
    invoice_id      text NOT NULL,
    line_id         text NOT NULL,
    net             bigint NOT NULL DEFAULT 0,
    tax             bigint NOT NULL DEFAULT 0,
    quantity        bigint NOT NULL DEFAULT 0,
    quantity_lines  integer NOT NULL DEFAULT 0,
    time_credits    timestamptz[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (invoice_id, line_id)
);
CREATE TABLE payment_refund_totals (
    invoice_id        text NOT NULL,
    payment_sequence  integer NOT NULL,
    open              bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (invoice_id, payment_sequence)
);
COMMENT ON TABLE invoice_totals IS 'kept by trigger (0018); creditnotes verify audits it';
COMMENT ON TABLE invoice_trigger_credit_totals IS 'kept by trigger (0018); creditnotes verify audits it';
COMMENT ON TABLE invoice_line_credit_totals IS 'kept by trigger (0018); creditnotes verify audits it';
COMMENT ON TABLE payment_refund_totals IS 'kept by trigger (0018); creditnotes verify audits it';

REVOKE ALL ON invoice_totals, invoice_trigger_credit_totals, invoice_line_credit_totals,
              payment_refund_totals FROM PUBLIC;
GRANT SELECT ON invoice_totals, invoice_trigger_credit_totals, invoice_line_credit_totals,
                payment_refund_totals TO creditnotes_app;
GRANT ALL ON invoice_totals, invoice_trigger_credit_totals, invoice_line_credit_totals,
             payment_refund_totals TO creditnotes_migrator;

-- 2. Keeping them. Each function takes the old row's part off and puts the new row's part
-- on (an INSERT has only a new row, a DELETE only an old one), so it stays right whatever
-- changes; the BEFORE triggers of 0004-0016 already refuse all but inserts, a void, and a
-- refund's outcome.

-- a sorted multiset of times, one occurrence added or taken off
CREATE FUNCTION time_credits_with(times timestamptz[], moment timestamptz, sign integer)
RETURNS timestamptz[] LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    i integer;
BEGIN
    IF moment IS NULL THEN
        RETURN times;
    END IF;
    IF sign > 0 THEN
        RETURN ARRAY(SELECT t FROM unnest(times || moment) AS t ORDER BY t);
    END IF;
    i := array_position(times, moment);
    IF i IS NULL THEN
        RETURN times;
    END IF;
    RETURN times[:i - 1] || times[i + 1:];
END $$;

-- one credit-note line's part on its invoice line (sign 1: put on, -1: taken off)
CREATE FUNCTION line_totals_add(invoice text, l credit_note_lines, sign integer)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF l.invoice_line_id IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO invoice_line_credit_totals AS t
        (invoice_id, line_id, net, tax, quantity, quantity_lines, time_credits)
    VALUES (invoice, l.invoice_line_id, sign * l.net, sign * l.tax,
            sign * coalesce(l.quantity, 0), sign * (l.quantity IS NOT NULL)::integer,
            time_credits_with('{}', CASE WHEN sign > 0 THEN l.covers_from END, 1))
    ON CONFLICT (invoice_id, line_id) DO UPDATE SET
        net = t.net + EXCLUDED.net, tax = t.tax + EXCLUDED.tax,
        quantity = t.quantity + EXCLUDED.quantity,
        quantity_lines = t.quantity_lines + EXCLUDED.quantity_lines,
        time_credits = time_credits_with(t.time_credits, l.covers_from, sign);
END $$;
REVOKE ALL ON FUNCTION line_totals_add(text, credit_note_lines, integer) FROM PUBLIC;

-- a credit note's part: its amounts while issued, and then its lines (none yet when it is
-- inserted: they reference it; all of them at a void)
CREATE FUNCTION note_totals_add(n credit_notes, sign integer, with_lines boolean)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    l credit_note_lines;
BEGIN
    IF n.status <> 'issued' THEN
        RETURN;
    END IF;
    INSERT INTO invoice_totals AS t (invoice_id, pre_payment, post_payment)
    VALUES (n.invoice_id, sign * n.pre_payment_amount, sign * (n.total - n.pre_payment_amount))
    ON CONFLICT (invoice_id) DO UPDATE SET pre_payment = t.pre_payment + EXCLUDED.pre_payment,
                                           post_payment = t.post_payment + EXCLUDED.post_payment;
    INSERT INTO invoice_trigger_credit_totals AS t (invoice_id, trigger_type, total)
    VALUES (n.invoice_id, n.trigger_type, sign * n.total)
    ON CONFLICT (invoice_id, trigger_type) DO UPDATE SET total = t.total + EXCLUDED.total;
    IF with_lines THEN
        FOR l IN SELECT * FROM credit_note_lines WHERE credit_note_id = n.id LOOP
            PERFORM line_totals_add(n.invoice_id, l, sign);
        END LOOP;
    END IF;
END $$;
REVOKE ALL ON FUNCTION note_totals_add(credit_notes, integer, boolean) FROM PUBLIC;

CREATE FUNCTION keep_credit_note_totals() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM note_totals_add(OLD, -1, true);
    END IF;
    IF TG_OP = 'INSERT' THEN
        PERFORM note_totals_add(NEW, 1, false);
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM note_totals_add(NEW, 1, true);
    END IF;
    RETURN NULL;
END $$;

-- a line counts while its note is issued, and is written only then: a line of a note that is
-- not issued (voided by an earlier statement, or by the same one: AFTER row triggers of one
-- statement all fire at its end, so the void's trigger, which takes off every line it then
-- sees, may already have taken this one off) is refused, never skipped. So every line is put
-- on once while its note is issued and taken off once by the void, whatever the statements.
-- (The unit of work writes a batch's note lines before its voids.)
CREATE FUNCTION keep_credit_note_line_totals() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    n credit_notes;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        SELECT * INTO n FROM credit_notes WHERE id = OLD.credit_note_id;
        IF FOUND AND n.status = 'issued' THEN
            PERFORM line_totals_add(n.invoice_id, OLD, -1);
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        SELECT * INTO n FROM credit_notes WHERE id = NEW.credit_note_id;
        IF FOUND AND n.status <> 'issued' THEN
            RAISE EXCEPTION 'credit note % is %: a line is written only while its note is issued',
                NEW.credit_note_id, n.status USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        IF FOUND THEN
            PERFORM line_totals_add(n.invoice_id, NEW, 1);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION keep_payment_totals() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO invoice_totals AS t (invoice_id, paid) VALUES (OLD.invoice_id, -OLD.applied)
        ON CONFLICT (invoice_id) DO UPDATE SET paid = t.paid + EXCLUDED.paid;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO invoice_totals AS t (invoice_id, paid) VALUES (NEW.invoice_id, NEW.applied)
        ON CONFLICT (invoice_id) DO UPDATE SET paid = t.paid + EXCLUDED.paid;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION refund_totals_add(r refunds, sign integer) RETURNS void LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    INSERT INTO invoice_totals AS t (invoice_id, refunded, refunds_failed)
    VALUES (r.invoice_id, sign * r.amount,
            CASE WHEN r.status = 'failed' THEN sign * r.amount ELSE 0 END)
    ON CONFLICT (invoice_id) DO UPDATE SET refunded = t.refunded + EXCLUDED.refunded,
                                           refunds_failed = t.refunds_failed + EXCLUDED.refunds_failed;
    INSERT INTO payment_refund_totals AS t (invoice_id, payment_sequence, open)
    VALUES (r.invoice_id, r.payment_sequence,
            CASE WHEN r.status <> 'failed' THEN sign * r.amount ELSE 0 END)
    ON CONFLICT (invoice_id, payment_sequence) DO UPDATE SET open = t.open + EXCLUDED.open;
END $$;
REVOKE ALL ON FUNCTION refund_totals_add(refunds, integer) FROM PUBLIC;

CREATE FUNCTION keep_refund_totals() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM refund_totals_add(OLD, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM refund_totals_add(NEW, 1);
    END IF;
    RETURN NULL;
END $$;

-- (created before the backfill: creating a trigger locks its table against writers, so
-- the backfill below reads every row committed before it, and none is written meanwhile)
CREATE TRIGGER _keep_totals AFTER INSERT OR DELETE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION keep_credit_note_totals();
CREATE TRIGGER _keep_totals_changed AFTER UPDATE ON credit_notes
    FOR EACH ROW
    WHEN ((OLD.status, OLD.invoice_id, OLD.trigger_type, OLD.total, OLD.pre_payment_amount)
          IS DISTINCT FROM
          (NEW.status, NEW.invoice_id, NEW.trigger_type, NEW.total, NEW.pre_payment_amount)
          OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION keep_credit_note_totals();
CREATE TRIGGER _keep_totals AFTER INSERT OR UPDATE OR DELETE ON credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION keep_credit_note_line_totals();
CREATE TRIGGER _keep_totals AFTER INSERT OR UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION keep_payment_totals();
CREATE TRIGGER _keep_totals AFTER INSERT OR DELETE ON refunds
    FOR EACH ROW EXECUTE FUNCTION keep_refund_totals();
CREATE TRIGGER _keep_totals_changed AFTER UPDATE ON refunds
    FOR EACH ROW
    WHEN ((OLD.status, OLD.invoice_id, OLD.payment_sequence, OLD.amount)
          IS DISTINCT FROM (NEW.status, NEW.invoice_id, NEW.payment_sequence, NEW.amount))
    EXECUTE FUNCTION keep_refund_totals();

-- 3. Backfill from history
INSERT INTO invoice_totals (invoice_id, pre_payment, post_payment, paid, refunded, refunds_failed)
SELECT i.id,
       coalesce((SELECT sum(n.pre_payment_amount) FROM credit_notes AS n
                  WHERE n.invoice_id = i.id AND n.status = 'issued'), 0),
       coalesce((SELECT sum(n.total - n.pre_payment_amount) FROM credit_notes AS n
                  WHERE n.invoice_id = i.id AND n.status = 'issued'), 0),
       coalesce((SELECT sum(p.applied) FROM payments AS p WHERE p.invoice_id = i.id), 0),
       coalesce((SELECT sum(r.amount) FROM refunds AS r WHERE r.invoice_id = i.id), 0),
       coalesce((SELECT sum(r.amount) FROM refunds AS r
                  WHERE r.invoice_id = i.id AND r.status = 'failed'), 0)
  FROM invoices AS i;
INSERT INTO invoice_trigger_credit_totals (invoice_id, trigger_type, total)
SELECT invoice_id, trigger_type, sum(total) FROM credit_notes
 WHERE status = 'issued' GROUP BY invoice_id, trigger_type;
INSERT INTO invoice_line_credit_totals
    (invoice_id, line_id, net, tax, quantity, quantity_lines, time_credits)
SELECT n.invoice_id, l.invoice_line_id, sum(l.net), sum(l.tax), coalesce(sum(l.quantity), 0),
       count(l.quantity),
       coalesce(array_agg(l.covers_from ORDER BY l.covers_from)
                    FILTER (WHERE l.covers_from IS NOT NULL), '{}')
  FROM credit_notes AS n JOIN credit_note_lines AS l ON l.credit_note_id = n.id
 WHERE n.status = 'issued' AND l.invoice_line_id IS NOT NULL
 GROUP BY n.invoice_id, l.invoice_line_id;
INSERT INTO payment_refund_totals (invoice_id, payment_sequence, open)
SELECT invoice_id, payment_sequence, coalesce(sum(amount) FILTER (WHERE status <> 'failed'), 0)
  FROM refunds GROUP BY invoice_id, payment_sequence;

-- 4. Nobody writes them directly (after the backfill, which is such a write)
CREATE FUNCTION totals_written_by_triggers() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    -- 1: this trigger, fired by a client's statement; 2 or more: by a trigger's
    IF TG_OP = 'TRUNCATE' OR pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION '% rows are kept by triggers from history: they are never written directly',
            TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['invoice_totals', 'invoice_trigger_credit_totals',
                                'invoice_line_credit_totals', 'payment_refund_totals'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION totals_written_by_triggers()',
                       name || '_written_by_triggers', name);
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION totals_written_by_triggers()',
                       name || '_never_truncated', name);
    END LOOP;
END $$;

-- 5. The checks, by primary key. Same triggers, names, messages and SQLSTATEs.

-- 0001's (credit_notes_within_invoice)
CREATE OR REPLACE FUNCTION check_invoice_credits() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    inv invoices%ROWTYPE;
    credited bigint;
BEGIN
    SELECT * INTO inv FROM invoices WHERE id = NEW.invoice_id;
    SELECT t.pre_payment + t.post_payment INTO credited
      FROM invoice_totals AS t WHERE t.invoice_id = NEW.invoice_id;
    credited := coalesce(credited, 0);
    IF credited > inv.total THEN
        RAISE EXCEPTION 'credit notes of invoice % exceed its total', NEW.invoice_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF credited <> inv.pre_payment_credited + inv.post_payment_credited THEN
        RAISE EXCEPTION 'credited amount of invoice % disagrees with its credit notes', NEW.invoice_id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0004's (invoice_counters_match_credit_notes)
CREATE OR REPLACE FUNCTION check_invoice_counters() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    pre bigint;
    post bigint;
    inv invoices%ROWTYPE;
BEGIN
    SELECT * INTO inv FROM invoices WHERE id = NEW.id;
    SELECT t.pre_payment, t.post_payment INTO pre, post
      FROM invoice_totals AS t WHERE t.invoice_id = NEW.id;
    IF coalesce(pre, 0) <> inv.pre_payment_credited
       OR coalesce(post, 0) <> inv.post_payment_credited THEN
        RAISE EXCEPTION 'credited amounts of invoice % disagree with its credit notes', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0008's (credit_notes_within_policy_cap)
CREATE OR REPLACE FUNCTION check_policy_cap() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    bps integer;
    invoice_total bigint;
    credited bigint;
BEGIN
    bps := substring(NEW.policy FROM ':max_credit_bps=([0-9]{1,5})$')::integer;
    IF bps IS NULL OR NEW.status <> 'issued' THEN
        RETURN NULL;
    END IF;
    SELECT total INTO invoice_total FROM public.invoices WHERE id = NEW.invoice_id;
    SELECT t.total INTO credited FROM public.invoice_trigger_credit_totals AS t
     WHERE t.invoice_id = NEW.invoice_id AND t.trigger_type = NEW.trigger_type;
    IF coalesce(credited, 0) > round(invoice_total::numeric * bps / 10000) THEN
        RAISE EXCEPTION 'credit notes of type % on invoice % exceed their policy cap',
            NEW.trigger_type, NEW.invoice_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0013's view, one row by primary key: does what the invoice line records as credited
-- disagree with its non-void credit-note lines? (NULL: no such invoice line)
CREATE FUNCTION invoice_line_disagrees(invoice text, line text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    il invoice_lines%ROWTYPE;
    c invoice_line_credit_totals%ROWTYPE;
BEGIN
    SELECT * INTO il FROM invoice_lines WHERE invoice_id = invoice AND line_id = line;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO c FROM invoice_line_credit_totals AS t
     WHERE t.invoice_id = invoice AND t.line_id = line;
    RETURN (il.credited_net, il.credited_tax, il.credited_quantity)
               IS DISTINCT FROM (coalesce(c.net, 0), coalesce(c.tax, 0), coalesce(c.quantity, 0))
           OR (CASE WHEN cardinality(il.time_credits) > 1
                    THEN ARRAY(SELECT t FROM unnest(il.time_credits) AS t ORDER BY t)
                    ELSE il.time_credits END)
              IS DISTINCT FROM coalesce(c.time_credits, '{}')
           OR (coalesce(c.quantity_lines, 0) > 0 AND il.credit_method IS DISTINCT FROM 'quantity');
END $$;

-- 0013's invoice_line_credits_match_credit_notes, invoice_line_inserted_credited
CREATE OR REPLACE FUNCTION check_invoice_line_credits() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF invoice_line_disagrees(NEW.invoice_id, NEW.line_id) THEN
        RAISE EXCEPTION 'what invoice line %/% records as credited disagrees with its credit notes',
            NEW.invoice_id, NEW.line_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0013's credit_notes_written_on_their_lines, credit_notes_written_off_their_lines: the
-- note's own lines only
CREATE OR REPLACE FUNCTION check_credit_note_lines_recorded() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    line text;
BEGIN
    SELECT l.invoice_line_id INTO line FROM credit_note_lines AS l
     WHERE l.credit_note_id = NEW.id AND l.invoice_line_id IS NOT NULL
       AND invoice_line_disagrees(NEW.invoice_id, l.invoice_line_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invoice line %/% does not record what credit note % credits of it',
            NEW.invoice_id, line, NEW.number USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0016's payments_match_invoice, invoice_paid_by_payments, invoice_inserted_paid
CREATE OR REPLACE FUNCTION check_payments_match_invoice() RETURNS trigger LANGUAGE plpgsql
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
    SELECT t.paid INTO applied FROM invoice_totals AS t WHERE t.invoice_id = invoice;
    IF paid IS DISTINCT FROM coalesce(applied, 0) THEN
        RAISE EXCEPTION 'amount_paid of invoice % disagrees with its payments', invoice
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0016's refunds_within_payment
CREATE OR REPLACE FUNCTION check_refunds_within_payment() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF coalesce((SELECT t.open FROM payment_refund_totals AS t
                  WHERE t.invoice_id = NEW.invoice_id
                    AND t.payment_sequence = NEW.payment_sequence), 0)
       > (SELECT applied FROM payments
           WHERE invoice_id = NEW.invoice_id AND sequence = NEW.payment_sequence) THEN
        RAISE EXCEPTION 'refunds of payment %/% exceed what of it was applied', NEW.invoice_id,
            NEW.payment_sequence USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

-- 0016's invoice_refund_counters, invoice_refund_counters_match, invoice_inserted_refunded
CREATE OR REPLACE FUNCTION check_invoice_refund_counters() RETURNS trigger LANGUAGE plpgsql
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
    SELECT t.refunded, t.refunds_failed INTO total, failed
      FROM invoice_totals AS t WHERE t.invoice_id = invoice;
    IF (inv.refunded, inv.refunds_failed) IS DISTINCT FROM (coalesce(total, 0), coalesce(failed, 0))
    THEN
        RAISE EXCEPTION 'refunded amounts of invoice % disagree with its refunds', invoice
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
