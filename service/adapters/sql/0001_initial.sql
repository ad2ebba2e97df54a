-- Credit notes: invoices as this service knows them, credit notes, the
-- processed-message ledger and the transactional outbox.
-- The CHECK constraints and triggers restate docs/rules.md so that even a bug in
-- the code cannot over-credit, duplicate a number or duplicate an effect.

CREATE TABLE invoices (
    id                        text PRIMARY KEY,
    number                    text NOT NULL,
    customer_id               text NOT NULL,
    currency                  text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status                    text NOT NULL CHECK (status IN ('open', 'paid', 'uncollectible', 'void')),
    subtotal                  bigint NOT NULL CHECK (subtotal >= 0),
    discount                  bigint NOT NULL CHECK (discount BETWEEN 0 AND subtotal),
    tax                       bigint NOT NULL CHECK (tax >= 0),
    total                     bigint NOT NULL CHECK (total = subtotal - discount + tax),
    customer_balance_applied  bigint NOT NULL CHECK (customer_balance_applied BETWEEN 0 AND total),
    amount_paid               bigint NOT NULL CHECK (amount_paid >= 0),
    pre_payment_credited      bigint NOT NULL DEFAULT 0 CHECK (pre_payment_credited >= 0),
    post_payment_credited     bigint NOT NULL DEFAULT 0 CHECK (post_payment_credited >= 0),
    refunded                  bigint NOT NULL DEFAULT 0 CHECK (refunded BETWEEN 0 AND amount_paid),
    credit_note_count         integer NOT NULL DEFAULT 0 CHECK (credit_note_count >= 0),
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    -- the sum of all non-void credit notes never exceeds the invoice total
    CONSTRAINT credits_within_total CHECK (pre_payment_credited + post_payment_credited <= total),
    -- amount_remaining = amount_due - amount_paid - pre-payment credits, never negative
    CONSTRAINT amount_remaining_not_negative
        CHECK (total - customer_balance_applied - amount_paid - pre_payment_credited >= 0)
);

CREATE TABLE invoice_lines (
    invoice_id         text NOT NULL REFERENCES invoices (id),
    line_id            text NOT NULL,
    position           integer NOT NULL CHECK (position >= 0),
    description        text NOT NULL,
    quantity           bigint NOT NULL CHECK (quantity > 0),
    unit_amount        bigint NOT NULL CHECK (unit_amount >= 0),
    tax_rate_bps       integer NOT NULL CHECK (tax_rate_bps >= 0),
    period_start       timestamptz,
    period_end         timestamptz,
    discount           bigint NOT NULL CHECK (discount BETWEEN 0 AND quantity * unit_amount),
    tax                bigint NOT NULL CHECK (tax >= 0),
    credited_net       bigint NOT NULL DEFAULT 0,
    credited_tax       bigint NOT NULL DEFAULT 0,
    credited_quantity  bigint NOT NULL DEFAULT 0,
    credit_method      text CHECK (credit_method IN ('quantity', 'amount')),
    PRIMARY KEY (invoice_id, line_id),
    UNIQUE (invoice_id, position),
    CHECK ((period_start IS NULL) = (period_end IS NULL) AND period_start < period_end
           OR period_start IS NULL),
    -- the credited part of a line never exceeds that line, net and tax
    CONSTRAINT line_net_within_line CHECK (credited_net BETWEEN 0 AND quantity * unit_amount - discount),
    CONSTRAINT line_tax_within_line CHECK (credited_tax BETWEEN 0 AND tax),
    CONSTRAINT line_quantity_within_line CHECK (credited_quantity BETWEEN 0 AND quantity)
);

CREATE TABLE credit_notes (
    id                   text PRIMARY KEY,
    invoice_id           text NOT NULL REFERENCES invoices (id),
    sequence             integer NOT NULL CHECK (sequence > 0),
    number               text NOT NULL UNIQUE,
    customer_id          text NOT NULL,
    currency             text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status               text NOT NULL CHECK (status IN ('issued', 'void')),
    reason               text NOT NULL CHECK (reason IN ('duplicate', 'fraudulent', 'order_change',
                             'product_unsatisfactory', 'service_credit', 'subscription_change',
                             'subscription_cancellation', 'other')),
    subtotal             bigint NOT NULL CHECK (subtotal >= 0),
    tax                  bigint NOT NULL CHECK (tax >= 0),
    total                bigint NOT NULL CHECK (total > 0 AND total = subtotal + tax),
    pre_payment_amount   bigint NOT NULL CHECK (pre_payment_amount BETWEEN 0 AND total),
    refund_amount        bigint NOT NULL CHECK (refund_amount >= 0),
    credit_amount        bigint NOT NULL CHECK (credit_amount >= 0),
    out_of_band_amount   bigint NOT NULL CHECK (out_of_band_amount >= 0),
    refund_id            text UNIQUE CHECK ((refund_id IS NULL) = (refund_amount = 0)),
    trigger_source       text NOT NULL,
    trigger_id           text NOT NULL,
    trigger_type         text NOT NULL,
    policy               text,
    memo                 text,
    metadata             jsonb NOT NULL DEFAULT '{}',
    issued_at            timestamptz NOT NULL DEFAULT now(),
    voided_at            timestamptz,
    voided_by_source     text,
    voided_by_id         text,
    -- numbers are per invoice and never reused
    UNIQUE (invoice_id, sequence),
    -- one upstream event, at most one credit note
    UNIQUE (trigger_source, trigger_id),
    -- the settlement parts add up to the post-payment part exactly
    CONSTRAINT settlement_adds_up
        CHECK (refund_amount + credit_amount + out_of_band_amount = total - pre_payment_amount),
    CHECK ((status = 'void') = (voided_at IS NOT NULL))
);

