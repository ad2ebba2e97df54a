-- The ops console (issue 14; docs/security.md): its audit trail and the record of
-- `creditnotes verify` runs the flow-health page shows.
--
-- console_audit: one row per write attempt through the console or its API, refusals
-- included (outcome 'refused:<code>': forbidden, csrf_failed, rate_limited, invalid
-- input...). A command's row is inserted 'pending' before its CloudEvent is published
-- and gets its outcome once (an 'unknown:*' one may still become the final one);
-- any other row is inserted with its outcome. Nothing else
-- ever changes and no row is deleted or truncated: the application role inserts,
-- reads and writes that one outcome (the triggers check it for every role,
-- superusers too).
-- Ids come from console_audit_id_seq only, through the insert trigger: an insert that
-- names an id (any statement shape, OVERRIDING SYSTEM VALUE or COPY too) is refused,
-- so nobody re-orders the history `recent` and `find` read by id.
CREATE SEQUENCE console_audit_id_seq;
CREATE TABLE console_audit (
    id              bigint PRIMARY KEY,
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
ALTER SEQUENCE console_audit_id_seq OWNED BY console_audit.id;

CREATE FUNCTION console_audit_insert() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.id IS NOT NULL THEN
        RAISE EXCEPTION 'console audit ids come from their sequence; this insert named %',
            NEW.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.id := nextval('console_audit_id_seq');
    NEW.at := now();
    NEW.finished_at := CASE WHEN NEW.outcome = 'pending' THEN NULL ELSE now() END;
    RETURN NEW;
END $$;
CREATE TRIGGER console_audit_insert BEFORE INSERT ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_insert();

CREATE FUNCTION console_audit_outcome_once() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    -- a pending row is a command that was (or is about to be) published: it ends as
    -- what became of it, never as a refusal (a refused row frees the (actor, key) slot
    -- of the unique index, which would let a second command take the same key). An
    -- 'unknown:<error>' row (a publish that failed: it may have been sent) takes its
    -- final outcome once more, when a retry under its key learns it.
    IF NOT (OLD.outcome = 'pending' OR OLD.outcome LIKE 'unknown:%')
       OR NEW.outcome = 'pending' OR NEW.outcome LIKE 'refused:%'
       OR (OLD.outcome LIKE 'unknown:%' AND NEW.outcome LIKE 'unknown:%')
       OR (NEW.id, NEW.at, NEW.actor, NEW.role, NEW.via, NEW.action, NEW.target,
           NEW.idempotency_key, NEW.request_digest)
          IS DISTINCT FROM
          (OLD.id, OLD.at, OLD.actor, OLD.role, OLD.via, OLD.action, OLD.target,
           OLD.idempotency_key, OLD.request_digest) THEN
        RAISE EXCEPTION 'console audit row % gets its outcome once (from pending, or from unknown:*), never a refusal; nothing else changes',
            OLD.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.finished_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER console_audit_outcome_once BEFORE UPDATE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_outcome_once();

-- verify_runs: each `creditnotes verify` records what it found (the codes of the
-- invariants violated) and who ran it.
-- Its ids, as console_audit's, come from its sequence only (the insert trigger).
CREATE SEQUENCE verify_runs_id_seq;
CREATE TABLE verify_runs (
    id          bigint PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    violations  integer NOT NULL CHECK (violations >= 0),
    invariants  text[] NOT NULL DEFAULT '{}',
    ran_by      text NOT NULL CHECK (length(ran_by) <= 200),
    CHECK (started_at <= finished_at)
);
COMMENT ON TABLE verify_runs IS 'the result of each creditnotes verify (append-only)';
CREATE INDEX verify_runs_finished_at ON verify_runs (finished_at DESC);
ALTER SEQUENCE verify_runs_id_seq OWNED BY verify_runs.id;

CREATE FUNCTION verify_runs_stamped() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF NEW.id IS NOT NULL THEN
        RAISE EXCEPTION 'verify run ids come from their sequence; this insert named %',
            NEW.id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.id := nextval('verify_runs_id_seq');
    NEW.finished_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER verify_runs_stamped BEFORE INSERT ON verify_runs
    FOR EACH ROW EXECUTE FUNCTION verify_runs_stamped();

-- console_sessions: one row per browser session (POST /login), looked up by its key
-- on every request that carries the session's cookie; signing out stamps ended_at
-- and the cookie stops working at once, on every replica. A row changes only by
-- getting its ended_at, once; rows are never deleted (each sign-in has its audit row).
CREATE TABLE console_sessions (
    id         text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{64}$'),  -- sha256 of the session's nonce
    actor      text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    role       text NOT NULL CHECK (role IN ('viewer', 'operator')),
    opened_at  timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    ended_at   timestamptz
);
COMMENT ON TABLE console_sessions IS
    'the console''s browser sessions: a signed-out (ended) session''s cookie is refused';

CREATE FUNCTION console_sessions_opened() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.opened_at := now();
    NEW.ended_at := NULL;
    RETURN NEW;
END $$;
CREATE TRIGGER console_sessions_opened BEFORE INSERT ON console_sessions
    FOR EACH ROW EXECUTE FUNCTION console_sessions_opened();

CREATE FUNCTION console_sessions_end_once() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF OLD.ended_at IS NOT NULL OR NEW.ended_at IS NULL
       OR (NEW.id, NEW.actor, NEW.role, NEW.opened_at, NEW.expires_at)
          IS DISTINCT FROM (OLD.id, OLD.actor, OLD.role, OLD.opened_at, OLD.expires_at) THEN
        RAISE EXCEPTION 'console session % only ends, once; nothing else changes', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.ended_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER console_sessions_end_once BEFORE UPDATE ON console_sessions
    FOR EACH ROW EXECUTE FUNCTION console_sessions_end_once();
CREATE TRIGGER console_sessions_never_deleted BEFORE DELETE ON console_sessions
    FOR EACH ROW EXECUTE FUNCTION history_is_kept();
CREATE TRIGGER console_sessions_never_truncated BEFORE TRUNCATE ON console_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_kept();

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
GRANT SELECT, INSERT ON console_sessions TO creditnotes_app;
GRANT UPDATE (ended_at) ON console_sessions TO creditnotes_app;
-- the insert triggers run as the inserting role: it draws ids (nextval), never sets them
GRANT USAGE ON SEQUENCE console_audit_id_seq, verify_runs_id_seq TO creditnotes_app;
GRANT ALL ON console_audit, verify_runs, console_sessions TO creditnotes_migrator;
GRANT ALL ON SEQUENCE console_audit_id_seq, verify_runs_id_seq TO creditnotes_migrator;
