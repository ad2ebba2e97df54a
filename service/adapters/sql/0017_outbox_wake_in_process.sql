-- No NOTIFY at commit (issue 13).
--
-- A NOTIFY takes a database-wide lock from the moment it is queued at COMMIT until the
-- commit is flushed, so concurrent batches (shards, replicas) committed one after the
-- other. The service wakes its relay in-process when a batch commits outbox rows, and
-- the relay's poll sweeps up what other replicas committed (docs/reliability.md).
-- `creditnotes outbox retry` still wakes the relays with a NOTIFY of its own.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION notify_outbox();
