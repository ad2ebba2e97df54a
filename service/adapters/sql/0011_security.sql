-- The database refuses to rewrite history (issue 15, findings 3 and 5), for the
-- application role, the migrator role and superusers alike. Each threat, its
-- defence and its test: docs/security.md, tests/integration/test_database_attacks.py.
--
-- A superuser can still bypass all of this (session_replication_role = replica,
-- DROP TRIGGER), and so can the owner of the tables (ALTER TABLE ... DISABLE
-- TRIGGER): whoever runs the migrations must be trusted.

-- 1. No temporary tables for the application role (nor for PUBLIC, from which
-- every role inherits TEMPORARY): a temporary table named like a real one
-- shadows it for unqualified names. Every function in the schema also gets a
-- fixed search_path with pg_temp explicitly last (see the end of this file).
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, creditnotes_app',
                   current_database());
    -- only the database's owner (or a superuser) can revoke PUBLIC's default: say so
    IF has_database_privilege('creditnotes_app', current_database(), 'TEMPORARY') THEN
        RAISE WARNING 'creditnotes_app can still create temporary tables: the owner of '
            'database % must REVOKE TEMPORARY ON DATABASE % FROM PUBLIC', current_database(),
            current_database();
    END IF;
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The transaction (pg_current_xact_id(): the top level one, so savepoints do
-- not matter) that wrote a row, stamped by the triggers below whatever the
-- client sends: "inserted in this transaction" cannot be forged, and unlike
-- xmin it does not move when memo or metadata are updated.
ALTER TABLE credit_notes ADD COLUMN issued_xact bigint, ADD COLUMN voided_xact bigint;
ALTER TABLE processed_messages ADD COLUMN claimed_xact bigint;
COMMENT ON COLUMN credit_notes.issued_xact IS 'transaction that issued the note (set by trigger)';
COMMENT ON COLUMN credit_notes.voided_xact IS 'transaction that voided the note (set by trigger)';
COMMENT ON COLUMN processed_messages.claimed_xact IS
    'transaction that last claimed the key: inserted it or re-claimed it after a release (set by trigger)';

-- 2. Credit notes: issued (never inserted void), then at most one void, which
-- sets status, voided_at (the voiding transaction's time) and voided_by_* together, once.
CREATE FUNCTION credit_notes_issue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'issued' OR NEW.voided_at IS NOT NULL OR NEW.voided_by_source IS NOT NULL
       OR NEW.voided_by_id IS NOT NULL THEN
        RAISE EXCEPTION 'a credit note is inserted issued; it is voided later'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.issued_xact := pg_current_xact_id()::text::bigint;
    NEW.voided_xact := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_notes_issue BEFORE INSERT ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION credit_notes_issue();

CREATE FUNCTION credit_notes_void_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.issued_xact := OLD.issued_xact;
    IF OLD.status = 'void' THEN
        IF (NEW.voided_at, NEW.voided_by_source, NEW.voided_by_id)
           IS DISTINCT FROM (OLD.voided_at, OLD.voided_by_source, OLD.voided_by_id) THEN
            RAISE EXCEPTION 'the void of credit note % is never rewritten', OLD.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        NEW.voided_xact := OLD.voided_xact;
    ELSIF NEW.status = 'void' THEN
        IF NEW.voided_at IS DISTINCT FROM now() OR NEW.voided_by_source IS NULL
           OR NEW.voided_by_id IS NULL THEN
            RAISE EXCEPTION 'credit note % is voided now, with voided_at and voided_by_* set together',
                OLD.id USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        NEW.voided_xact := pg_current_xact_id()::text::bigint;
    ELSIF NEW.voided_at IS NOT NULL OR NEW.voided_by_source IS NOT NULL
          OR NEW.voided_by_id IS NOT NULL THEN
        RAISE EXCEPTION 'the void columns of credit note % are set only by its void', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    ELSE
        NEW.voided_xact := NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_notes_void_once BEFORE UPDATE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION credit_notes_void_once();

-- Lines are written with their note: credit-note lines and the issue journal
-- only in the transaction that issued the note, the void journal only in the
-- transaction that voided it. Nothing is ever added to a posted note or journal.
CREATE FUNCTION lines_written_with_their_note() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    note credit_notes%ROWTYPE;
    entry text;
BEGIN
    SELECT * INTO note FROM credit_notes WHERE id = NEW.credit_note_id;
    IF NOT FOUND THEN
        RETURN NEW;  -- the foreign key refuses it
    END IF;
    IF TG_TABLE_NAME = 'journal_lines' THEN
        entry := NEW.entry;  -- a field only journal lines have: read it only for them
    END IF;
    IF entry = 'void' THEN
        IF note.voided_xact IS DISTINCT FROM pg_current_xact_id()::text::bigint THEN
            RAISE EXCEPTION 'a void journal is written only by the void of credit note %', note.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    ELSIF note.issued_xact IS DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        RAISE EXCEPTION 'credit note % is posted: no % can be added to it', note.id, TG_TABLE_NAME
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_note_lines_with_their_note BEFORE INSERT ON credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION lines_written_with_their_note();
CREATE TRIGGER journal_lines_with_their_note BEFORE INSERT ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION lines_written_with_their_note();

-- A void comes with its reversal: at commit, the void journal is the issue
-- journal line for line with debit and credit swapped.
CREATE FUNCTION check_void_reversed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM journal_lines WHERE credit_note_id = NEW.id AND entry = 'void')
       OR EXISTS (
           (SELECT account, debit, credit FROM journal_lines
             WHERE credit_note_id = NEW.id AND entry = 'issue'
            EXCEPT ALL
            SELECT account, credit, debit FROM journal_lines
             WHERE credit_note_id = NEW.id AND entry = 'void')
           UNION ALL
           (SELECT account, credit, debit FROM journal_lines
             WHERE credit_note_id = NEW.id AND entry = 'void'
            EXCEPT ALL
            SELECT account, debit, credit FROM journal_lines
             WHERE credit_note_id = NEW.id AND entry = 'issue')) THEN
        RAISE EXCEPTION 'credit note % is void without the reversal of its journal', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER credit_notes_void_reversed AFTER UPDATE OF status ON credit_notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status = 'issued' AND NEW.status = 'void')
    EXECUTE FUNCTION check_void_reversed();

