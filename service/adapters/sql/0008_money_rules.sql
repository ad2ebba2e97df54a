-- Money rules (docs/rules.md, issue 9 finding 4, issue 15 finding 4).

-- Credit-note numbers are unique per invoice, not across invoices: invoice
-- numbers need not be unique (re-issued invoices, other ledgers), so two
-- invoices numbered DUP-1 each get a DUP-1-CN-01.
ALTER TABLE credit_notes DROP CONSTRAINT credit_notes_number_key;
ALTER TABLE credit_notes ADD CONSTRAINT credit_notes_invoice_number_key UNIQUE (invoice_id, number);

-- Time-based credits (downgrade, cancellation) cover their invoice line from
-- their time to the period end. A credit-note line records that time
-- (covers_from); the invoice line keeps the times of its non-void time-based
-- credits (time_credits, one entry per credit), so the covered part of the
-- period is [min(time_credits), period_end), and a void removes its entry.
ALTER TABLE credit_note_lines ADD COLUMN covers_from timestamptz;
ALTER TABLE invoice_lines ADD COLUMN time_credits timestamptz[] NOT NULL DEFAULT '{}';
ALTER TABLE invoice_lines ADD CONSTRAINT time_credits_within_period CHECK (
    cardinality(time_credits) = 0
    OR (period_start IS NOT NULL AND period_start <= ALL (time_credits)
        AND period_end >= ALL (time_credits)));
GRANT UPDATE (time_credits) ON invoice_lines TO creditnotes_app;

-- A trigger policy's cap is cumulative: at commit, the non-void credit notes
-- of a trigger type on an invoice add up to at most the cap recorded in the
-- policy of the note just issued ("<type>:max_credit_bps=<bps>", basis points
-- of the invoice total, rounded half away from zero like the code).
CREATE FUNCTION check_policy_cap() RETURNS trigger LANGUAGE plpgsql
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
    SELECT coalesce(sum(total), 0) INTO credited FROM public.credit_notes
     WHERE invoice_id = NEW.invoice_id AND trigger_type = NEW.trigger_type AND status = 'issued';
    IF credited > round(invoice_total::numeric * bps / 10000) THEN
        RAISE EXCEPTION 'credit notes of type % on invoice % exceed their policy cap',
            NEW.trigger_type, NEW.invoice_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER credit_notes_within_policy_cap AFTER INSERT ON credit_notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_policy_cap();
