-- Replay audit: nothing a dead letter carries can make a claim fail for a whole run.
--
-- 0010 indexed (content_digest, reason), and reason is copied from a dead letter's
-- dlq.error.reason header: one over ~2,700 bytes made the btree refuse the row, and
-- with it every claim of its chunk. "Replayed before" now looks up the content
-- only (any earlier replay of the same record, whatever the reason), so the index
-- holds only the fixed-size digest. The tool bounds what it stores (partition,
-- offsets, reason, an escaped and capped key) and claims row by row if a chunk fails.
DROP INDEX dlq_replays_content;
CREATE INDEX dlq_replays_content ON dlq_replays (content_digest);
