-- Downstream log delivery (events/delivery.py): per destination, what was delivered, how many
-- attempts failed and how many events were given up on (dead-lettered), with the last error; and
-- the dead-lettered events themselves, as stored in the stream, with their reason. A dead letter
-- is recorded once per destination and event (a redelivery of an event already given up on does
-- not count twice).
CREATE TABLE log_delivery_state (
    destination_id text PRIMARY KEY,
    delivered bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0,
    last_error text,
    last_error_at timestamptz,
    last_delivered_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE log_dead_letter (
    destination_id text NOT NULL,
    event_id text NOT NULL,
    stream_seq bigint NOT NULL,
    event_type text NOT NULL,
    attempts integer NOT NULL,
    reason text NOT NULL,
    event bytea NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination_id, event_id)
);
CREATE INDEX log_dead_letter_recent ON log_dead_letter (destination_id, dead_at DESC);