-- 3. Invoices: the figures an invoice was finalized with never change; the
-- money received and refunded and the credit-note count only grow; the status
-- moves only along open -> paid | uncollectible | void, uncollectible -> void | paid.
CREATE FUNCTION invoices_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.number, NEW.customer_id, NEW.currency, NEW.subtotal, NEW.discount, NEW.tax,
        NEW.total, NEW.customer_balance_applied, NEW.created_at)
       IS DISTINCT FROM
       (OLD.id, OLD.number, OLD.customer_id, OLD.currency, OLD.subtotal, OLD.discount, OLD.tax,
        OLD.total, OLD.customer_balance_applied, OLD.created_at) THEN
        RAISE EXCEPTION 'the figures of invoice % never change', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.amount_paid < OLD.amount_paid OR NEW.refunded < OLD.refunded
       OR NEW.credit_note_count < OLD.credit_note_count THEN
        RAISE EXCEPTION 'amount_paid, refunded and credit_note_count of invoice % never decrease',
            OLD.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status <> OLD.status AND (OLD.status, NEW.status) NOT IN (
           ('open', 'paid'), ('open', 'uncollectible'), ('open', 'void'),
           ('uncollectible', 'void'), ('uncollectible', 'paid')) THEN
        RAISE EXCEPTION 'invoice % cannot go from % to %', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER invoices_legal_transition BEFORE UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_legal_transition();

-- An invoice line's figures never change (what has been credited of it may).
CREATE FUNCTION invoice_lines_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.invoice_id, NEW.line_id, NEW.position, NEW.description, NEW.quantity,
        NEW.unit_amount, NEW.tax_rate_bps, NEW.period_start, NEW.period_end, NEW.discount, NEW.tax)
       IS DISTINCT FROM
       (OLD.invoice_id, OLD.line_id, OLD.position, OLD.description, OLD.quantity,
        OLD.unit_amount, OLD.tax_rate_bps, OLD.period_start, OLD.period_end, OLD.discount, OLD.tax)
    THEN
        RAISE EXCEPTION 'the figures of invoice line %/% never change', OLD.invoice_id, OLD.line_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER invoice_lines_fixed BEFORE UPDATE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION invoice_lines_fixed();

-- An outbox event is written once: only its delivery state (published_at,
-- parked_at, park_error) ever changes.
CREATE FUNCTION outbox_event_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.seq, NEW.event_id, NEW.topic, NEW.key, NEW.type, NEW.payload::text, NEW.created_at,
        NEW.traceparent)
       IS DISTINCT FROM
       (OLD.seq, OLD.event_id, OLD.topic, OLD.key, OLD.type, OLD.payload::text, OLD.created_at,
        OLD.traceparent) THEN
        RAISE EXCEPTION 'outbox event % never changes', OLD.event_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_event_fixed BEFORE UPDATE ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_event_fixed();

