-- Indexes for reading the audit log back; see the PostgreSQL migration of the same name.
DROP INDEX idx_interactions_created_at;
DROP INDEX idx_interactions_session_id;
DROP INDEX idx_interactions_model_name;
DROP INDEX idx_interactions_status;
CREATE INDEX idx_interactions_created_at ON interactions (created_at, id);
CREATE INDEX idx_interactions_session_id ON interactions (session_id, created_at, id);
CREATE INDEX idx_interactions_model_name ON interactions (model_name, created_at, id);
CREATE INDEX idx_interactions_status ON interactions (status, created_at, id);
CREATE INDEX idx_interactions_user_id ON interactions (user_id, created_at, id);
CREATE INDEX idx_interactions_cluster ON interactions (cluster, created_at, id);
CREATE INDEX idx_interactions_provider ON interactions (provider, created_at, id);
CREATE INDEX idx_interactions_total_duration ON interactions (total_duration_ms);

DROP INDEX idx_tool_calls_tool_name;
CREATE INDEX idx_tool_calls_tool_name ON tool_calls (tool_name, interaction_id);

DROP INDEX idx_dead_letters_failed_at;
CREATE INDEX idx_dead_letters_failed_at ON dead_letters (failed_at, id);

-- Full text over question and final answer: FTS5 with the trigram tokenizer matches any
-- substring of three or more characters, in any language (Chinese has no spaces between
-- words) and case-insensitively. An external-content table: the text is stored once, in
-- `interactions`, and triggers keep the index in step.
CREATE VIRTUAL TABLE interactions_fts USING fts5(
    question, final_answer, content = 'interactions', content_rowid = 'id', tokenize = 'trigram'
);
INSERT INTO interactions_fts (rowid, question, final_answer)
    SELECT id, question, final_answer FROM interactions;
CREATE TRIGGER interactions_fts_insert AFTER INSERT ON interactions BEGIN
    INSERT INTO interactions_fts (rowid, question, final_answer)
    VALUES (new.id, new.question, new.final_answer);
END;
CREATE TRIGGER interactions_fts_delete AFTER DELETE ON interactions BEGIN
    INSERT INTO interactions_fts (interactions_fts, rowid, question, final_answer)
    VALUES ('delete', old.id, old.question, old.final_answer);
END;
CREATE TRIGGER interactions_fts_update AFTER UPDATE OF question, final_answer ON interactions BEGIN
    INSERT INTO interactions_fts (interactions_fts, rowid, question, final_answer)
    VALUES ('delete', old.id, old.question, old.final_answer);
    INSERT INTO interactions_fts (rowid, question, final_answer)
    VALUES (new.id, new.question, new.final_answer);
END;
