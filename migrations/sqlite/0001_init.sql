-- The same schema as migrations/postgres/0001_init.sql for the embedded store.
-- INTEGER PRIMARY KEY is SQLite's 64-bit rowid. UUIDs are stored as lowercase text and
-- times as RFC 3339 UTC text with microseconds, which sorts in time order.

CREATE TABLE sessions (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL UNIQUE,
    user_id     TEXT,
    client_ip   TEXT,
    user_agent  TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ingested_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE interactions (
    id                    INTEGER PRIMARY KEY,
    interaction_id        TEXT NOT NULL UNIQUE,
    session_id            TEXT NOT NULL REFERENCES sessions (session_id),
    user_id               TEXT,
    endpoint              TEXT,
    question              TEXT NOT NULL,
    model_name            TEXT,
    provider              TEXT,
    base_url              TEXT,
    cluster               TEXT,
    final_answer          TEXT,
    status                TEXT NOT NULL,
    error                 TEXT,
    http_status           INTEGER,
    created_at            TEXT NOT NULL,
    ingested_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    total_duration_ms     INTEGER,
    assistant_duration_ms INTEGER,
    parse_duration_ms     INTEGER,
    input_tokens          INTEGER,
    output_tokens         INTEGER,
    attributes            TEXT NOT NULL DEFAULT '{}',
    CHECK (total_duration_ms >= 0 AND assistant_duration_ms >= 0 AND parse_duration_ms >= 0),
    CHECK (input_tokens >= 0 AND output_tokens >= 0),
    CHECK (http_status BETWEEN 100 AND 599)
);

CREATE TABLE thoughts (
    id              INTEGER PRIMARY KEY,
    interaction_id  TEXT NOT NULL REFERENCES interactions (interaction_id) ON DELETE CASCADE,
    thought         TEXT,
    sequence_number INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL
);

CREATE TABLE tool_calls (
    id                      INTEGER PRIMARY KEY,
    interaction_id          TEXT NOT NULL REFERENCES interactions (interaction_id) ON DELETE CASCADE,
    tool_name               TEXT NOT NULL,
    tool_input              TEXT NOT NULL,
    tool_observation        TEXT,
    sequence_number         INTEGER NOT NULL,
    duration_ms             INTEGER,
    thought_sequence_number INTEGER,
    error                   TEXT,
    created_at              TEXT NOT NULL
);

CREATE TABLE performance_metrics (
    id             INTEGER PRIMARY KEY,
    interaction_id TEXT NOT NULL REFERENCES interactions (interaction_id) ON DELETE CASCADE,
    metric_name    TEXT NOT NULL,
    duration_ms    INTEGER NOT NULL,
    created_at     TEXT NOT NULL
);

CREATE INDEX idx_sessions_created_at ON sessions (created_at);
CREATE INDEX idx_sessions_user_id ON sessions (user_id);
CREATE INDEX idx_interactions_created_at ON interactions (created_at);
CREATE INDEX idx_interactions_session_id ON interactions (session_id);
CREATE INDEX idx_interactions_model_name ON interactions (model_name);
CREATE INDEX idx_interactions_status ON interactions (status);
CREATE INDEX idx_tool_calls_interaction_id ON tool_calls (interaction_id);
CREATE INDEX idx_tool_calls_tool_name ON tool_calls (tool_name);
CREATE INDEX idx_performance_metrics_interaction_id ON performance_metrics (interaction_id);
CREATE INDEX idx_performance_metrics_metric_name ON performance_metrics (metric_name);
CREATE INDEX idx_thoughts_interaction_id ON thoughts (interaction_id);
