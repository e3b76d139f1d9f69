-- Anomalies: see the PostgreSQL migration of the same name. Times are RFC 3339 text.
CREATE TABLE anomalies (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    scope        TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end   TEXT NOT NULL,
    score        REAL NOT NULL,
    value        REAL NOT NULL,
    baseline     REAL NOT NULL,
    detail       TEXT NOT NULL,
    detected_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (kind, scope, window_start)
);
CREATE INDEX idx_anomalies_window ON anomalies (window_start, id);
