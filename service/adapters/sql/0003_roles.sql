-- Roles (docs/security.md). Two group roles, NOLOGIN: the platform creates
-- login users and grants them one of these.
--   creditnotes_migrator  owns the schema: DDL, used only by `creditnotes migrate`
--   creditnotes_app       what `creditnotes run` needs, and no more: no DDL, no DELETE,
--                         and on issued credit notes no UPDATE but of memo, metadata and
--                         the move to void (the immutability trigger checks that too)
-- Roles are cluster-wide; where the migrating user may not create roles, the
-- platform creates them first and this migration only grants.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_migrator') THEN
        CREATE ROLE creditnotes_migrator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'creditnotes_app') THEN
        CREATE ROLE creditnotes_app NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot create roles here; expecting the platform to have created them';
END $$;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO creditnotes_app', current_database());
    EXECUTE format('GRANT ALL ON DATABASE %I TO creditnotes_migrator', current_database());
END $$;
GRANT USAGE, CREATE ON SCHEMA public TO creditnotes_migrator;
GRANT ALL ON ALL TABLES IN SCHEMA public TO creditnotes_migrator;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO creditnotes_migrator;

GRANT USAGE ON SCHEMA public TO creditnotes_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO creditnotes_app;
GRANT INSERT ON invoices, invoice_lines, credit_notes, credit_note_lines, journal_lines,
                processed_messages, outbox, dlq_replays TO creditnotes_app;
GRANT UPDATE (status, amount_paid, pre_payment_credited, post_payment_credited, refunded,
              credit_note_count, updated_at) ON invoices TO creditnotes_app;
GRANT UPDATE (credited_net, credited_tax, credited_quantity, credit_method)
    ON invoice_lines TO creditnotes_app;
GRANT UPDATE (memo, metadata, status, voided_at, voided_by_source, voided_by_id)
    ON credit_notes TO creditnotes_app;
GRANT UPDATE (outcome) ON processed_messages TO creditnotes_app;
GRANT UPDATE (published_at) ON outbox TO creditnotes_app;
GRANT USAGE ON SEQUENCE outbox_seq_seq TO creditnotes_app;
