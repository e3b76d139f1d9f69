-- Indexes for reading the audit log back (list, stats, export; SPEC.md "Query").
--
-- Lists are newest first with keyset pagination on (created_at, id), so every filter an
-- operator uses alone gets an index led by that column and followed by the sort key:
-- the first page of "what did alice run" is an index range read, never a sort of all of
-- alice's rows. These replace the seed's single-column indexes on the same leading
-- columns (a composite index serves every query the single-column one did), so a write
-- maintains one index per column instead of two.
DROP INDEX idx_interactions_created_at;
DROP INDEX idx_interactions_session_id;
DROP INDEX idx_interactions_model_name;
DROP INDEX idx_interactions_status;
-- The time index also carries what stats aggregate, so "the last 7 days by model" is an
-- index-only scan of narrow entries instead of a read of every wide row in the range.
CREATE INDEX idx_interactions_created_at ON interactions (created_at, id)
    INCLUDE (model_name, user_id, status, cluster, provider, total_duration_ms, input_tokens, output_tokens);
CREATE INDEX idx_interactions_session_id ON interactions (session_id, created_at, id);
CREATE INDEX idx_interactions_model_name ON interactions (model_name, created_at, id);
CREATE INDEX idx_interactions_status ON interactions (status, created_at, id);
CREATE INDEX idx_interactions_user_id ON interactions (user_id, created_at, id);
CREATE INDEX idx_interactions_cluster ON interactions (cluster, created_at, id);
CREATE INDEX idx_interactions_provider ON interactions (provider, created_at, id);
CREATE INDEX idx_interactions_total_duration ON interactions (total_duration_ms);

-- "Which interactions ran kubectl": the tool filter is a semi-join from tool_calls by
-- name; carrying interaction_id makes it an index-only read.
DROP INDEX idx_tool_calls_tool_name;
CREATE INDEX idx_tool_calls_tool_name ON tool_calls (tool_name, interaction_id);

-- Full text over question and final answer. Trigrams serve substring search in any
-- language without a dictionary: Chinese has no spaces between words, and `crashloop`
-- must find `CrashLoopBackOff` (ILIKE with a trigram GIN index).
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX idx_interactions_question_trgm ON interactions USING gin (question gin_trgm_ops);
CREATE INDEX idx_interactions_final_answer_trgm ON interactions USING gin (final_answer gin_trgm_ops);

-- Dead letters are listed newest first.
DROP INDEX idx_dead_letters_failed_at;
CREATE INDEX idx_dead_letters_failed_at ON dead_letters (failed_at, id);
