-- Storage at rest (issue #11): compress the wide text columns with lz4 and let the
-- toaster shrink a wide row further once it starts.
--
-- What this does and does not change, measured on PostgreSQL 15 (README "Storage"):
-- - PostgreSQL compresses or moves a value out of line only when the whole row exceeds
--   TOAST_TUPLE_THRESHOLD (about 2 KB with 8 KB pages), a build-time constant.
--   `toast_tuple_target` does not lower that trigger: it is the size the toaster
--   shrinks a row to once the row is over it. A row under 2 KB (the standard
--   workload's 1.6 KB tool observation) stays as it was.
-- - For rows over it (long kubectl output, long answers) lz4 compresses several times
--   faster than the default pglz at a similar ratio, so the writers pay less for it,
--   and the lower target moves more of such a row out of line, keeping the heap narrow
--   for scans.
-- - Only rows written from now on are affected; existing rows keep the compression they
--   were stored with until they are rewritten (VACUUM FULL, pg_repack, or a
--   dump/restore), which this migration deliberately does not do: it would lock and
--   rewrite the whole table.
--
-- A server built without lz4 refuses `SET COMPRESSION lz4`; the migration then keeps
-- pglz rather than failing, since compression is an optimisation, not a requirement.
DO $$
DECLARE
    col record;
BEGIN
    FOR col IN
        SELECT * FROM (VALUES
            ('interactions', 'question'), ('interactions', 'final_answer'),
            ('interactions', 'error'), ('interactions', 'attributes'),
            ('thoughts', 'thought'),
            ('tool_calls', 'tool_input'), ('tool_calls', 'tool_observation'), ('tool_calls', 'error'),
            ('dead_letters', 'record')
        ) AS c(tab, name)
    LOOP
        BEGIN
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET COMPRESSION lz4', col.tab, col.name);
        EXCEPTION WHEN feature_not_supported THEN
            RAISE NOTICE 'lz4 is not available in this server; % .% keeps pglz', col.tab, col.name;
        END;
    END LOOP;
END
$$;

ALTER TABLE interactions SET (toast_tuple_target = 256);
ALTER TABLE thoughts SET (toast_tuple_target = 256);
ALTER TABLE tool_calls SET (toast_tuple_target = 256);
