-- The W3C traceparent of the span that wrote an outbox row (tracing on), so
-- the relay's publish span continues the message's trace.
ALTER TABLE outbox ADD COLUMN traceparent text;
