-- Records the database refused because of their data (a constraint, a value out of
-- range), isolated from their batch so the rest could commit. Kept for an operator to
-- inspect, fix and re-send. `record` is the record's JSON as TEXT, not JSONB: a
-- dead-letter write must never be refused in turn.
CREATE TABLE dead_letters (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    interaction_id UUID        NOT NULL UNIQUE,
    record         TEXT        NOT NULL,
    error          TEXT        NOT NULL,
    attempts       INTEGER     NOT NULL DEFAULT 1,
    failed_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_dead_letters_failed_at ON dead_letters (failed_at);
