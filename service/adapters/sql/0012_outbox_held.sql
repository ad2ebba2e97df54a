-- Held rows (service/adapters/outbox_relay.py): the later unpublished rows of a
-- key (an invoice) whose row the broker refused are parked too ("held"), with
-- held_behind = the refused row's seq and park_error 'waits behind seq N', so the
-- relay's batch read walks only rows it may send, however many wait. A row written
-- later for a held key is held when the relay first sees it. `creditnotes outbox
-- retry` releases a refused row together with the rows held behind it.
-- (0011's outbox_event_fixed trigger compares the event's own columns only:
-- held_behind, like parked_at and park_error, is delivery state and may change.)
ALTER TABLE outbox ADD COLUMN held_behind bigint;
ALTER TABLE outbox ADD CONSTRAINT held_rows_are_parked
    CHECK (held_behind IS NULL OR parked_at IS NOT NULL);
-- the rows the relay may send, in order (neither published nor parked nor held)
CREATE INDEX outbox_pending ON outbox (seq) WHERE published_at IS NULL AND parked_at IS NULL;
-- a key's later unpublished rows, held when one of its rows is parked
CREATE INDEX outbox_unpublished_key ON outbox (key, seq) WHERE published_at IS NULL;
-- the rows held behind a refused one, released with it
CREATE INDEX outbox_held ON outbox (held_behind) WHERE held_behind IS NOT NULL;

-- rows already waiting behind a parked row are held now
UPDATE outbox o SET parked_at = now(), held_behind = p.root,
                    park_error = 'waits behind seq ' || p.root
FROM (SELECT DISTINCT ON (key) key, seq AS root FROM outbox
      WHERE parked_at IS NOT NULL ORDER BY key, seq) p
WHERE o.key = p.key AND o.seq > p.root AND o.published_at IS NULL AND o.parked_at IS NULL;

GRANT UPDATE (held_behind) ON outbox TO creditnotes_app;
