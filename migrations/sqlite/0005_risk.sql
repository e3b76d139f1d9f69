-- Risk classification: see the PostgreSQL migration of the same name.
ALTER TABLE tool_calls ADD COLUMN risk_level INTEGER NOT NULL DEFAULT 0 CHECK (risk_level BETWEEN 0 AND 4);
ALTER TABLE tool_calls ADD COLUMN risk_rule TEXT;
ALTER TABLE interactions ADD COLUMN risk_level INTEGER NOT NULL DEFAULT 0 CHECK (risk_level BETWEEN 0 AND 4);
ALTER TABLE interactions ADD COLUMN risk_flagged INTEGER NOT NULL DEFAULT 0 CHECK (risk_flagged >= 0);

CREATE INDEX idx_interactions_risk_level ON interactions (risk_level, created_at);
