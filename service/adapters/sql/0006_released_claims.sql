-- A message dead-lettered from inside its transaction gives its idempotency
-- key back by marking its ledger row 'released:<reason>' (the application
-- role never deletes); a later delivery of the same event, e.g. a replay,
-- re-claims the row and applies. The row keeps where the latest attempt came from.
GRANT UPDATE (type, topic, kafka_partition, kafka_offset, processed_at)
    ON processed_messages TO creditnotes_app;
