-- Posted lines never change: credit-note lines and journal lines are append-only.
CREATE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are append-only', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
DROP TRIGGER credit_note_lines_immutable ON credit_note_lines;
CREATE TRIGGER credit_note_lines_append_only BEFORE UPDATE OR DELETE ON credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER journal_lines_append_only BEFORE UPDATE OR DELETE ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION append_only();

-- An invoice's credited counters always equal what its credit notes say, also
-- when only the invoice row changes (checked at commit).
CREATE FUNCTION check_invoice_counters() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    pre bigint;
    post bigint;
    inv invoices%ROWTYPE;
BEGIN
    SELECT * INTO inv FROM invoices WHERE id = NEW.id;
    SELECT coalesce(sum(pre_payment_amount), 0), coalesce(sum(total - pre_payment_amount), 0)
      INTO pre, post
      FROM credit_notes WHERE invoice_id = NEW.id AND status = 'issued';
    IF pre <> inv.pre_payment_credited OR post <> inv.post_payment_credited THEN
        RAISE EXCEPTION 'credited amounts of invoice % disagree with its credit notes', NEW.id
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER invoice_counters_match_credit_notes
    AFTER UPDATE OF pre_payment_credited, post_payment_credited ON invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_invoice_counters();
