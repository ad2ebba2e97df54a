-- Parking (service/adapters/outbox_relay.py): a row the broker refuses for a
-- reason retrying cannot fix (too large, invalid topic, not authorized) is
-- parked with the broker's error instead of being retried at the head of the
-- queue for ever. Later rows with the same key (the invoice id: every event
-- is keyed by its invoice on every topic) wait behind it; all other rows flow.
-- `creditnotes outbox retry` clears parked_at so the relay publishes it again.
ALTER TABLE outbox ADD COLUMN parked_at timestamptz;
ALTER TABLE outbox ADD COLUMN park_error text;
ALTER TABLE outbox ADD CONSTRAINT parked_rows_are_unpublished
    CHECK (parked_at IS NULL OR published_at IS NULL);
-- the few parked rows, found per key by the relay's "waits behind" check
CREATE INDEX outbox_parked ON outbox (key, seq) WHERE parked_at IS NOT NULL;

-- The relay fence: one row. Before each batch the leader writes, on the very
-- connection that holds the relay's advisory lock, until when that batch may
-- still be publishing; it clears the fence when the batch is done. A relay
-- that has just taken the lock waits until a fence it finds has passed, so a
-- former leader whose lock connection died mid-batch never publishes beside it.
CREATE TABLE outbox_relay_fence (
    id           smallint PRIMARY KEY CHECK (id = 1),
    holder       text,
    fence_until  timestamptz
);
INSERT INTO outbox_relay_fence (id) VALUES (1);

GRANT UPDATE (parked_at, park_error) ON outbox TO creditnotes_app;
GRANT SELECT, UPDATE (holder, fence_until) ON outbox_relay_fence TO creditnotes_app;
GRANT ALL ON outbox_relay_fence TO creditnotes_migrator;
