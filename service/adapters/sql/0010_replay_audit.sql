-- Replay audit v2 (creditnotes dlq replay).
--
-- Identity: a dead letter is known by a digest of its own bytes (key, value and
-- every header, dlq.original.* and dlq.failed_at included), not by its offset:
-- a broker or topic reset reuses offsets, so a brand-new dead letter at offset 0
-- must never look like an old one. Rows written before this migration keep
-- a 'legacy:topic:partition:offset' identity that no digest can equal.
--
-- Send at most once: a row is claimed (state 'claimed', committed) BEFORE the
-- record is sent and confirmed ('sent') after the broker acknowledged it. A row
-- left 'claimed' means "maybe sent" and is only re-sent with --force.
--
-- content_digest (topic, key, value, non-dlq headers) spots a record that was
-- replayed and dead-lettered again: same content, same reason.
ALTER TABLE dlq_replays DROP CONSTRAINT dlq_replays_pkey;
ALTER TABLE dlq_replays
    ADD COLUMN dead_letter_digest text,
    ADD COLUMN content_digest text,
    ADD COLUMN state text NOT NULL DEFAULT 'sent' CHECK (state IN ('claimed', 'sent')),
    ADD COLUMN sent_at timestamptz;
UPDATE dlq_replays
   SET dead_letter_digest = 'legacy:' || dlq_topic || ':' || dlq_partition || ':' || dlq_offset,
       sent_at = replayed_at;
ALTER TABLE dlq_replays ALTER COLUMN dead_letter_digest SET NOT NULL;
ALTER TABLE dlq_replays ALTER COLUMN state DROP DEFAULT;
ALTER TABLE dlq_replays ADD PRIMARY KEY (dead_letter_digest);
CREATE INDEX dlq_replays_content ON dlq_replays (content_digest, reason);
COMMENT ON COLUMN dlq_replays.replayed_at IS 'when the replay was claimed (before sending)';
COMMENT ON COLUMN dlq_replays.sent_at IS 'when the broker acknowledged the republished record';

GRANT UPDATE (state, sent_at, replay_run, replayed_by, replayed_at)
    ON dlq_replays TO creditnotes_app;
