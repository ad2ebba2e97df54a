-- Retention (service/adapters/retention.py): the ledger of processed messages,
-- the published outbox rows and the replay audit are pruned in small batches
-- by the application role, which gets DELETE on these three tables only.
-- A row-level guard lets it delete only rows that are eligible whatever the
-- settings say: published outbox rows, ledger keys and audit rows older than
-- a day, never a payment's ledger key (payments are deduplicated by it alone).
-- Superusers and the migrator (the owner, who could drop the guard anyway)
-- may still repair by hand.

CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX processed_messages_prunable ON processed_messages (processed_at)
    WHERE type <> 'invoice.payment_succeeded';
CREATE INDEX dlq_replays_replayed_at ON dlq_replays (replayed_at);

-- What has been pruned: rows of <table_name> older than <pruned_before> may be
-- gone (creditnotes verify expects no outbox event of a credit note older than that).
CREATE TABLE retention_horizons (
    table_name     text PRIMARY KEY CHECK (table_name IN ('outbox', 'processed_messages',
                                                          'dlq_replays')),
    pruned_before  timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION retention_may_repair() RETURNS boolean LANGUAGE sql STABLE
SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT current_setting('is_superuser') = 'on'
        OR pg_has_role(current_user, 'creditnotes_migrator', 'MEMBER')
$$;

CREATE FUNCTION retention_guard() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    eligible boolean;
BEGIN
    -- one IF per table: each expression names only the columns its table has
    IF TG_TABLE_NAME = 'outbox' THEN
        eligible := OLD.published_at IS NOT NULL AND OLD.published_at < now() - interval '1 day';
    ELSIF TG_TABLE_NAME = 'processed_messages' THEN
        eligible := OLD.processed_at < now() - interval '1 day'
                    AND OLD.type <> 'invoice.payment_succeeded';
    ELSIF TG_TABLE_NAME = 'dlq_replays' THEN
        eligible := OLD.replayed_at < now() - interval '1 day';
    ELSE
        eligible := false;
    END IF;
    IF eligible OR retention_may_repair() THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'only retention may delete % rows, and only eligible ones', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER retention_guard_outbox BEFORE DELETE ON outbox
    FOR EACH ROW EXECUTE FUNCTION retention_guard();
CREATE TRIGGER retention_guard_processed_messages BEFORE DELETE ON processed_messages
    FOR EACH ROW EXECUTE FUNCTION retention_guard();
CREATE TRIGGER retention_guard_dlq_replays BEFORE DELETE ON dlq_replays
    FOR EACH ROW EXECUTE FUNCTION retention_guard();

GRANT DELETE ON outbox, processed_messages, dlq_replays TO creditnotes_app;
GRANT SELECT, INSERT, UPDATE ON retention_horizons TO creditnotes_app;
GRANT ALL ON retention_horizons TO creditnotes_migrator;
