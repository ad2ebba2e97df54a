-- The ops console (issue 14; docs/security.md): its audit trail and the record of
-- `creditnotes verify` runs the flow-health page shows.
--
-- console_audit: one row per write attempt through the console or its API, refusals
-- included (outcome 'refused:<code>': forbidden, csrf_failed, rate_limited, invalid
-- input...). A command's row is inserted 'pending' before its CloudEvent is published
-- and gets its outcome once; any other row is inserted with its outcome. Nothing else
-- ever changes and no row is deleted or truncated: the application role inserts,
-- reads and writes that one outcome (the triggers check it for every role,
-- superusers too).
CREATE TABLE console_audit (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    role            text NOT NULL CHECK (role IN ('viewer', 'operator')),
    via             text NOT NULL CHECK (via IN ('token', 'session', 'proxy')),
    action          text NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    target          text CHECK (length(target) <= 500),
    idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_digest  text CHECK (length(request_digest) <= 128),
    outcome         text NOT NULL CHECK (outcome ~ '^[a-z][A-Za-z0-9_.:/-]{0,199}$'),
    finished_at     timestamptz,
    CHECK ((outcome = 'pending') = (finished_at IS NULL))
);
COMMENT ON TABLE console_audit IS
    'who did what through the ops console, when, and the outcome (append-only)';
-- one command per user and idempotency key; a refused attempt takes no key (it may
-- be retried with the same key once allowed)
CREATE UNIQUE INDEX console_audit_idempotency ON console_audit (actor, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND outcome NOT LIKE 'refused:%';
CREATE INDEX console_audit_at ON console_audit (at DESC);

CREATE FUNCTION console_audit_insert() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.at := now();
    NEW.finished_at := CASE WHEN NEW.outcome = 'pending' THEN NULL ELSE now() END;
    RETURN NEW;
END $$;
CREATE TRIGGER console_audit_insert BEFORE INSERT ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_insert();

CREATE FUNCTION console_audit_outcome_once() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF OLD.outcome <> 'pending' OR NEW.outcome = 'pending'
       OR (NEW.id, NEW.at, NEW.actor, NEW.role, NEW.via, NEW.action, NEW.target,
           NEW.idempotency_key, NEW.request_digest)
          IS DISTINCT FROM
          (OLD.id, OLD.at, OLD.actor, OLD.role, OLD.via, OLD.action, OLD.target,
           OLD.idempotency_key, OLD.request_digest) THEN
        RAISE EXCEPTION 'console audit row % gets its outcome once, from pending; nothing else changes',
            OLD.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.finished_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER console_audit_outcome_once BEFORE UPDATE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_outcome_once();

-- verify_runs: each `creditnotes verify` records what it found (the codes of the
-- invariants violated) and who ran it.
CREATE TABLE verify_runs (
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    violations  integer NOT NULL CHECK (violations >= 0),
    invariants  text[] NOT NULL DEFAULT '{}',
    ran_by      text NOT NULL CHECK (length(ran_by) <= 200),
    CHECK (started_at <= finished_at)
);
COMMENT ON TABLE verify_runs IS 'the result of each creditnotes verify (append-only)';
CREATE INDEX verify_runs_finished_at ON verify_runs (finished_at DESC);

CREATE FUNCTION verify_runs_stamped() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.finished_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER verify_runs_stamped BEFORE INSERT ON verify_runs
    FOR EACH ROW EXECUTE FUNCTION verify_runs_stamped();

-- History is kept: neither table is ever deleted from or truncated (0011's function),
-- and a verify run never changes (0004's append_only).
CREATE TRIGGER console_audit_never_deleted BEFORE DELETE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();
CREATE TRIGGER console_audit_never_truncated BEFORE TRUNCATE ON console_audit
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_kept();
CREATE TRIGGER verify_runs_append_only BEFORE UPDATE OR DELETE ON verify_runs
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER verify_runs_never_truncated BEFORE TRUNCATE ON verify_runs
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_kept();

-- Grants (0003's model): the application inserts and reads; of an audit row it
-- updates only the outcome (and the trigger stamps finished_at).
GRANT SELECT, INSERT ON console_audit, verify_runs TO creditnotes_app;
GRANT UPDATE (outcome, finished_at) ON console_audit TO creditnotes_app;
GRANT USAGE ON SEQUENCE verify_runs_id_seq TO creditnotes_app;
GRANT ALL ON console_audit, verify_runs TO creditnotes_migrator;
GRANT ALL ON SEQUENCE verify_runs_id_seq TO creditnotes_migrator;
