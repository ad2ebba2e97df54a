-- History guards, second round (issue 15): what 0009 and 0011 still let the
-- application role rewrite. Each attack is performed in
-- tests/integration/test_database_attacks.py (as the application role, the
-- migrator and a superuser); docs/security.md lists them.

-- 1. An outbox row's delivery state only moves forward. published_at is set
-- once, from NULL to now() (the publishing transaction's time), while the row is
-- not parked, and never changes again: a published row is frozen. parked_at goes
-- from NULL to now() (park, hold) or back to NULL (`creditnotes outbox retry`),
-- only while unpublished. So a row cannot be published "in the past" to become
-- prunable at once (0009) and deleted unsent, nor set back to unpublished.
CREATE FUNCTION outbox_delivery_forward() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF OLD.published_at IS NOT NULL THEN
        -- to_jsonb: every column, those later migrations add included (json has no "=")
        IF to_jsonb(NEW) IS DISTINCT FROM to_jsonb(OLD) THEN
            RAISE EXCEPTION 'outbox event % was published: it never changes again', OLD.event_id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.published_at IS NOT NULL
       AND (NEW.published_at IS DISTINCT FROM now() OR OLD.parked_at IS NOT NULL
            OR NEW.parked_at IS NOT NULL) THEN
        RAISE EXCEPTION 'outbox event % is published now, once, and only while not parked',
            OLD.event_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.parked_at IS DISTINCT FROM OLD.parked_at AND NEW.parked_at IS NOT NULL
       AND (OLD.parked_at IS NOT NULL OR NEW.parked_at IS DISTINCT FROM now()) THEN
        RAISE EXCEPTION 'outbox event % is parked now or un-parked; parked_at is never rewritten',
            OLD.event_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER outbox_delivery_forward BEFORE UPDATE ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_delivery_forward();

-- 2. What retention pruned (creditnotes verify forgives missing outbox events
-- older than it): the horizon only moves forward, never closer than a day to
-- now (what retention may prune at most, 0009), and is never deleted.
-- updated_at is stamped now whatever the client sends.
CREATE FUNCTION retention_horizon_forward() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.pruned_before > now() - interval '1 day'
       OR (TG_OP = 'UPDATE' AND (NEW.table_name IS DISTINCT FROM OLD.table_name
                                 OR NEW.pruned_before < OLD.pruned_before)) THEN
        RAISE EXCEPTION 'the retention horizon of % only moves forward, to a day ago at most',
            NEW.table_name USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER retention_horizon_forward BEFORE INSERT OR UPDATE ON retention_horizons
    FOR EACH ROW EXECUTE FUNCTION retention_horizon_forward();
CREATE TRIGGER retention_horizons_never_deleted BEFORE DELETE ON retention_horizons
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();
CREATE TRIGGER retention_horizons_never_truncated BEFORE TRUNCATE ON retention_horizons
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_kept();

-- 3. Retention never deletes a replay still 'claimed' ("maybe sent", 0010):
-- without its row, the next routine replay would send the dead letter again.
-- (0009's guard, the same otherwise.)
CREATE OR REPLACE FUNCTION retention_guard() RETURNS trigger LANGUAGE plpgsql
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
        eligible := OLD.replayed_at < now() - interval '1 day'
                    AND OLD.state IS DISTINCT FROM 'claimed';
    ELSE
        eligible := false;
    END IF;
    IF eligible OR retention_may_repair() THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'only retention may delete % rows, and only eligible ones', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

-- 4. What has been credited of an invoice line is what its non-void credit
-- notes say (creditnotes verify's line_credits_disagree, line_coverage_disagrees):
-- checked at commit for every line whose credited figures changed, and for the
-- lines of every credit note issued or voided, since a void legitimately lowers
-- them. Net, tax and quantity are the sums of the non-void credit-note lines on
-- the line; time_credits is, as a multiset, their covers_from; a line credited
-- by quantity keeps credit_method 'quantity'.
-- One row per invoice line: does it disagree with its non-void credit-note lines?
-- (A view, queried by the triggers below with the line's key: the lateral part then
-- reads only that invoice's credit notes, through credit_notes (invoice_id, sequence).)
CREATE VIEW invoice_line_credit_checks AS
SELECT il.invoice_id, il.line_id,
       (il.credited_net, il.credited_tax, il.credited_quantity)
           IS DISTINCT FROM (c.net, c.tax, c.quantity)
       OR ARRAY(SELECT t FROM unnest(il.time_credits) AS t ORDER BY t) IS DISTINCT FROM c.times
       OR (c.by_quantity AND il.credit_method IS DISTINCT FROM 'quantity') AS disagrees
FROM invoice_lines AS il
CROSS JOIN LATERAL (
    SELECT coalesce(sum(l.net), 0) AS net, coalesce(sum(l.tax), 0) AS tax,
           coalesce(sum(l.quantity), 0) AS quantity,
           coalesce(array_agg(l.covers_from ORDER BY l.covers_from)
                        FILTER (WHERE l.covers_from IS NOT NULL), '{}') AS times,
           coalesce(bool_or(l.quantity IS NOT NULL), false) AS by_quantity
    FROM credit_notes AS n
    JOIN credit_note_lines AS l ON l.credit_note_id = n.id
    WHERE n.invoice_id = il.invoice_id AND n.status <> 'void'
      AND l.invoice_line_id = il.line_id) AS c;
GRANT SELECT ON invoice_line_credit_checks TO creditnotes_app;
GRANT ALL ON invoice_line_credit_checks TO creditnotes_migrator;

CREATE FUNCTION check_invoice_line_credits() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (SELECT disagrees FROM invoice_line_credit_checks
         WHERE invoice_id = NEW.invoice_id AND line_id = NEW.line_id) THEN
        RAISE EXCEPTION 'what invoice line %/% records as credited disagrees with its credit notes',
            NEW.invoice_id, NEW.line_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER invoice_line_credits_match_credit_notes
    AFTER UPDATE OF credited_net, credited_tax, credited_quantity, credit_method, time_credits
    ON invoice_lines DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.credited_net, OLD.credited_tax, OLD.credited_quantity, OLD.credit_method,
           OLD.time_credits)
          IS DISTINCT FROM
          (NEW.credited_net, NEW.credited_tax, NEW.credited_quantity, NEW.credit_method,
           NEW.time_credits))
    EXECUTE FUNCTION check_invoice_line_credits();
CREATE CONSTRAINT TRIGGER invoice_line_inserted_credited
    AFTER INSERT ON invoice_lines DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.credited_net <> 0 OR NEW.credited_tax <> 0 OR NEW.credited_quantity <> 0
          OR NEW.credit_method IS NOT NULL OR cardinality(NEW.time_credits) > 0)
    EXECUTE FUNCTION check_invoice_line_credits();

-- the lines of a credit note issued or voided: recorded on (or taken off) their invoice lines
-- (named to fire after 0001's credit_notes_within_invoice and 0011's credit_notes_void_reversed:
-- deferred triggers of one event run in name order, so a note over the invoice's total or a
-- void without its reversal is refused for that first, as before)
CREATE FUNCTION check_credit_note_lines_recorded() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    line text;
BEGIN
    SELECT c.line_id INTO line FROM invoice_line_credit_checks AS c
     WHERE c.invoice_id = NEW.invoice_id AND c.disagrees
       AND c.line_id IN (SELECT invoice_line_id FROM credit_note_lines
                          WHERE credit_note_id = NEW.id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invoice line %/% does not record what credit note % credits of it',
            NEW.invoice_id, line, NEW.number USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER credit_notes_written_on_their_lines
    AFTER INSERT ON credit_notes DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION check_credit_note_lines_recorded();
CREATE CONSTRAINT TRIGGER credit_notes_written_off_their_lines
    AFTER UPDATE OF status ON credit_notes DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.status = 'issued' AND NEW.status = 'void')
    EXECUTE FUNCTION check_credit_note_lines_recorded();

-- A line's credit method (0011's invoice_lines_fixed, extended): set once by the
-- first credit that fixes one, cleared only when nothing is credited any more
-- (a void took it all back), never switched: a line credited by amount is never
-- credited by quantity (credit_method_conflict), nor the other way round.
CREATE OR REPLACE FUNCTION invoice_lines_fixed() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
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
    IF OLD.credit_method IS NOT NULL AND NEW.credit_method IS DISTINCT FROM OLD.credit_method
       AND (NEW.credit_method IS NOT NULL OR NEW.credited_net <> 0 OR NEW.credited_tax <> 0
            OR NEW.credited_quantity <> 0) THEN
        RAISE EXCEPTION 'invoice line %/% keeps its credit method while anything is credited',
            OLD.invoice_id, OLD.line_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
