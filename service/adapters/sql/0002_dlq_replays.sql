-- Audit of dead-letter replays: one row per dead-letter record republished.
-- The primary key makes a second replay of the same record a no-op.
CREATE TABLE dlq_replays (
    dlq_topic           text NOT NULL,
    dlq_partition       integer NOT NULL,
    dlq_offset          bigint NOT NULL,
    original_topic      text NOT NULL,
    original_partition  integer,
    original_offset     bigint,
    reason              text,
    record_key          text,
    replay_run          text NOT NULL,
    replayed_by         text NOT NULL,
    replayed_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