-- 4. Processed messages: a key's row is written only by the transaction that
-- claimed it (inserted it, or re-claimed it after a release): that is where
-- its outcome, 'released:<reason>' included, is recorded. A released key goes
-- back only to 'applied' (the claim) stamped now. An applied or rejected
-- message from an earlier transaction can thus never be marked released and
-- applied again, nor have its outcome or processed_at rewritten.
CREATE FUNCTION processed_messages_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.claimed_xact := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END $$;
CREATE TRIGGER processed_messages_claim BEFORE INSERT ON processed_messages
    FOR EACH ROW EXECUTE FUNCTION processed_messages_claim();

CREATE FUNCTION processed_messages_written_by_their_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.source, NEW.id) IS DISTINCT FROM (OLD.source, OLD.id) THEN
        RAISE EXCEPTION 'a processed message keeps its key'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.claimed_xact IS NOT DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        NEW.claimed_xact := OLD.claimed_xact;
        RETURN NEW;
    END IF;
    IF OLD.outcome LIKE 'released:%' AND NEW.outcome = 'applied'
       AND NEW.processed_at IS NOT DISTINCT FROM now() THEN
        NEW.claimed_xact := pg_current_xact_id()::text::bigint;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'a processed message is written only by the transaction that claimed it'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER processed_messages_written_by_their_claim BEFORE UPDATE ON processed_messages
    FOR EACH ROW EXECUTE FUNCTION processed_messages_written_by_their_claim();

-- The replay audit (0010): a claimed row ("maybe sent") may be re-claimed by a
-- later run (--force: replay_run, replayed_by, replayed_at = now()) and becomes
-- 'sent' once, stamped now; a sent row never changes; what was replayed (the
-- digests, where the dead letter was, where it went) never changes. Backdating
-- replayed_at would make the row prunable (0009), and the dead letter replayable again.
CREATE FUNCTION dlq_replays_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = 'sent' AND ROW(NEW.*) IS DISTINCT FROM ROW(OLD.*) THEN
        RAISE EXCEPTION 'a sent replay is never rewritten'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.dead_letter_digest, NEW.content_digest, NEW.dlq_topic, NEW.dlq_partition,
        NEW.dlq_offset, NEW.original_topic, NEW.original_partition, NEW.original_offset,
        NEW.reason, NEW.record_key)
       IS DISTINCT FROM
       (OLD.dead_letter_digest, OLD.content_digest, OLD.dlq_topic, OLD.dlq_partition,
        OLD.dlq_offset, OLD.original_topic, OLD.original_partition, OLD.original_offset,
        OLD.reason, OLD.record_key)
       OR (NEW.replayed_at IS DISTINCT FROM OLD.replayed_at AND NEW.replayed_at <> now())
       OR (NEW.state = 'sent' AND OLD.state <> 'sent' AND NEW.sent_at IS DISTINCT FROM now())
       OR (NEW.state = 'claimed' AND NEW.sent_at IS NOT NULL) THEN
        RAISE EXCEPTION 'a replay is claimed, re-claimed now or sent now; nothing else changes'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER dlq_replays_legal_transition BEFORE UPDATE ON dlq_replays
    FOR EACH ROW EXECUTE FUNCTION dlq_replays_legal_transition();

-- 5. History is never truncated (TRUNCATE fires no DELETE trigger), by anyone;
-- invoices are never deleted either (credit notes and lines already refuse it;
-- retention deletes only eligible outbox, ledger and audit rows, 0009).
CREATE FUNCTION history_is_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of % is refused: it holds history', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['credit_notes', 'credit_note_lines', 'journal_lines', 'invoices',
                                'invoice_lines', 'processed_messages', 'outbox', 'dlq_replays'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION history_is_kept()', name || '_never_truncated', name);
    END LOOP;
END $$;
CREATE TRIGGER invoices_never_deleted BEFORE DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();
CREATE TRIGGER invoice_lines_never_deleted BEFORE DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();

-- 6. Every function of the schema (these, 0001-0010's and any an extension did
-- not bring) resolves names in pg_catalog, then public, and pg_temp last: not
-- listing pg_temp would search it FIRST for tables. A later migration that adds
-- a function must set the same: see
-- test_database_attacks.py::test_every_function_in_the_schema_has_a_fixed_search_path.
DO $$
DECLARE
    routine regprocedure;
BEGIN
    FOR routine IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend AS d
                            WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                              AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER ROUTINE %s SET search_path = pg_catalog, public, pg_temp', routine);
    END LOOP;
END $$;
