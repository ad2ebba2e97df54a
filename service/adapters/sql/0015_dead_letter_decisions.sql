-- Dead-letter decisions in the ledger (issue 9: one outcome per record).
--
-- The consumer records that a delivery (topic, partition, offset) is dead-lettered
-- BEFORE it sends the dead letter: outcome 'dead_lettered:<reason>', written
-- - by the transaction that claimed the key (a refusal raised while applying), or
-- - by a compare-and-set in a transaction of its own, from no row (the
--   message's transaction was rolled back), a 'released:<reason>' row (it waited
--   for its invoice in vain) or a 'dead_lettered:<reason>' row, never from an
--   applied or rejected one (another replica applied it meanwhile: no dead letter).
-- A redelivery of the same (topic, partition, offset) finds the decision and sends
-- the dead letter again instead of applying; a delivery at another offset (a
-- `dlq replay`, the event on another topic) may claim the key as it may claim a
-- released one. So a record never gets an effect after its dead letter.
--
-- 0011's rule is kept otherwise: a row is written only by the transaction that
-- claimed it; from another transaction only these moves, each stamped now() and
-- re-stamping claimed_xact:
--   released:%      -> applied           (the claim, as before)
--   dead_lettered:% -> applied           (the claim, by another delivery only)
--   released:%      -> dead_lettered:%   (the decision after waiting in vain)
--   dead_lettered:% -> dead_lettered:%   (the decision, again)
CREATE OR REPLACE FUNCTION processed_messages_written_by_their_claim() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    IF (NEW.source, NEW.id) IS DISTINCT FROM (OLD.source, OLD.id) THEN
        RAISE EXCEPTION 'a processed message keeps its key'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.claimed_xact IS NOT DISTINCT FROM pg_current_xact_id()::text::bigint THEN
        NEW.claimed_xact := OLD.claimed_xact;
        RETURN NEW;
    END IF;
    IF NEW.processed_at IS NOT DISTINCT FROM now() AND (
           (OLD.outcome LIKE 'released:%' AND NEW.outcome = 'applied')
        OR (OLD.outcome LIKE 'dead_lettered:%' AND NEW.outcome = 'applied'
            AND (NEW.kafka_offset IS NULL
                 OR (NEW.topic, NEW.kafka_partition, NEW.kafka_offset)
                    IS DISTINCT FROM (OLD.topic, OLD.kafka_partition, OLD.kafka_offset)))
        OR ((OLD.outcome LIKE 'released:%' OR OLD.outcome LIKE 'dead_lettered:%')
            AND NEW.outcome LIKE 'dead_lettered:_%')) THEN
        NEW.claimed_xact := pg_current_xact_id()::text::bigint;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'a processed message is written only by the transaction that claimed it'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
