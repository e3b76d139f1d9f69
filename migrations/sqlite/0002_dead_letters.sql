-- Records the database refused because of their data, isolated from their batch so the
-- rest could commit. See the PostgreSQL migration.
CREATE TABLE dead_letters (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    interaction_id TEXT    NOT NULL UNIQUE,
    record         TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 1,
    failed_at      TEXT    NOT NULL
);
CREATE INDEX idx_dead_letters_failed_at ON dead_letters (failed_at);
