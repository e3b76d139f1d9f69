-- Risk classification (issue 14): each tool call's level (0 none … 4 critical, so
-- `min_risk` is one integer comparison) and the rule that set it; the interaction's
-- highest level and how many of its calls were flagged. Rows written before this
-- migration read as `none` (adding a column with a constant default rewrites nothing).
ALTER TABLE tool_calls
    ADD COLUMN risk_level SMALLINT NOT NULL DEFAULT 0 CHECK (risk_level BETWEEN 0 AND 4),
    ADD COLUMN risk_rule  TEXT;
ALTER TABLE interactions
    ADD COLUMN risk_level   SMALLINT NOT NULL DEFAULT 0 CHECK (risk_level BETWEEN 0 AND 4),
    ADD COLUMN risk_flagged INTEGER  NOT NULL DEFAULT 0 CHECK (risk_flagged >= 0);

-- `min_risk=high` newest first reads the few flagged rows by level, then time.
CREATE INDEX idx_interactions_risk_level ON interactions (risk_level, created_at);
