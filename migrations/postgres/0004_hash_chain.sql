-- Tamper evidence (issue #9): every committed record is hashed, a batch's records of one
-- UTC day form a block whose root is over their hashes, and the blocks of a day are
-- chained (each block's hash covers the previous one's). `verify` recomputes all of it
-- from the rows as they are now; see src/store/chain.rs for the encoding.
--
-- One chain per day (of `created_at`), so retention can remove a whole day: the day's
-- row stays, retired, with the head it had as the anchor later blocks continue from.
CREATE TABLE chain_days (
    day         DATE        PRIMARY KEY,
    -- Hash of the day's last block (the genesis hash while there is none).
    head        BYTEA       NOT NULL,
    -- Blocks and records ever chained on this day (retention does not lower them).
    blocks      BIGINT      NOT NULL DEFAULT 0,
    records     BIGINT      NOT NULL DEFAULT 0,
    -- Where verification starts: seq 0 and the genesis hash, or, once retention removed
    -- the day, the last removed block's seq and hash.
    anchor_seq  BIGINT      NOT NULL DEFAULT 0,
    anchor_hash BYTEA       NOT NULL,
    retired_at  TIMESTAMPTZ
);

CREATE TABLE chain_blocks (
    day          DATE        NOT NULL,
    seq          BIGINT      NOT NULL,
    block_id     UUID        NOT NULL,
    prev_hash    BYTEA       NOT NULL,
    root         BYTEA       NOT NULL,
    hash         BYTEA       NOT NULL,
    record_count BIGINT      NOT NULL,
    -- The block's manifest: (interaction_id 16 bytes, record hash 32 bytes) per record,
    -- sorted by id. The root is the hash of it, so it is as protected as the root, and it
    -- lets `verify` name the record that was changed, removed or added.
    leaves       BYTEA       NOT NULL,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (day, seq)
);

-- The block a record was committed in (NULL: written before this migration or with
-- `audit.database.hash_chain: false`). Verification reads a block's records by it.
ALTER TABLE interactions ADD COLUMN chain_block UUID;

-- Records stored before this migration, per day: `verify` accepts that many unchained
-- records on a day that is chained from now on (the upgrade day), and no more.
CREATE TABLE chain_legacy (
    day     DATE   PRIMARY KEY,
    records BIGINT NOT NULL
);
INSERT INTO chain_legacy (day, records)
SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM interactions GROUP BY 1;
CREATE INDEX idx_interactions_chain_block ON interactions (chain_block);
