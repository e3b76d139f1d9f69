-- Tamper evidence: per-day hash chains of blocks of records. See the PostgreSQL
-- migration of the same name. Days are `YYYY-MM-DD` text, hashes are blobs.
CREATE TABLE chain_days (
    day         TEXT    PRIMARY KEY,
    head        BLOB    NOT NULL,
    blocks      INTEGER NOT NULL DEFAULT 0,
    records     INTEGER NOT NULL DEFAULT 0,
    anchor_seq  INTEGER NOT NULL DEFAULT 0,
    anchor_hash BLOB    NOT NULL,
    retired_at  TEXT
);

CREATE TABLE chain_blocks (
    day          TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    block_id     TEXT    NOT NULL,
    prev_hash    BLOB    NOT NULL,
    root         BLOB    NOT NULL,
    hash         BLOB    NOT NULL,
    record_count INTEGER NOT NULL,
    leaves       BLOB    NOT NULL,
    committed_at TEXT    NOT NULL,
    PRIMARY KEY (day, seq)
);

ALTER TABLE interactions ADD COLUMN chain_block TEXT;

CREATE TABLE chain_legacy (
    day     TEXT    PRIMARY KEY,
    records INTEGER NOT NULL
);
INSERT INTO chain_legacy (day, records)
SELECT substr(created_at, 1, 10), count(*) FROM interactions GROUP BY 1;
CREATE INDEX idx_interactions_chain_block ON interactions (chain_block);