CREATE TABLE credit_note_lines (
    credit_note_id   text NOT NULL REFERENCES credit_notes (id),
    position         integer NOT NULL CHECK (position >= 0),
    invoice_line_id  text,
    description      text NOT NULL,
    quantity         bigint CHECK (quantity > 0),
    unit_amount      bigint CHECK (unit_amount >= 0),
    tax_rate_bps     integer NOT NULL CHECK (tax_rate_bps >= 0),
    net              bigint NOT NULL CHECK (net >= 0),
    tax              bigint NOT NULL CHECK (tax >= 0),
    PRIMARY KEY (credit_note_id, position)
);

-- Every credit note's journal, and its reversal when voided; each entry balances.
CREATE TABLE journal_lines (
    credit_note_id  text NOT NULL REFERENCES credit_notes (id),
    entry           text NOT NULL CHECK (entry IN ('issue', 'void')),
    position        integer NOT NULL,
    account         text NOT NULL CHECK (account IN ('contra_revenue', 'sales_tax_payable',
                        'accounts_receivable', 'refunds_payable', 'customer_credit_balance',
                        'out_of_band_settlement')),
    debit           bigint NOT NULL CHECK (debit >= 0),
    credit          bigint NOT NULL CHECK (credit >= 0),
    CHECK ((debit = 0) <> (credit = 0)),
    PRIMARY KEY (credit_note_id, entry, position)
);

-- One row per upstream event applied (or refused by a business rule):
-- written in the same transaction as its effect, so the effect happens once.
CREATE TABLE processed_messages (
    source        text NOT NULL,
    id            text NOT NULL,
    type          text NOT NULL,
    topic         text NOT NULL,
    kafka_partition integer,
    kafka_offset  bigint,
    outcome       text NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, id)
);

-- The transactional outbox: events are written with their effect and
-- published by the relay in seq order, marked only after the broker acks.
CREATE TABLE outbox (
    seq           bigserial PRIMARY KEY,
    event_id      text NOT NULL UNIQUE,
    topic         text NOT NULL,
    key           text,
    type          text NOT NULL,
    payload       json NOT NULL,         -- json, not jsonb: published byte for byte as written
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;

CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('creditnotes_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();

-- An issued credit note is immutable: only memo, metadata and the move to
-- void may change; nothing is ever deleted.
CREATE FUNCTION credit_notes_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'credit notes are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.id, NEW.invoice_id, NEW.sequence, NEW.number, NEW.customer_id, NEW.currency,
        NEW.reason, NEW.subtotal, NEW.tax, NEW.total, NEW.pre_payment_amount,
        NEW.refund_amount, NEW.credit_amount, NEW.out_of_band_amount, NEW.refund_id,
        NEW.trigger_source, NEW.trigger_id, NEW.trigger_type, NEW.policy, NEW.issued_at)
       IS DISTINCT FROM
       (OLD.id, OLD.invoice_id, OLD.sequence, OLD.number, OLD.customer_id, OLD.currency,
        OLD.reason, OLD.subtotal, OLD.tax, OLD.total, OLD.pre_payment_amount,
        OLD.refund_amount, OLD.credit_amount, OLD.out_of_band_amount, OLD.refund_id,
        OLD.trigger_source, OLD.trigger_id, OLD.trigger_type, OLD.policy, OLD.issued_at) THEN
        RAISE EXCEPTION 'an issued credit note cannot change' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status = 'void' AND NEW.status <> 'void' THEN
        RAISE EXCEPTION 'a void credit note stays void' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_notes_immutable BEFORE UPDATE OR DELETE ON credit_notes
    FOR EACH ROW EXECUTE FUNCTION credit_notes_immutable();
CREATE TRIGGER credit_note_lines_immutable BEFORE UPDATE OR DELETE ON credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION credit_notes_immutable();

-- Independent of the denormalised counters on invoices: at commit, the
-- non-void credit notes of an invoice add up to at most its total, and to
-- exactly what the invoice says was credited.
CREATE FUNCTION check_invoice_credits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    inv invoices%ROWTYPE;
    credited bigint;
BEGIN
    SELECT * INTO inv FROM invoices WHERE id = NEW.invoice_id;
    SELECT coalesce(sum(total), 0) INTO credited
      FROM credit_notes WHERE invoice_id = NEW.invoice_id AND status = 'issued';
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
CREATE CONSTRAINT TRIGGER credit_notes_within_invoice AFTER INSERT OR UPDATE ON credit_notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_invoice_credits();

-- Each journal entry balances (checked at commit, once all its lines exist).
CREATE FUNCTION check_journal_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT sum(debit) - sum(credit) FROM journal_lines
         WHERE credit_note_id = NEW.credit_note_id AND entry = NEW.entry) <> 0 THEN
        RAISE EXCEPTION 'journal of credit note % (%) does not balance', NEW.credit_note_id, NEW.entry
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER journal_balanced AFTER INSERT ON journal_lines
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_journal_balanced();
